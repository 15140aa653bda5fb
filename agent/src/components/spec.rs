//! Component specs: the desired state of a node's software. They come from the event center (as
//! `ComponentSpec` messages) or from a local TOML file; both are validated here, whole, before
//! anything acts on them: names, versions, repositories, hook commands, config paths (under one
//! of the allowed roots) and their owners (accounts of the target root), each component and each
//! package listed once. A spec with any defect changes nothing.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nodekeeper_proto::v1::{
    ComponentPackage, ComponentSpec, ConfigFile, ExecCheck, HealthCheck, Repository, RestartPolicy, health_check::Check,
};
use serde::Deserialize;

use super::accounts::Accounts;
use super::repository::repository;
use super::version::{Evr, package_name};

/// A local spec file (`components apply --spec`, or `components.spec_file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    #[serde(default)]
    pub component: Vec<TomlComponent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TomlComponent {
    /// Spanned: errors name the line where the component is.
    pub name: toml::Spanned<String>,
    pub package: String,
    /// epoch:version-release (not for an absent component).
    #[serde(default)]
    pub version: String,
    /// "present" (default) or "absent": the package removed.
    #[serde(default)]
    pub state: Option<String>,
    /// Components changed before this one (by name).
    #[serde(default)]
    pub after: Vec<String>,
    /// The longest one step may take, e.g. "15m".
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    pub step_timeout: Option<Duration>,
    #[serde(default)]
    pub repositories: Vec<TomlRepository>,
    #[serde(default)]
    pub config_files: Vec<TomlConfigFile>,
    #[serde(default)]
    pub unit: String,
    pub health_check: Option<TomlHealthCheck>,
    #[serde(default)]
    pub pre_hook: Vec<String>,
    #[serde(default)]
    pub post_hook: Vec<String>,
    /// "on-change" (default), "reload" (config changes reload the unit) or "never".
    #[serde(default)]
    pub restart_policy: Option<String>,
    /// More packages moved with `package` in one transaction and rolled back with it.
    #[serde(default)]
    pub with_packages: Vec<TomlPackage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TomlPackage {
    pub package: String,
    /// Empty: the component's version.
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TomlRepository {
    pub id: String,
    /// At least one of base_url, mirrorlist and metalink.
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub mirrorlist: String,
    #[serde(default)]
    pub metalink: String,
    #[serde(default)]
    pub gpg_check: bool,
    #[serde(default)]
    pub gpg_key_url: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub proxy: String,
    #[serde(default)]
    pub ssl_ca_cert: String,
    #[serde(default)]
    pub ssl_client_cert: String,
    #[serde(default)]
    pub ssl_client_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TomlConfigFile {
    pub path: PathBuf,
    pub content: String,
    /// Octal, e.g. "0644".
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub group: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TomlHealthCheck {
    #[serde(default)]
    pub unit_active: bool,
    pub http_url: Option<String>,
    pub command: Option<Vec<String>>,
    /// For an https:// URL: the CAs to trust (default: the node's trust store).
    #[serde(default)]
    pub ca_file: String,
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "nodekeeper_common::config::duration::option")]
    pub deadline: Option<Duration>,
}

/// Reads a local spec file into the same messages the center sends, with the checks that do not
/// depend on the node (see [`load_for_node`] for the rest).
pub fn load(path: &Path) -> Result<Vec<ComponentSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read spec file {}: {e}", path.display()))?;
    parse(path, &text)
}

/// Reads a local spec file and checks all of it for this node: config roots and the accounts
/// of the target root. Errors name the file and line of each component with a defect.
pub fn load_for_node(path: &Path, roots: &[PathBuf], accounts: &Accounts) -> Result<Vec<ComponentSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read spec file {}: {e}", path.display()))?;
    let (specs, lines) = parse_located(path, &text)?;
    match validate_all(&specs, roots, Some(accounts)) {
        Ok(_) => Ok(specs),
        Err(defects) => Err(at_lines(path, &lines, &defects)),
    }
}

