//! tgt, the Linux SCSI target framework's userspace target: a target's ACL through `tgtadm`,
//! initiator names bound with `-Q`, addresses with `-I`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::config::Clients;

pub struct Tgt {
    pub tid: u32,
    pub control_port: Option<u16>,
    pub tgtadm: PathBuf,
}

impl Tgt {
    fn args(&self, op: &str) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = self.control_port {
            a.extend(["-C".to_owned(), p.to_string()]);
        }
        a.extend(["--lld", "iscsi", "--mode", "target", "--op", op].map(str::to_owned));
        a
    }

    pub async fn list(&self) -> Result<BTreeSet<String>, String> {
        let out = super::run(&self.tgtadm, &self.args("show")).await?;
        acl(&out, self.tid).ok_or_else(|| format!("tgt has no target with tid {}", self.tid))
    }

    /// `bind` or `unbind` one entry; one already bound, or already gone, is no error.
    pub async fn change(&self, op: &str, clients: Clients, entry: &str) -> Result<(), String> {
        let flag = match clients {
            Clients::Initiators => "--initiator-name",
            Clients::Addresses => "--initiator-address",
        };
        let mut args = self.args(op);
        args.extend(["--tid".to_owned(), self.tid.to_string(), flag.to_owned(), entry.to_owned()]);
        match super::run(&self.tgtadm, &args).await {
            Ok(_) => Ok(()),
            Err(e) if op == "bind" && e.contains("already exists") => Ok(()),
            Err(e) if op == "unbind" && e.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The ACL of target `tid` in `tgtadm --op show --mode target` output: the lines under its
/// "ACL information:", one entry each. None when there is no such target.
fn acl(show: &str, tid: u32) -> Option<BTreeSet<String>> {
    let header = format!("Target {tid}:");
    let mut lines = show.lines().skip_while(|l| !l.starts_with(&header));
    lines.next()?;
    let mut out = BTreeSet::new();
    let mut in_acl = false;
    for line in lines.take_while(|l| !l.starts_with("Target ")) {
        let indent = line.len() - line.trim_start().len();
        if indent == 4 {
            in_acl = line.trim() == "ACL information:";
        } else if in_acl && indent > 4 && !line.trim().is_empty() {
            out.insert(line.trim().to_owned());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As tgtadm 1.0.85 prints it (LUN details cut).
    const SHOW: &str = "Target 1: iqn.2026-12.io.nodekeeper:vol1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
        10.1.2.3
        iqn.2026-12.io.example:nodea
Target 2: iqn.2026-12.io.nodekeeper:vol2
    System information:
        Driver: iscsi
    Account information:
    ACL information:
        ALL
";

    #[test]
    fn a_targets_acl_is_read_from_tgtadm_show() {
        let one: Vec<_> = acl(SHOW, 1).unwrap().into_iter().collect();
        assert_eq!(one, ["10.1.2.3", "iqn.2026-12.io.example:nodea"]);
        assert_eq!(acl(SHOW, 2).unwrap().into_iter().collect::<Vec<_>>(), ["ALL"]);
        assert_eq!(acl(SHOW, 3), None);
        assert_eq!(acl("Target 1: x\n    ACL information:\n", 1).unwrap().len(), 0);
    }
}
