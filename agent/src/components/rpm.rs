//! The package tools: `rpm` to read what is installed, `dnf` to change it. Always an argument
//! vector (never a shell), every name and version validated first, one transaction at a time, an
//! optional installroot (the whole path testable without touching the machine's own packages).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::{Flock, FlockArg};
use nodekeeper_proto::v1::Repository;
use tokio::sync::Mutex;

use super::lock::VersionLock;
use super::repository::{repository, repository_section};
use super::version::{Evr, package_name};

/// Why a package tool failed; `Unchanged` errors left the system as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolError {
    RepositoryUnreachable(String),
    PackageMissing(String),
    DependencyConflict(String),
    Timeout(String),
    Failed(String),
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolError::RepositoryUnreachable(m) => write!(f, "repository unreachable: {m}"),
            ToolError::PackageMissing(m) => write!(f, "package or version not found: {m}"),
            ToolError::DependencyConflict(m) => write!(f, "dependency conflict: {m}"),
            ToolError::Timeout(m) => write!(f, "timed out: {m}"),
            ToolError::Failed(m) => write!(f, "{m}"),
        }
    }
}

/// What a transaction does to a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Install,
    Upgrade,
    Downgrade,
    Reinstall,
    Remove,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Install => "install",
            Verb::Upgrade => "upgrade",
            Verb::Downgrade => "downgrade",
            Verb::Reinstall => "reinstall",
            Verb::Remove => "remove",
        }
    }

    /// The verb that takes a package from `from` to `to`.
    pub fn between(from: Option<&Evr>, to: &Evr) -> Option<Verb> {
        match from {
            None => Some(Verb::Install),
            Some(f) if f < to => Some(Verb::Upgrade),
            Some(f) if f > to => Some(Verb::Downgrade),
            Some(_) => None,
        }
    }

    /// One verb for a transaction that moves several packages: theirs when they agree, else
    /// `install` (dnf installs explicit versions as upgrades or downgrades, as each needs).
    pub fn combined(verbs: impl IntoIterator<Item = Verb>) -> Option<Verb> {
        verbs.into_iter().reduce(|a, b| if a == b { a } else { Verb::Install })
    }
}

/// The descriptor number the transaction lock has in dnf (any number dnf does not use itself).
const LOCK_FD: i32 = 200;

pub struct Tools {
    pub rpm: PathBuf,
    pub dnf: PathBuf,
    pub installroot: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub releasever: String,
    pub timeout: Duration,
    /// A command prefix for dnf transactions (empty: dnf runs as the agent's child).
    runner: Vec<String>,
    /// The unit the runner names (`systemd-run --unit=NAME`): a transaction of an earlier run
    /// is still going while it is active, whether or not that run's agent is alive.
    runner_unit: Option<String>,
    /// systemctl, to ask for that unit's state.
    systemctl: PathBuf,
    /// One transaction at a time on this node.
    lock: Mutex<()>,
    /// One transaction at a time on this root, across restarts: a dnf holds an exclusive flock
    /// on this file, inherited from the agent, until it exits, even when the agent that started
    /// it was killed.
    lock_file: PathBuf,
    /// The node's version lock, lifted for the agent's own transactions.
    pub version_lock: Option<VersionLock>,
    /// dnf's configuration in the target root, and the one dnf reads while the root has none
    /// (the host's, for an installroot).
    pub dnf_conf: PathBuf,
    pub dnf_conf_fallback: Option<PathBuf>,
    /// The configuration a transaction with the spec's repositories runs with: the node's, and
    /// the repositories (dnf's command line cannot add a repository by mirrorlist or metalink).
    transaction_conf: PathBuf,
}

