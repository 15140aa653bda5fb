//! The RPMs: built by scripts/build-rpms.sh from this checkout (with the debug binaries the suite
//! already built), installed with the real `dnf --installroot`, scriptlets and all; an upgrade to a
//! newer build keeps an edited config; removal keeps it too, as `.rpmsave`.
//!
//! An empty installroot has no shell, no libc and no useradd for the scriptlets and the binaries'
//! dependencies: the test packages this machine's own (dash, getent, groupadd, useradd and the
//! libraries they load, a minimal /etc) as a base RPM, so the transaction resolves and runs as on
//! a real system. rpm runs the scriptlets chrooted into the installroot, which needs root (as CI
//! has).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nodekeeper_tests::{bin, rpm_installed};

fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Runs a command to its end (a synchronous test: blocking is what it wants) and returns its output.
#[allow(clippy::disallowed_methods)]
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Builds the RPMs of `src` (a checkout) as `release` into `repo`.
fn build_rpms(src: &Path, release: &str, repo: &Path) {
    let bin_dir = bin("nodekeeper-agent").parent().unwrap().to_owned();
    run(Command::new(src.join("scripts/build-rpms.sh"))
        .args(["--release", release, "--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(repo));
}

/// The base system of the installroot, from this machine's files (see the module doc).
fn build_base_rpm(work: &Path, repo: &Path) {
    let programs = ["/usr/bin/dash", "/usr/bin/getent", "/usr/sbin/groupadd", "/usr/sbin/useradd"];
    let mut files: Vec<String> = programs.iter().map(|p| (*p).to_owned()).collect();
    // The libraries of these programs and of ours (libc, libm, libgcc_s, the loader).
    let ours = ["nodekeeper-agent", "nodekeeper-eventcenter"].map(|b| bin(b).display().to_string());
    for p in programs.iter().copied().chain(ours.iter().map(String::as_str)) {
        let ldd = run(Command::new("ldd").arg(p));
        for line in ldd.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or_default();
            // At the path the programs load it from (install -D copies through symlinks), under
            // /usr: /lib and /lib64 are links to /usr/lib and /usr/lib64 in the installroot.
            if let Some(rest) = path.strip_prefix('/') {
                let usr = if rest.starts_with("usr/") { path.to_owned() } else { format!("/usr/{rest}") };
                files.push(usr);
            }
        }
    }
    files.sort();
    files.dedup();
    let mut install = String::from("mkdir -p %{buildroot}/etc %{buildroot}/usr/bin %{buildroot}/usr/sbin\n");
    for f in &files {
        install.push_str(&format!("install -D -m 0755 {f} %{{buildroot}}{f}\n"));
    }
    install.push_str(
        "ln -s dash %{buildroot}/usr/bin/sh\n\
         for d in bin sbin lib lib64; do ln -s usr/$d %{buildroot}/$d; done\n\
         mkdir -p %{buildroot}/usr/lib64\n\
         printf 'root:x:0:0:root:/root:/bin/sh\\n' > %{buildroot}/etc/passwd\n\
         printf 'root:x:0:\\n' > %{buildroot}/etc/group\n\
         printf 'root:*:19000:0:99999:7:::\\n' > %{buildroot}/etc/shadow\n\
         printf 'root:*::\\n' > %{buildroot}/etc/gshadow\n\
         printf 'SYS_UID_MIN 100\\nSYS_UID_MAX 999\\nSYS_GID_MIN 100\\nSYS_GID_MAX 999\\n' > %{buildroot}/etc/login.defs\n",
    );
    let spec = format!(
        "Name: nk-test-base\nVersion: 1\nRelease: 1\nSummary: a shell, getent, useradd and libc from the test machine\nLicense: various\n\
         AutoReq: no\nProvides: /bin/sh\nProvides: rtld(GNU_HASH)\n%global debug_package %{{nil}}\n%global __brp_strip /bin/true\n\
         %description\nThe base system of a test installroot.\n\
         %install\n{install}\n\
         %files\n/bin\n/sbin\n/lib\n/lib64\n/usr\n%config(noreplace) /etc/passwd\n%config(noreplace) /etc/group\n\
         %config(noreplace) /etc/shadow\n%config(noreplace) /etc/gshadow\n%config(noreplace) /etc/login.defs\n"
    );
    let top = work.join("base");
    std::fs::create_dir_all(&top).unwrap();
    let spec_path = top.join("base.spec");
    std::fs::write(&spec_path, spec).unwrap();
    run(Command::new("rpmbuild")
        .args(["--quiet", "-bb", "--define"])
        .arg(format!("_topdir {}", top.display()))
        .arg(&spec_path));
    for entry in walk(&top.join("RPMS")) {
        std::fs::copy(&entry, repo.join(entry.file_name().unwrap())).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

fn dnf(root: &Path, repo: &Path, cache: &Path, args: &[&str]) -> String {
    run(Command::new("dnf")
        .args(["-y", "--releasever=1", "--setopt=reposdir=/nonexistent/nodekeeper", "--disablerepo=*"])
        .arg(format!("--installroot={}", root.display()))
        .arg(format!("--setopt=cachedir={}", cache.display()))
        .arg(format!("--repofrompath=nk,file://{}", repo.display()))
        .args(["--enablerepo=nk", "--setopt=nk.gpgcheck=0", "--setopt=nk.metadata_expire=0"])
        .args(args)
        .env("LC_ALL", "C"))
}

fn createrepo(repo: &Path) {
    run(Command::new("createrepo_c").arg("--quiet").arg(repo));
}

/// A copy of the files the packaging reads, in which a test can change a default config.
fn copy_checkout(to: &Path) {
    let from = checkout();
    for dir in ["packaging", "packaging/rules", "systemd", "scripts"] {
        std::fs::create_dir_all(to.join(dir)).unwrap();
        for e in std::fs::read_dir(from.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, to.join(dir).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    for f in ["Cargo.toml", "README.md"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn rpms_install_with_dnf_and_an_upgrade_keeps_an_edited_config() {
    let work = tempfile::tempdir().unwrap();
    let (repo, root, cache) = (work.path().join("repo"), work.path().join("root"), work.path().join("cache"));
    std::fs::create_dir_all(&repo).unwrap();
    build_rpms(&checkout(), "1", &repo);
    build_base_rpm(work.path(), &repo);
    createrepo(&repo);

    dnf(&root, &repo, &cache, &["install", "nodekeeper-agent", "nodekeeper-server", "nodekeeper-storage"]);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(rpm_installed(&root, "nodekeeper-agent").unwrap(), format!("0:{version}-1"));
    assert_eq!(rpm_installed(&root, "nodekeeper-server").unwrap(), format!("0:{version}-1"));
    for f in [
        "usr/bin/nodekeeper-agent",
        "usr/bin/nodekeeper-eventcenter",
        "usr/bin/nodekeeper-detector",
        "usr/bin/nodekeeper-remediator",
        "usr/bin/nodekeeper",
        "usr/bin/nodekeeper-storage",
    ] {
        let meta = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(meta.mode() & 0o777, 0o755, "{f}");
        // rpmbuild strips them: run them rather than compare them.
        let said = run(Command::new(root.join(f)).arg("--version"));
        assert!(said.contains(env!("CARGO_PKG_VERSION")), "{f} --version: {said}");
    }
    for unit in ["agent", "eventcenter", "detector", "remediator", "storage"] {
        let installed = std::fs::read_to_string(root.join(format!("usr/lib/systemd/system/nodekeeper-{unit}.service")));
        let ours = std::fs::read_to_string(checkout().join(format!("systemd/nodekeeper-{unit}.service"))).unwrap();
        assert_eq!(installed.unwrap(), ours, "{unit} unit");
    }
    // The configs are the documented ones, marked as configuration, readable by the service user.
    let configs = run(Command::new("rpm").arg("--root").arg(&root).args([
        "-qc",
        "nodekeeper-agent",
        "nodekeeper-server",
        "nodekeeper-storage",
    ]));
    for c in ["agent", "eventcenter", "detector", "remediator", "storage"] {
        assert!(configs.contains(&format!("/etc/nodekeeper/{c}.toml")), "{configs}");
    }
    // %pre made the system user; the event store's directory is its own.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("nodekeeper:")).unwrap_or_else(|| panic!("no user: {passwd}"));
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!((100..1000).contains(&uid), "a system user: {user}");
    let store = std::fs::metadata(root.join("var/lib/nodekeeper-eventcenter")).unwrap();
    assert_eq!((store.uid(), store.mode() & 0o777), (uid, 0o750));
    let center_config = std::fs::metadata(root.join("etc/nodekeeper/eventcenter.toml")).unwrap();
    assert_eq!((center_config.uid(), center_config.mode() & 0o777), (0, 0o640));
    assert_eq!(std::fs::metadata(root.join("var/lib/nodekeeper")).unwrap().mode() & 0o777, 0o700);
    // The storage syncer's config may hold nothing secret but names its certificates: root's only.
    let storage_config = std::fs::metadata(root.join("etc/nodekeeper/storage.toml")).unwrap();
    assert_eq!((storage_config.uid(), storage_config.mode() & 0o777), (0, 0o600));
    assert_eq!(std::fs::metadata(root.join("var/lib/nodekeeper-storage")).unwrap().mode() & 0o777, 0o700);

    // An operator edits the agent's config; a newer build changes its default config.
    let agent_toml = root.join("etc/nodekeeper/agent.toml");
    let edited = format!("{}\n# edited by the operator\n", std::fs::read_to_string(&agent_toml).unwrap());
    std::fs::write(&agent_toml, &edited).unwrap();
    let newer = work.path().join("newer");
    copy_checkout(&newer);
    let packaged = newer.join("packaging/agent.toml");
    let mut default = std::fs::read_to_string(&packaged).unwrap();
    default.push_str("\n# changed in release 2\n");
    std::fs::write(&packaged, default).unwrap();
    build_rpms(&newer, "2", &repo);
    createrepo(&repo);

    dnf(&root, &repo, &cache, &["upgrade", "nodekeeper-agent", "nodekeeper-server"]);
    assert_eq!(rpm_installed(&root, "nodekeeper-agent").unwrap(), format!("0:{version}-2"));
    assert_eq!(rpm_installed(&root, "nodekeeper-server").unwrap(), format!("0:{version}-2"));
    assert_eq!(std::fs::read_to_string(&agent_toml).unwrap(), edited, "the edited config is kept");
    let rpmnew = std::fs::read_to_string(root.join("etc/nodekeeper/agent.toml.rpmnew")).unwrap();
    assert!(rpmnew.ends_with("# changed in release 2\n"), "the new default is beside it");
    // An unedited config follows the package.
    assert!(!root.join("etc/nodekeeper/eventcenter.toml.rpmnew").exists());

    // Removal takes the binaries and units, keeps the edited config (.rpmsave) and the store.
    // (The base system stays: dnf would otherwise remove it as no longer needed.)
    dnf(
        &root,
        &repo,
        &cache,
        &["remove", "--setopt=clean_requirements_on_remove=False", "nodekeeper-agent", "nodekeeper-server"],
    );
    assert!(!root.join("usr/bin/nodekeeper-agent").exists());
    assert!(!root.join("usr/lib/systemd/system/nodekeeper-eventcenter.service").exists());
    let left: Vec<_> =
        std::fs::read_dir(root.join("etc/nodekeeper")).unwrap().map(|e| e.unwrap().file_name()).collect();
    let saved = std::fs::read_to_string(root.join("etc/nodekeeper/agent.toml.rpmsave"));
    assert_eq!(saved.unwrap_or_else(|e| panic!("agent.toml.rpmsave: {e}; left: {left:?}")), edited);
    assert!(std::fs::read_to_string(root.join("etc/passwd")).unwrap().contains("nodekeeper:"), "the user stays");
}