/// Parses spec file text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Vec<ComponentSpec>, String> {
    parse_located(path, text).map(|(specs, _)| specs)
}

/// One defect of a spec: which component (its index) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    pub index: usize,
    pub message: String,
}

/// The defects, one per line, each as `file:line: message`.
fn at_lines(path: &Path, lines: &[usize], defects: &[Defect]) -> String {
    let each = defects
        .iter()
        .map(|d| format!("{}:{}: {}", path.display(), lines.get(d.index).copied().unwrap_or(0), d.message));
    each.collect::<Vec<_>>().join("\n")
}

/// The defects on one line, for a status or a log.
pub fn describe(defects: &[Defect]) -> String {
    defects.iter().map(|d| d.message.as_str()).collect::<Vec<_>>().join("; ")
}

/// The components and the line each begins on.
fn parse_located(path: &Path, text: &str) -> Result<(Vec<ComponentSpec>, Vec<usize>), String> {
    let f: SpecFile = nodekeeper_common::config::parse(path, text).map_err(|e| e.to_string())?;
    from_toml(path, text, f.component)
}

/// The `[[component]]` entries of a TOML file (`text`, read from `path`) as specs, checked as a
/// whole, with the line of each; for files that hold components among other keys (rollouts).
pub fn from_toml(
    path: &Path,
    text: &str,
    components: Vec<TomlComponent>,
) -> Result<(Vec<ComponentSpec>, Vec<usize>), String> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for c in components {
        let line = line_of(c.name.span().start);
        let at = |e: String| format!("{}:{line}: component {:?}: {e}", path.display(), c.name.get_ref());
        lines.push(line);
        let mut config_files = Vec::new();
        for f in &c.config_files {
            let mode = match &f.mode {
                None => 0o644,
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .map_err(|_| at(format!("config {:?}: mode {m:?} is not octal", f.path.display())))?,
            };
            config_files.push(ConfigFile {
                path: f.path.display().to_string(),
                content: f.content.clone().into_bytes(),
                mode,
                owner: f.owner.clone(),
                group: f.group.clone(),
            });
        }
        let health_check = match &c.health_check {
            None => None,
            Some(h) => {
                // One kind of check: a spec that names several would run only one of them.
                let check = match (&h.command, &h.http_url, h.unit_active) {
                    (Some(argv), None, false) => Check::Command(ExecCheck { argv: argv.clone() }),
                    (None, Some(url), false) => Check::HttpUrl(url.clone()),
                    (None, None, active) => Check::UnitActive(active),
                    _ => {
                        return Err(at(
                            "health_check: set one of command, http_url or unit_active (one check per component)"
                                .into(),
                        ));
                    }
                };
                Some(HealthCheck {
                    check: Some(check),
                    timeout: h.timeout.map(nodekeeper_common::time::to_duration),
                    deadline: h.deadline.map(nodekeeper_common::time::to_duration),
                    ca_file: h.ca_file.clone(),
                })
            }
        };
        let restart_policy = match c.restart_policy.as_deref() {
            None | Some("on-change") => RestartPolicy::OnChange,
            Some("reload") => RestartPolicy::Reload,
            Some("never") => RestartPolicy::Never,
            Some(other) => {
                return Err(at(format!("restart_policy {other:?}: expected \"on-change\", \"reload\" or \"never\"")));
            }
        };
        let absent = match c.state.as_deref() {
            None | Some("present") => false,
            Some("absent") => true,
            Some(other) => return Err(at(format!("state {other:?}: expected \"present\" or \"absent\""))),
        };
        let hook = |argv: &Vec<String>| (!argv.is_empty()).then(|| ExecCheck { argv: argv.clone() });
        out.push(ComponentSpec {
            name: c.name.get_ref().clone(),
            package: c.package.clone(),
            version: c.version.clone(),
            repositories: c
                .repositories
                .iter()
                .map(|r| Repository {
                    id: r.id.clone(),
                    base_url: r.base_url.clone(),
                    mirrorlist: r.mirrorlist.clone(),
                    metalink: r.metalink.clone(),
                    gpg_check: r.gpg_check,
                    gpg_key_url: r.gpg_key_url.clone(),
                    priority: r.priority,
                    exclude: r.exclude.clone(),
                    proxy: r.proxy.clone(),
                    ssl_ca_cert: r.ssl_ca_cert.clone(),
                    ssl_client_cert: r.ssl_client_cert.clone(),
                    ssl_client_key: r.ssl_client_key.clone(),
                })
                .collect(),
            config_files,
            systemd_unit: c.unit.clone(),
            health_check,
            pre_hook: hook(&c.pre_hook),
            post_hook: hook(&c.post_hook),
            restart_policy: restart_policy as i32,
            after: c.after.clone(),
            absent,
            step_timeout: c.step_timeout.map(nodekeeper_common::time::to_duration),
            with_packages: c
                .with_packages
                .iter()
                .map(|p| ComponentPackage { package: p.package.clone(), version: p.version.clone() })
                .collect(),
        });
    }
    let mut defects = unique(&out);
    defects.extend(order_defects(&out));
    if !defects.is_empty() {
        return Err(at_lines(path, &lines, &defects));
    }
    Ok((out, lines))
}

