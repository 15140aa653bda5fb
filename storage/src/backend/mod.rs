//! The storage systems a list lives on. Each reads the whole list and applies a pass's additions
//! and removals; adding what is there or removing what is not is not an error (passes repeat).

mod command;
mod ganesha;
mod ontap;
mod tgt;

use std::collections::BTreeSet;
use std::time::Duration;

use crate::config::{self, Clients};

pub use command::Command;
pub use ganesha::Ganesha;
pub use ontap::Ontap;
pub use tgt::Tgt;

pub enum Backend {
    Tgt(Tgt),
    Ganesha(Ganesha),
    Ontap(Ontap),
    Command(Command),
}

impl Backend {
    pub fn new(t: &config::Target) -> Result<Backend, String> {
        Ok(match &t.backend {
            config::Backend::Tgt { tid, control_port, tgtadm } => {
                Backend::Tgt(Tgt { tid: *tid, control_port: *control_port, tgtadm: tgtadm.clone() })
            }
            config::Backend::Ganesha { config, pid_file, access_type } => Backend::Ganesha(Ganesha {
                name: t.name.clone(),
                config: config.clone(),
                pid_file: pid_file.clone(),
                access_type: access_type.clone(),
            }),
            config::Backend::Ontap { url, svm, igroup, export_policy, rule_index, username, password_file, ca } => {
                let object = match (igroup, export_policy) {
                    (Some(g), _) => ontap::Object::Igroup(g.clone()),
                    (None, p) => {
                        ontap::Object::ExportRule { policy: p.clone().unwrap_or_default(), index: *rule_index }
                    }
                };
                Backend::Ontap(Ontap {
                    base: reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?,
                    svm: svm.clone(),
                    object,
                    username: username.clone(),
                    password_file: password_file.clone(),
                    http: Ontap::client(ca.as_deref())?,
                })
            }
            config::Backend::Command { list, add, remove } => {
                Backend::Command(Command { list: list.clone(), add: add.clone(), remove: remove.clone() })
            }
        })
    }

    /// Every entry on the target (of either kind where it holds both).
    pub async fn list(&self) -> Result<BTreeSet<String>, String> {
        match self {
            Backend::Tgt(b) => b.list().await,
            Backend::Ganesha(b) => b.list(),
            Backend::Ontap(b) => b.list().await,
            Backend::Command(b) => b.list().await,
        }
    }

    /// Adds `add` and removes `remove`: the outcome of each, additions first. Entry by entry
    /// where the storage changes one at a time; the whole list at once where it is one file.
    pub async fn apply(&self, clients: Clients, add: &[String], remove: &[String]) -> Vec<Result<(), String>> {
        let mut out = Vec::with_capacity(add.len() + remove.len());
        match self {
            Backend::Tgt(b) => {
                for e in add {
                    out.push(b.change("bind", clients, e).await);
                }
                for e in remove {
                    out.push(b.change("unbind", clients, e).await);
                }
            }
            Backend::Command(b) => {
                for e in add {
                    out.push(b.run(&b.add, e).await);
                }
                for e in remove {
                    out.push(b.run(&b.remove, e).await);
                }
            }
            Backend::Ontap(b) => out = b.apply(add, remove).await,
            Backend::Ganesha(b) => {
                let written = b.list().and_then(|mut list| {
                    list.extend(add.iter().cloned());
                    list.retain(|e| !remove.contains(e));
                    b.write(&list)
                });
                out.resize(add.len() + remove.len(), written);
            }
        }
        out
    }
}

/// How long one command of a backend may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a program (no shell) and returns its standard output, or what it said when it failed.
async fn run(program: &std::path::Path, args: &[String]) -> Result<String, String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{} did not finish within {COMMAND_TIMEOUT:?}", program.display()))?
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if out.status.success() {
        return String::from_utf8(out.stdout).map_err(|_| format!("{} printed no UTF-8", program.display()));
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = if said.trim().is_empty() { String::from_utf8_lossy(&out.stdout) } else { said };
    Err(format!("{} {} failed ({}): {}", program.display(), args.join(" "), out.status, said.trim()))
}
