//! Who this node is: its name, boot id and inventory, read from the configured /proc, /sys and
//! /etc roots so that tests can feed fixture trees.

use std::path::Path;

use nodekeeper_proto::v1::{Disk, Inventory, NetworkInterface};
use thiserror::Error;

use crate::config::Paths;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the hostname {hostname:?} is not a valid node name ({reason}); set node_name in the config")]
    BadHostname { hostname: String, reason: String },
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| IdentityError::Read { path: path.display().to_string(), source })
}

fn read_opt(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// The kernel's boot id: changes at every boot.
pub fn boot_id(paths: &Paths) -> Result<String, IdentityError> {
    read(&paths.proc.join("sys/kernel/random/boot_id"))
}

/// The configured node name, or the hostname lowercased.
pub fn node_name(configured: Option<&str>, paths: &Paths) -> Result<String, IdentityError> {
    if let Some(n) = configured {
        return Ok(n.to_owned());
    }
    let hostname = read(&paths.proc.join("sys/kernel/hostname"))?;
    let name = hostname.to_ascii_lowercase();
    nodekeeper_common::names::node(&name)
        .map_err(|e| IdentityError::BadHostname { hostname: hostname.clone(), reason: e.why.to_owned() })?;
    Ok(name)
}

/// The node's inventory. Parts that cannot be read are left empty rather than failing: an
/// inventory with a missing disk model is still worth sending.
pub fn inventory(paths: &Paths) -> Inventory {
    let proc = &paths.proc;
    let (cpu_model, cpu_count) = cpu(proc);
    let (os_name, os_version) = os_release(&paths.etc);
    Inventory {
        hostname: read_opt(&proc.join("sys/kernel/hostname")).unwrap_or_default(),
        interfaces: interfaces(&paths.sys),
        kernel_version: read_opt(&proc.join("sys/kernel/osrelease")).unwrap_or_default(),
        os_name,
        os_version,
        cpu_model,
        cpu_count,
        memory_bytes: memory(proc),
        disks: disks(&paths.sys),
        iscsi_initiator_name: iscsi(&paths.etc),
        machine_id: read_opt(&paths.etc.join("machine-id")).unwrap_or_default(),
    }
}

fn cpu(proc: &Path) -> (String, u32) {
    let text = read_opt(&proc.join("cpuinfo")).unwrap_or_default();
    let mut model = String::new();
    let mut count = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        match k.trim() {
            "processor" => count += 1,
            "model name" if model.is_empty() => model = v.trim().to_owned(),
            _ => {}
        }
    }
    (model, count)
}

fn memory(proc: &Path) -> u64 {
    let text = read_opt(&proc.join("meminfo")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

fn os_release(etc: &Path) -> (String, String) {
    let text = read_opt(&etc.join("os-release")).unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    (field("NAME"), field("VERSION_ID"))
}

fn iscsi(etc: &Path) -> String {
    read_opt(&etc.join("iscsi/initiatorname.iscsi"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.trim().strip_prefix("InitiatorName="))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Interfaces from /sys/class/net (names, MACs), with their addresses from getifaddrs. Addresses
/// come from the running kernel, not the fixture root: there is no file form of them.
fn interfaces(sys: &Path) -> Vec<NetworkInterface> {
    let mut out: Vec<NetworkInterface> = Vec::new();
    let Ok(dir) = std::fs::read_dir(sys.join("class/net")) else { return out };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let mac = read_opt(&entry.path().join("address")).unwrap_or_default();
        out.push(NetworkInterface { name, mac, addresses: Vec::new() });
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(iface) = out.iter_mut().find(|i| i.name == a.interface_name) else { continue };
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else { continue };
            if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                iface.addresses.push(format!("{}/{}", ip.ip(), u32::from(m.ip()).count_ones()));
            } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                let prefix: u32 = m.ip().octets().iter().map(|b| b.count_ones()).sum();
                iface.addresses.push(format!("{}/{}", ip.ip(), prefix));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for i in &mut out {
        i.addresses.sort();
    }
    out
}

fn disks(sys: &Path) -> Vec<Disk> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(sys.join("block")) else { return out };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "dm-", "sr", "nbd"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let p = entry.path();
        let sectors: u64 = read_opt(&p.join("size")).and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push(Disk {
            name,
            size_bytes: sectors * 512,
            model: read_opt(&p.join("device/model")).unwrap_or_default(),
            serial: read_opt(&p.join("device/serial")).unwrap_or_default(),
            rotational: read_opt(&p.join("queue/rotational")).is_some_and(|r| r == "1"),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn reads_a_fixture_host() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "proc/sys/kernel/hostname", "Worker-17\n");
        write(r, "proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        write(r, "proc/sys/kernel/random/boot_id", "0b7c2b2e-7a3d-4bb8-9a52-9f0f1a1c2d3e\n");
        write(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n",
        );
        write(r, "proc/meminfo", "MemTotal:       16384000 kB\nMemFree:         1000 kB\n");
        write(r, "etc/os-release", "NAME=\"Rocky Linux\"\nVERSION_ID=\"9.3\"\n");
        write(r, "etc/iscsi/initiatorname.iscsi", "## comment\nInitiatorName=iqn.1994-05.com.redhat:abc123\n");
        write(r, "etc/machine-id", "deadbeef\n");
        write(r, "sys/block/sda/size", "2000000\n");
        write(r, "sys/block/sda/device/model", "SAMSUNG MZ7\n");
        write(r, "sys/block/sda/queue/rotational", "0\n");
        write(r, "sys/block/loop0/size", "8\n");
        write(r, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        let paths = Paths { proc: r.join("proc"), sys: r.join("sys"), etc: r.join("etc"), kmsg: r.join("kmsg") };
        assert_eq!(node_name(None, &paths).unwrap(), "worker-17");
        assert_eq!(boot_id(&paths).unwrap(), "0b7c2b2e-7a3d-4bb8-9a52-9f0f1a1c2d3e");
        let inv = inventory(&paths);
        assert_eq!(inv.hostname, "Worker-17");
        assert_eq!(inv.kernel_version, "6.1.0-18-amd64");
        assert_eq!((inv.cpu_model.as_str(), inv.cpu_count), ("AMD EPYC 7B13", 2));
        assert_eq!(inv.memory_bytes, 16_384_000 * 1024);
        assert_eq!((inv.os_name.as_str(), inv.os_version.as_str()), ("Rocky Linux", "9.3"));
        assert_eq!(inv.iscsi_initiator_name, "iqn.1994-05.com.redhat:abc123");
        assert_eq!(inv.disks.len(), 1, "loop devices are not disks");
        assert_eq!((inv.disks[0].size_bytes, inv.disks[0].rotational), (2_000_000 * 512, false));
        assert_eq!(inv.interfaces[0].mac, "52:54:00:12:34:56");
    }

    #[test]
    fn invalid_hostname_asks_for_node_name() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "proc/sys/kernel/hostname", "bad_host\n");
        let paths = Paths { proc: t.path().join("proc"), ..Paths::default() };
        let e = node_name(None, &paths).unwrap_err().to_string();
        assert!(e.contains("node_name"), "{e}");
    }
}