/// Each component and each package listed once: two entries for one package would move it
/// back and forth on every pass.
fn unique(specs: &[ComponentSpec]) -> Vec<Defect> {
    let mut defects = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        if let Some(first) = specs[..i].iter().find(|o| o.name == s.name) {
            let message =
                format!("component {:?} is listed twice (package {:?} and {:?})", s.name, first.package, s.package);
            defects.push(Defect { index: i, message });
            continue;
        }
        let mine = packages(s);
        for (j, p) in mine.iter().enumerate() {
            let message = if mine[..j].contains(p) {
                format!("component {:?}: package {p:?} is listed twice", s.name)
            } else if let Some(first) = specs[..i].iter().find(|o| packages(o).contains(p)) {
                format!("component {:?}: package {p:?} is already claimed by component {:?}", s.name, first.name)
            } else {
                continue;
            };
            defects.push(Defect { index: i, message });
        }
    }
    defects
}

/// Every package of a component: its own first, then `with_packages`.
pub fn packages(spec: &ComponentSpec) -> Vec<&str> {
    std::iter::once(spec.package.as_str()).chain(spec.with_packages.iter().map(|p| p.package.as_str())).collect()
}

/// A package of a component and the version it is to have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub package: String,
    pub evr: Evr,
}

/// Every package of a present component at its version, its own package first (None: the
/// component is absent, or a version does not parse; [`validate`] says which).
pub fn targets(spec: &ComponentSpec) -> Option<Vec<Target>> {
    if spec.absent {
        return None;
    }
    let own = Evr::parse(&spec.version).ok()?;
    let mut out = vec![Target { package: spec.package.clone(), evr: own.clone() }];
    for p in &spec.with_packages {
        let evr = if p.version.is_empty() { own.clone() } else { Evr::parse(&p.version).ok()? };
        out.push(Target { package: p.package.clone(), evr });
    }
    Some(out)
}

/// `after` names components of the spec, never the component itself, and makes no cycle.
fn order_defects(specs: &[ComponentSpec]) -> Vec<Defect> {
    let mut defects = Vec::new();
    for (index, s) in specs.iter().enumerate() {
        for a in &s.after {
            if a == &s.name || !specs.iter().any(|o| &o.name == a) {
                let message =
                    format!("component {:?}: after {a:?}: no other component of this spec has that name", s.name);
                defects.push(Defect { index, message });
            }
        }
    }
    if defects.is_empty() && order(specs).is_none() {
        let names: Vec<&str> = specs.iter().filter(|s| !s.after.is_empty()).map(|s| s.name.as_str()).collect();
        let message = format!("the `after` lists of {} make a cycle", names.join(", "));
        defects.push(Defect { index: 0, message });
    }
    defects
}