impl Tools {
    /// `state`: the component manager's folder (dnf's cache and the transaction lock go there).
    pub fn new(
        rpm: PathBuf,
        dnf: PathBuf,
        installroot: Option<PathBuf>,
        state: &Path,
        releasever: String,
        timeout: Duration,
    ) -> Tools {
        let conf = Path::new("/etc/dnf/dnf.conf");
        let dnf_conf = match &installroot {
            Some(root) => root.join(conf.strip_prefix("/").unwrap_or(conf)),
            None => conf.to_owned(),
        };
        Tools {
            dnf_conf,
            dnf_conf_fallback: installroot.is_some().then(|| conf.to_owned()),
            transaction_conf: state.join("dnf.conf"),
            rpm,
            dnf,
            installroot,
            cache_dir: state.join("dnf-cache"),
            releasever,
            timeout,
            runner: Vec::new(),
            runner_unit: None,
            systemctl: "systemctl".into(),
            lock: Mutex::new(()),
            lock_file: state.join("transaction.lock"),
            version_lock: None,
        }
    }

    /// Takes the root's transaction lock, waiting (up to the step timeout) for a transaction
    /// that an earlier run of the agent started and that outlived it; `waited` is told once when
    /// there is one.
    pub async fn transaction_lock(
        &self,
        waited: &mut (dyn FnMut(String) + Send),
    ) -> Result<Flock<std::fs::File>, ToolError> {
        let failed = |e: String| ToolError::Failed(format!("transaction lock {}: {e}", self.lock_file.display()));
        if let Some(dir) = self.lock_file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut told = false;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.lock_file)
                .map_err(|e| failed(e.to_string()))?;
            let running = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => match self.runner_unit_state().await {
                    Some(state) => format!("unit {} is {state}", self.runner_unit.as_deref().unwrap_or_default()),
                    None => return Ok(lock),
                },
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => "it holds the transaction lock".into(),
                Err((_, e)) => return Err(failed(e.to_string())),
            };
            if !told {
                waited(format!(
                    "a package transaction started by an earlier run is still running on this root ({running}); waiting for it to end"
                ));
                told = true;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ToolError::Timeout(format!(
                    "the transaction an earlier run started did not end within {}",
                    humantime::format_duration(self.timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs every change of the rpm database (dnf transactions, `rpm -e --justdb`) through this
    /// command prefix (e.g. `systemd-run --unit=nodekeeper-transaction --wait --pipe --collect
    /// --quiet --`), so that it runs outside the agent's own sandbox. When the prefix names a
    /// unit, `systemctl` is asked whether one an earlier run started is still active.
    pub fn with_runner(mut self, runner: Vec<String>, systemctl: PathBuf) -> Tools {
        let named = runner.iter().position(|a| a == "--unit" || a == "-u").and_then(|i| runner.get(i + 1));
        let unit = runner.iter().find_map(|a| a.strip_prefix("--unit=")).or(named.map(String::as_str));
        self.runner_unit = unit.map(|u| if u.contains('.') { u.to_owned() } else { format!("{u}.service") });
        self.runner = runner;
        self.systemctl = systemctl;
        self
    }

    /// The runner's unit's state while it is running (None: no unit named, or not running).
    async fn runner_unit_state(&self) -> Option<String> {
        let unit = self.runner_unit.as_ref()?;
        let mut cmd = tokio::process::Command::new(&self.systemctl);
        cmd.args(["show", "--property=ActiveState", "--value", unit]);
        let (_, out, _) = self.run(cmd, "systemctl show").await.ok()?;
        let state = out.trim();
        matches!(state, "active" | "activating" | "deactivating" | "reloading").then(|| state.to_owned())
    }

    /// Keeps the packages of the node's components locked at their versions (see [`VersionLock`]).
    pub fn with_version_lock(mut self, lock: VersionLock) -> Tools {
        self.version_lock = Some(lock);
        self
    }

    /// A command that changes the rpm database, behind the runner when there is one.
    fn changing_command(&self, program: &Path) -> tokio::process::Command {
        match self.runner.split_first() {
            Some((runner, args)) => {
                let mut cmd = tokio::process::Command::new(runner);
                cmd.args(args).arg(program);
                cmd
            }
            None => tokio::process::Command::new(program),
        }
    }

    /// The installed version of each of `packages` that is installed (the newest, when rpm's
    /// database holds several).
    pub async fn installed(&self, packages: &[&str]) -> Result<HashMap<String, Evr>, ToolError> {
        let all = self.versions(packages).await?;
        Ok(all.into_iter().filter_map(|(name, v)| v.into_iter().max().map(|e| (name, e))).collect())
    }

    /// Every version of each of `packages` that rpm's database holds, oldest first. More than
    /// one for a component's package means an interrupted transaction (or a kernel).
    pub async fn versions(&self, packages: &[&str]) -> Result<HashMap<String, Vec<Evr>>, ToolError> {
        let mut cmd = tokio::process::Command::new(&self.rpm);
        if let Some(root) = &self.installroot {
            cmd.arg("--root").arg(root);
        }
        cmd.args(["-q", "--qf", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n"]);
        for p in packages {
            package_name(p).map_err(ToolError::Failed)?;
            cmd.arg(p);
        }
        let (_, out, err) = self.run(cmd, "rpm -q").await?;
        let mut found: HashMap<String, Vec<Evr>> = HashMap::new();
        for line in out.lines() {
            if let Some((name, evr)) = line.split_once('\t')
                && let Ok(evr) = Evr::parse(evr)
            {
                found.entry(name.to_owned()).or_default().push(evr);
            }
        }
        found.values_mut().for_each(|v| v.sort());
        // rpm exits non-zero when a package is not installed; anything else is an error.
        if found.is_empty() && !packages.is_empty() && !out.contains("is not installed") && !err.is_empty() {
            return Err(ToolError::Failed(format!("rpm -q: {}", err.trim())));
        }
        Ok(found)
    }

    /// One dnf transaction: `verb` each package at its version (ignored for Remove) from `repos`
    /// (none: the system's repositories).
    pub async fn transaction(
        &self,
        verb: Verb,
        packages: &[(&str, &Evr)],
        repos: &[Repository],
        timeout: Duration,
    ) -> Result<(), ToolError> {
        for (package, _) in packages {
            package_name(package).map_err(ToolError::Failed)?;
        }
        for r in repos {
            repository(r).map_err(ToolError::Failed)?;
        }
        let _one = self.lock.lock().await;
        let lock = self.transaction_lock(&mut |line| tracing::warn!("{line}")).await?;
        let mut cmd = self.changing_command(&self.dnf);
        // dnf holds the lock for as long as it lives, also if the agent is killed meanwhile.
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: lock.as_fd().try_clone_to_owned().map_err(|e| ToolError::Failed(e.to_string()))?,
            child_fd: LOCK_FD,
        }])
        .map_err(|e| ToolError::Failed(format!("passing the transaction lock to dnf: {e}")))?;
        cmd.args(["-y", "--quiet", "--setopt=install_weak_deps=False"]);
        cmd.arg(format!("--setopt=cachedir={}", self.cache_dir.display()));
        if let Some(root) = &self.installroot {
            cmd.arg(format!("--installroot={}", root.display()));
            if !self.releasever.is_empty() {
                cmd.arg(format!("--releasever={}", self.releasever));
            }
        }
        // The spec's repositories join the node's (or the root's) enabled ones, which
        // dependencies may come from: the node's configuration with the repositories added.
        if !repos.is_empty() {
            let node = super::lock::read_first(std::iter::once(&self.dnf_conf).chain(&self.dnf_conf_fallback))
                .map_err(ToolError::Failed)?
                .map(|(text, _)| text)
                .unwrap_or_default();
            let text: String = std::iter::once(node).chain(repos.iter().map(repository_section)).collect();
            super::files::write_atomic(&self.transaction_conf, text.as_bytes(), 0o600, (None, None))
                .map_err(ToolError::Failed)?;
            cmd.arg(format!("--config={}", self.transaction_conf.display()));
        }
        // The version lock holds against every other dnf run, not against the agent's own. A
        // leading empty item clears the configured list (dnf appends command-line list values).
        if let Some(others) = self.version_lock.as_ref().and_then(|l| l.others_excluded()) {
            cmd.arg(format!("--setopt=excludepkgs=,{}", others.join(",")));
        }
        cmd.arg(verb.as_str());
        let args: Vec<String> =
            packages.iter().map(|(p, evr)| if verb == Verb::Remove { (*p).to_owned() } else { evr.nevr(p) }).collect();
        cmd.args(&args);
        let what = format!("dnf {} {}", verb.as_str(), args.join(" "));
        let (ok, out, err) = self.run_for(cmd, &what, timeout).await?;
        if ok {
            return Ok(());
        }
        Err(classify(&format!("{err}\n{out}"), &what))
    }

    /// Removes one version's record from rpm's database, leaving files and scripts alone: the
    /// repair of a transaction cut short, which left both versions recorded.
    pub async fn forget(&self, package: &str, evr: &Evr) -> Result<(), ToolError> {
        package_name(package).map_err(ToolError::Failed)?;
        let _one = self.lock.lock().await;
        let _lock = self.transaction_lock(&mut |line| tracing::warn!("{line}")).await?;
        let mut cmd = self.changing_command(&self.rpm);
        if let Some(root) = &self.installroot {
            cmd.arg("--root").arg(root);
        }
        cmd.args(["-e", "--justdb", "--nodeps", "--noscripts", "--notriggers"]);
        // name-version-release: rpm -e does not take an epoch.
        cmd.arg(format!("{package}-{}-{}", evr.version, evr.release));
        let what = format!("rpm -e --justdb {package}-{}", evr);
        match self.run(cmd, &what).await? {
            (true, _, _) => Ok(()),
            (false, out, err) => Err(ToolError::Failed(format!("{what}: {}", format!("{err}{out}").trim()))),
        }
    }

    /// The files of `package` that do not verify (`rpm -V`): content, size, mode, owner or
    /// missing. Config files are left out: the component's own config is managed (and compared)
    /// by the manager, and a package's other config files may be edited on purpose.
    pub async fn verify(&self, package: &str) -> Result<Vec<String>, ToolError> {
        package_name(package).map_err(ToolError::Failed)?;
        let mut cmd = tokio::process::Command::new(&self.rpm);
        if let Some(root) = &self.installroot {
            cmd.arg("--root").arg(root);
        }
        cmd.args(["-V", "--nodeps", "--noscripts", package]);
        let (_, out, err) = self.run(cmd, "rpm -V").await?;
        if out.trim().is_empty() && !err.trim().is_empty() {
            return Err(ToolError::Failed(format!("rpm -V {package}: {}", err.trim())));
        }
        // "S.5....T.  c /etc/x" or "missing   /usr/bin/y": the attributes, a file class, the path.
        Ok(out
            .lines()
            .filter(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                !(fields.len() == 3 && fields[1] == "c")
            })
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    async fn run(&self, cmd: tokio::process::Command, what: &str) -> Result<(bool, String, String), ToolError> {
        self.run_for(cmd, what, self.timeout).await
    }

    async fn run_for(
        &self,
        mut cmd: tokio::process::Command,
        what: &str,
        timeout: Duration,
    ) -> Result<(bool, String, String), ToolError> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        cmd.env("LC_ALL", "C");
        let child = cmd.spawn().map_err(|e| ToolError::Failed(format!("cannot run {what}: {e}")))?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                ToolError::Timeout(format!("{what} did not finish within {}", humantime::format_duration(timeout)))
            })?
            .map_err(|e| ToolError::Failed(format!("{what}: {e}")))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// A path inside the installroot.
    pub fn path(&self, p: &Path) -> PathBuf {
        match &self.installroot {
            Some(root) => root.join(p.strip_prefix("/").unwrap_or(p)),
            None => p.to_owned(),
        }
    }
}

/// dnf's messages, sorted into the errors an operator acts on differently.
fn classify(text: &str, what: &str) -> ToolError {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Last metadata") && !l.starts_with("Dependencies resolved"))
        .unwrap_or("no output")
        .to_owned();
    let detail = format!("{what}: {first}");
    if text.contains("Failed to download metadata")
        || text.contains("Cannot download repomd.xml")
        || text.contains("Curl error")
    {
        ToolError::RepositoryUnreachable(detail)
    } else if text.contains("No match for argument")
        || text.contains("No package")
        || text.contains("Unable to find a match")
        || text.contains("No packages marked for")
    {
        ToolError::PackageMissing(detail)
    } else if text.contains("nothing provides") || text.contains("conflicts with") || text.contains("Problem:") {
        let problem = text
            .lines()
            .map(str::trim)
            .find(|l| l.contains("nothing provides") || l.contains("conflicts with"))
            .unwrap_or(&first);
        ToolError::DependencyConflict(format!("{what}: {problem}"))
    } else {
        ToolError::Failed(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_run_behind_the_runner() {
        let tools = Tools::new(
            "rpm".into(),
            "/usr/bin/dnf".into(),
            None,
            Path::new("/c"),
            String::new(),
            Duration::from_secs(1),
        );
        assert_eq!(tools.changing_command(&tools.dnf).as_std().get_program(), "/usr/bin/dnf");
        let runner = ["systemd-run", "--unit=nk-tx", "--wait", "--pipe", "--"].map(String::from).to_vec();
        let tools = tools.with_runner(runner, "systemctl".into());
        let cmd = tools.changing_command(Path::new("rpm"));
        assert_eq!(cmd.as_std().get_program(), "systemd-run");
        let args: Vec<_> = cmd.as_std().get_args().collect();
        assert_eq!(args, ["--unit=nk-tx", "--wait", "--pipe", "--", "rpm"]);
        assert_eq!(tools.runner_unit.as_deref(), Some("nk-tx.service"));
    }

    /// A transaction an earlier run started as a transient unit outlives that run's agent and
    /// its lock (systemd-run does not pass descriptors on): the next one waits for the unit.
    #[tokio::test]
    async fn the_lock_waits_for_the_runners_unit_of_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("running");
        let systemctl = dir.path().join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\n[ \"$*\" = \"show --property=ActiveState --value nk-tx.service\" ] || exit 1\n\
                 if [ -e {} ]; then echo active; else echo inactive; fi\n",
                running.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(&running, "").unwrap();
        let runner = ["systemd-run", "--unit", "nk-tx", "--"].map(String::from).to_vec();
        let tools = Tools::new("rpm".into(), "dnf".into(), None, dir.path(), String::new(), Duration::from_secs(60))
            .with_runner(runner, systemctl);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tools = &tools;
        let waiting = async move {
            let locked = tools.transaction_lock(&mut |line| tx.send(line).unwrap()).await.map(drop);
            drop(tx);
            locked
        };
        let ended = async {
            let told = rx.recv().await.expect("the lock waited for the unit");
            assert!(told.contains("unit nk-tx.service is active"), "{told}");
            std::fs::remove_file(&running).unwrap();
        };
        let (locked, ()) = tokio::join!(waiting, ended);
        locked.unwrap();
    }

    #[test]
    fn verbs_follow_rpm_order() {
        let v = |s| Evr::parse(s).unwrap();
        assert_eq!(Verb::between(None, &v("1.0-1")), Some(Verb::Install));
        assert_eq!(Verb::between(Some(&v("1.0-1")), &v("1.1-1")), Some(Verb::Upgrade));
        assert_eq!(Verb::between(Some(&v("1:1.0-1")), &v("2.0-1")), Some(Verb::Downgrade));
        assert_eq!(Verb::between(Some(&v("1.0-1")), &v("0:1.0-1")), None);
    }

    #[test]
    fn dnf_messages_are_classified() {
        assert!(matches!(
            classify("Error: Failed to download metadata for repo 'nk': Cannot download repomd.xml", "x"),
            ToolError::RepositoryUnreachable(_)
        ));
        assert!(matches!(
            classify("No match for argument: nk-demo-9.9-1\nError: Unable to find a match: nk-demo-9.9-1", "x"),
            ToolError::PackageMissing(_)
        ));
        let c = classify(
            "Error: \n Problem: conflicting requests\n  - nothing provides libfoo >= 2 needed by nk-demo-1.2-1.noarch",
            "x",
        );
        assert_eq!(
            c,
            ToolError::DependencyConflict("x: - nothing provides libfoo >= 2 needed by nk-demo-1.2-1.noarch".into())
        );
    }
}
