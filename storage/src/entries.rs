//! What a node gives a target's list: its iSCSI initiator name or its addresses, checked before
//! they go anywhere (an agent's inventory is what the node says of itself).

use std::collections::BTreeMap;
use std::net::IpAddr;

use nodekeeper_proto::v1::Node;

use crate::config::{Clients, Target};

/// An iSCSI name as RFC 3720 writes it: `iqn.YYYY-MM.reversed.domain[:anything]`, `eui.` and 16
/// hex digits, or `naa.` and 16 or 32 hex digits; lower case, at most 223 bytes.
pub fn is_initiator(s: &str) -> bool {
    let hex = |h: &str| h.bytes().all(|b| b.is_ascii_hexdigit());
    if s.len() > 223 {
        return false;
    }
    if let Some(rest) = s.strip_prefix("iqn.") {
        let date = rest.get(..7).unwrap_or("");
        let date_ok = date.len() == 7
            && date.as_bytes()[4] == b'-'
            && date.bytes().enumerate().all(|(i, b)| i == 4 || b.is_ascii_digit());
        let tail = rest.get(7..).unwrap_or("");
        return date_ok
            && tail.starts_with('.')
            && tail.len() > 1
            && tail.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
    }
    if let Some(h) = s.strip_prefix("eui.") {
        return h.len() == 16 && hex(h);
    }
    if let Some(h) = s.strip_prefix("naa.") {
        return (h.len() == 16 || h.len() == 32) && hex(h);
    }
    false
}

/// Whether a list entry is of the kind `clients` manages (a target's list may hold both).
pub fn is_kind(clients: Clients, entry: &str) -> bool {
    match clients {
        Clients::Initiators => is_initiator(entry),
        Clients::Addresses => entry.parse::<IpAddr>().is_ok(),
    }
}

/// Whether the node is one of the target's: every selector label set on it.
pub fn selected(t: &Target, node: &Node) -> bool {
    t.selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

/// The entries the node gives the target, or why one of its values cannot be an entry.
pub fn of_node(t: &Target, node: &Node) -> (Vec<String>, Vec<String>) {
    let Some(inv) = &node.inventory else { return (vec![], vec![]) };
    let mut good = Vec::new();
    let mut bad = Vec::new();
    match t.clients {
        Clients::Initiators => {
            let name = inv.iscsi_initiator_name.trim();
            if name.is_empty() {
            } else if is_initiator(name) {
                good.push(name.to_owned());
            } else {
                bad.push(format!("initiator name {name:?} is not an iSCSI name"));
            }
        }
        Clients::Addresses => {
            for cidr in inv.interfaces.iter().flat_map(|i| &i.addresses) {
                let addr = match cidr.parse::<ipnet::IpNet>() {
                    Ok(n) => n.addr(),
                    Err(_) => match cidr.parse::<IpAddr>() {
                        Ok(a) => a,
                        Err(_) => {
                            bad.push(format!("address {cidr:?} is not an address"));
                            continue;
                        }
                    },
                };
                if usable(addr) && (t.networks.is_empty() || t.networks.iter().any(|n| n.contains(&addr))) {
                    good.push(addr.to_string());
                }
            }
        }
    }
    good.sort();
    good.dedup();
    (good, bad)
}

/// Not loopback, link-local, multicast or unspecified: an address a storage system could see.
fn usable(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => !(v.is_loopback() || v.is_link_local() || v.is_multicast() || v.is_unspecified()),
        IpAddr::V6(v) => {
            !(v.is_loopback() || v.is_multicast() || v.is_unspecified() || (v.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The target's wanted entries, each with the node that wants it, from the current nodes.
pub fn wanted<'a>(t: &Target, nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for n in nodes.into_iter().filter(|n| selected(t, n)) {
        let (good, bad) = of_node(t, n);
        for why in bad {
            tracing::warn!(target_name = %t.name, node = %n.name, "{why}: left out of the list");
        }
        for e in good {
            match out.get(&e) {
                // Two nodes claim one initiator name (or address): a cloned image, or a node
                // claiming another's access. Both keep it; someone must look.
                Some(other) if other != &n.name => {
                    tracing::warn!(target_name = %t.name, entry = %e, node = %n.name, other = %other, "two nodes claim the same entry");
                }
                Some(_) => {}
                None => {
                    out.insert(e, n.name.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use nodekeeper_proto::v1::{Inventory, NetworkInterface};

    fn target(clients: Clients, networks: &[&str]) -> Target {
        Target {
            name: "t".into(),
            clients,
            selector: BTreeMap::from([("pool".to_owned(), "db".to_owned())]),
            networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
            grace: std::time::Duration::from_secs(1),
            max_remove_share: 0.5,
            guard_window: std::time::Duration::from_secs(600),
            backend: Backend::Tgt { tid: 1, control_port: None, tgtadm: "tgtadm".into() },
        }
    }

    fn node(name: &str, iqn: &str, addrs: &[&str], pool: &str) -> Node {
        Node {
            name: name.into(),
            labels: [("pool".to_owned(), pool.to_owned())].into(),
            inventory: Some(Inventory {
                iscsi_initiator_name: iqn.into(),
                interfaces: vec![NetworkInterface {
                    name: "eth0".into(),
                    addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn iscsi_names_are_checked_as_rfc_3720_writes_them() {
        for good in
            ["iqn.1994-05.com.redhat:abc123", "iqn.2026-12.io.example", "eui.02004567A425678D", "naa.52004567BA64678D"]
        {
            assert!(is_initiator(good), "{good}");
        }
        for bad in [
            "",
            "iqn.",
            "iqn.1994-5.com.x",
            "iqn.1994-05",
            "iqn.1994-05.com.x y",
            "iqn.1994-05.com.X",
            "-Q",
            "eui.123",
            "naa.zz04567BA64678D0",
            "10.0.0.1",
        ] {
            assert!(!is_initiator(bad), "{bad}");
        }
        assert!(!is_initiator(&format!("iqn.2026-12.io.x:{}", "a".repeat(220))));
    }

    #[test]
    fn a_nodes_entries_follow_its_inventory_selector_and_networks() {
        let t = target(Clients::Addresses, &["10.0.0.0/8", "fd00::/8"]);
        let n =
            node("a", "", &["10.1.2.3/24", "192.168.1.1/24", "127.0.0.1/8", "fd00::5/64", "fe80::1/64", "junk"], "db");
        let (good, bad) = of_node(&t, &n);
        assert_eq!(good, ["10.1.2.3", "fd00::5"]);
        assert_eq!(bad.len(), 1);
        let all = target(Clients::Addresses, &[]);
        assert_eq!(of_node(&all, &n).0, ["10.1.2.3", "192.168.1.1", "fd00::5"]);
        let i = target(Clients::Initiators, &[]);
        let nodes = [
            node("a", "iqn.2026-12.io.example:a", &[], "db"),
            node("b", "iqn.2026-12.io.example:b", &[], "web"),
            node("c", "not an iqn; rm -rf /", &[], "db"),
            node("d", "", &[], "db"),
        ];
        let w = wanted(&i, &nodes);
        assert_eq!(w.into_iter().collect::<Vec<_>>(), [("iqn.2026-12.io.example:a".to_owned(), "a".to_owned())]);
    }
}