/// The order to change components in: each after the ones its `after` names, otherwise as
/// listed. None when the `after` lists make a cycle.
pub fn order(specs: &[ComponentSpec]) -> Option<Vec<usize>> {
    let mut done: Vec<usize> = Vec::new();
    while done.len() < specs.len() {
        let next = (0..specs.len()).find(|&i| {
            !done.contains(&i)
                && specs[i].after.iter().all(|a| {
                    specs.iter().enumerate().any(|(j, o)| &o.name == a && done.contains(&j))
                        || !specs.iter().any(|o| &o.name == a)
                })
        })?;
        done.push(next);
    }
    Some(done)
}

/// Checks a whole spec for this node: each component ([`validate`]), each component and package
/// once, and with `accounts`, the owners and groups of config files in the target root. Returns
/// each component's target version, or every defect found.
pub fn validate_all(
    specs: &[ComponentSpec],
    roots: &[PathBuf],
    accounts: Option<&Accounts>,
) -> Result<Vec<Option<Evr>>, Vec<Defect>> {
    let mut defects = unique(specs);
    defects.extend(order_defects(specs));
    let mut targets = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        match validate(spec, roots) {
            Ok(evr) => targets.push(evr),
            Err(message) => defects.push(Defect { index, message }),
        }
        for f in spec.config_files.iter().filter(|_| accounts.is_some()) {
            if let Some(Err(e)) = accounts.map(|a| a.ids(&f.owner, &f.group)) {
                defects.push(Defect { index, message: format!("component {:?}: config {:?}: {e}", spec.name, f.path) });
            }
        }
    }
    if defects.is_empty() { Ok(targets) } else { Err(defects) }
}

/// A systemd unit name.
fn unit_name(s: &str) -> Result<(), String> {
    let ok = s.len() <= 256
        && s.contains('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '\\'));
    if ok { Ok(()) } else { Err(format!("invalid systemd unit {s:?}")) }
}

/// A config path: absolute, without `..`, under one of `roots`.
pub fn config_path(path: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(format!("config path {path:?} must be absolute, without . or .."));
    }
    if !roots.iter().any(|r| p.starts_with(r) && p != *r) {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(format!("config path {path:?} is outside the allowed roots ({})", roots.join(", ")));
    }
    Ok(p)
}

/// Checks one component; the error names the component and what is wrong. Returns the version
/// to install (None: the package is to be absent).
pub fn validate(spec: &ComponentSpec, roots: &[PathBuf]) -> Result<Option<Evr>, String> {
    let what = |e: String| format!("component {:?}: {e}", spec.name);
    nodekeeper_common::names::component(&spec.name).map_err(|e| what(e.to_string()))?;
    package_name(&spec.package).map_err(what)?;
    for p in &spec.with_packages {
        package_name(&p.package).map_err(what)?;
    }
    if spec.absent {
        if !spec.version.is_empty()
            || spec.with_packages.iter().any(|p| !p.version.is_empty())
            || !spec.config_files.is_empty()
            || spec.health_check.is_some()
        {
            return Err(what("an absent component has no version, config files or health check".into()));
        }
        return Ok(None);
    }
    let evr = Evr::parse(&spec.version).map_err(what)?;
    for p in spec.with_packages.iter().filter(|p| !p.version.is_empty()) {
        Evr::parse(&p.version).map_err(|e| what(format!("package {:?}: {e}", p.package)))?;
    }
    for r in &spec.repositories {
        repository(r).map_err(what)?;
    }
    let mut seen = HashSet::new();
    for f in &spec.config_files {
        config_path(&f.path, roots).map_err(what)?;
        if !seen.insert(&f.path) {
            return Err(what(format!("config path {:?} is listed twice", f.path)));
        }
        if f.mode > 0o7777 {
            return Err(what(format!("config {:?}: mode {:o} is not a file mode", f.path, f.mode)));
        }
    }
    if !spec.systemd_unit.is_empty() {
        unit_name(&spec.systemd_unit).map_err(what)?;
    }
    for (hook, argv) in [("pre_hook", &spec.pre_hook), ("post_hook", &spec.post_hook)] {
        if let Some(h) = argv
            && (h.argv.is_empty() || !Path::new(&h.argv[0]).is_absolute())
        {
            return Err(what(format!("{hook}: the command must start with an absolute path")));
        }
    }
    if let Some(HealthCheck { check: Some(c), ca_file, .. }) = &spec.health_check {
        let https = matches!(c, Check::HttpUrl(u) if u.starts_with("https://"));
        if !ca_file.is_empty() && (!https || !Path::new(ca_file).is_absolute()) {
            return Err(what(format!("health_check.ca_file {ca_file:?}: an absolute path, for an https:// URL")));
        }
        match c {
            Check::Command(e) if e.argv.is_empty() || !Path::new(&e.argv[0]).is_absolute() => {
                return Err(what("health_check.command must start with an absolute path".into()));
            }
            Check::HttpUrl(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(what(format!("health_check.http_url {u:?}: an http:// or https:// URL")));
            }
            Check::UnitActive(true) if spec.systemd_unit.is_empty() => {
                return Err(what("health_check.unit_active needs a systemd unit".into()));
            }
            _ => {}
        }
    }
    Ok(Some(evr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_paths_stay_under_their_roots() {
        let roots = vec![PathBuf::from("/etc/nk-demo"), PathBuf::from("/etc/kubernetes")];
        config_path("/etc/nk-demo/demo.conf", &roots).unwrap();
        assert!(config_path("/etc/passwd", &roots).unwrap_err().contains("outside the allowed roots"));
        assert!(config_path("/etc/nk-demo/../passwd", &roots).unwrap_err().contains("without . or .."));
        assert!(config_path("etc/nk-demo/x", &roots).is_err());
        assert!(config_path("/etc/nk-demo", &roots).is_err(), "the root itself is not a file");
    }

    #[test]
    fn specs_are_validated() {
        let mut s = ComponentSpec {
            name: "demo".into(),
            package: "nk-demo".into(),
            version: "1.1-1".into(),
            systemd_unit: "nk-demo.service".into(),
            ..Default::default()
        };
        let roots = vec![PathBuf::from("/etc")];
        assert_eq!(validate(&s, &roots).unwrap().unwrap().to_string(), "0:1.1-1");
        s.version = "1.1".into();
        assert!(validate(&s, &roots).unwrap_err().contains("expected epoch:version-release"));
        s.version = "1.1-1".into();
        s.package = "nk-demo;reboot".into();
        assert!(validate(&s, &roots).unwrap_err().starts_with("component \"demo\": invalid package name"));
        s.package = "nk-demo".into();
        s.pre_hook = Some(ExecCheck { argv: vec!["rm".into()] });
        assert!(validate(&s, &roots).unwrap_err().contains("absolute path"));
        s.pre_hook = None;
        let check = |url: &str, ca: &str| HealthCheck {
            check: Some(Check::HttpUrl(url.into())),
            ca_file: ca.into(),
            ..Default::default()
        };
        s.health_check = Some(check("https://localhost:10250/healthz", "/var/lib/kubelet/pki/kubelet.crt"));
        validate(&s, &roots).unwrap();
        s.health_check = Some(check("http://localhost:10248/healthz", "/etc/ca.pem"));
        assert!(validate(&s, &roots).unwrap_err().contains("for an https:// URL"));
        s.health_check = Some(check("ftp://localhost/", ""));
        assert!(validate(&s, &roots).unwrap_err().contains("an http:// or https:// URL"));
        s.health_check = None;
        s.with_packages = vec![ComponentPackage { package: "kubeadm".into(), version: "1.1".into() }];
        assert!(validate(&s, &roots).unwrap_err().contains("package \"kubeadm\""));
        s.with_packages[0].version = String::new();
        let t = targets(&s).unwrap();
        assert_eq!((t[1].package.as_str(), t[1].evr.to_string()), ("kubeadm", "0:1.1-1".to_owned()));
    }
}
