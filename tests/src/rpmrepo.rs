//! A repository of test RPMs built once per test binary with rpmbuild and createrepo_c.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Real RPMs built once per test binary with rpmbuild and published with createrepo_c:
/// `nk-demo` 1.0-1, 1.1-1 (healthy) and 1.2-1 (its HEALTH file says "broken"), each with a
/// `%config(noreplace)` file /etc/nk-demo/demo.conf and a unit file; `nk-conflict` 1.0-1, which
/// requires a package no repository has; nk-kube and nk-kubeadm 1.0-1 and 2.0-1 with nk-ctr 1.5-1
/// and 1.6-1 (one component); nk-slow (scriptlets that can be held); nk-needs-dep, which needs
/// nk-dep of the second repository.
/// The scriptlets of the test package nk-slow that a test can hold (see [`rpm_repo`]).
pub const SCRIPTLETS: [&str; 4] = ["pre", "post", "posttrans", "preun"];

pub struct RpmRepo {
    pub dir: PathBuf,
}

impl RpmRepo {
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.join("repo").display())
    }

    /// A second repository, with nk-dep only (what nk-needs-dep requires).
    pub fn deps_url(&self) -> String {
        format!("file://{}", self.dir.join("deps").display())
    }
}

pub fn rpm_repo() -> &'static RpmRepo {
    static REPO: std::sync::OnceLock<RpmRepo> = std::sync::OnceLock::new();
    REPO.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("nk-rpms-").tempdir().expect("tempdir").keep();
        let top = dir.join("top");
        std::fs::create_dir_all(top.join("SPECS")).unwrap();
        let build = |name: &str, spec: String| {
            let path = top.join("SPECS").join(format!("{name}.spec"));
            std::fs::write(&path, spec).unwrap();
            let ok = std::process::Command::new("rpmbuild")
                .args(["--quiet", "--define", &format!("_topdir {}", top.display()), "-bb"])
                .arg(&path)
                .stdout(Stdio::null())
                .status()
                .expect("rpmbuild (scripts/install-test-deps.sh installs it)")
                .success();
            assert!(ok, "rpmbuild {name}");
        };
        for (v, health) in [("1.0", "ok"), ("1.1", "ok"), ("1.2", "broken")] {
            build(
                &format!("nk-demo-{v}"),
                format!(
                    "Name: nk-demo\nVersion: {v}\nRelease: 1\nSummary: nodekeeper test component\nLicense: MIT\nBuildArch: noarch\n\
                     %description\nA test component.\n\
                     %install\nmkdir -p %{{buildroot}}/usr/lib/nk-demo %{{buildroot}}/etc/nk-demo %{{buildroot}}/usr/lib/systemd/system\n\
                     echo {v} > %{{buildroot}}/usr/lib/nk-demo/VERSION\necho {health} > %{{buildroot}}/usr/lib/nk-demo/HEALTH\n\
                     echo 'setting = default' > %{{buildroot}}/etc/nk-demo/demo.conf\n\
                     printf '[Service]\\nExecStart=/bin/true\\n' > %{{buildroot}}/usr/lib/systemd/system/nk-demo.service\n\
                     %files\n/usr/lib/nk-demo/VERSION\n/usr/lib/nk-demo/HEALTH\n/usr/lib/systemd/system/nk-demo.service\n%config(noreplace) /etc/nk-demo/demo.conf\n"
                ),
            );
        }
        // Scriptlets (in rpm's Lua: an installroot has no shell) that, while the FIFO
        // /nk-block-<phase> exists in the root, touch /nk-reached-<phase> and wait for a line on it:
        // a transaction held at a known point, to be killed there.
        let hold = |phase: &str| {
            format!(
                "%{phase} -p <lua>\nif posix.stat(\"/nk-block-{phase}\") then io.open(\"/nk-reached-{phase}\", \"w\"):close(); io.open(\"/nk-block-{phase}\"):read() end\n"
            )
        };
        for v in ["1.0", "2.0"] {
            let scriptlets: String = SCRIPTLETS.iter().map(|p| hold(p)).collect();
            build(
                &format!("nk-slow-{v}"),
                format!(
                    "Name: nk-slow\nVersion: {v}\nRelease: 1\nSummary: scriptlets that can be held\nLicense: MIT\nBuildArch: noarch\n\
                     %description\nA component with slow scriptlets.\n\
                     %install\nmkdir -p %{{buildroot}}/usr/lib/nk-slow\necho {v} > %{{buildroot}}/usr/lib/nk-slow/VERSION\n\
                     {scriptlets}%files\n/usr/lib/nk-slow/VERSION\n"
                ),
            );
        }
        // The packages of one multi-package component (the last at a version of its own).
        for (name, versions) in [("nk-kube", ["1.0", "2.0"]), ("nk-kubeadm", ["1.0", "2.0"]), ("nk-ctr", ["1.5", "1.6"])] {
            for v in versions {
                build(
                    &format!("{name}-{v}"),
                    format!(
                        "Name: {name}\nVersion: {v}\nRelease: 1\nSummary: one of three\nLicense: MIT\nBuildArch: noarch\n\
                         %description\nA package of a multi-package component.\n\
                         %install\nmkdir -p %{{buildroot}}/usr/lib/{name}\necho {v} > %{{buildroot}}/usr/lib/{name}/VERSION\n\
                         %files\n/usr/lib/{name}/VERSION\n"
                    ),
                );
            }
        }
        // A package whose dependency only another repository (`deps`) has.
        build(
            "nk-needs-dep",
            "Name: nk-needs-dep\nVersion: 1.0\nRelease: 1\nSummary: needs nk-dep\nLicense: MIT\nBuildArch: noarch\nRequires: nk-dep\n\
             %description\nNeeds a package of another repository.\n%files\n"
                .into(),
        );
        build(
            "nk-dep",
            "Name: nk-dep\nVersion: 1.0\nRelease: 1\nSummary: a dependency\nLicense: MIT\nBuildArch: noarch\n\
             %description\nIn the deps repository only.\n%files\n"
                .into(),
        );
        build(
            "nk-conflict",
            "Name: nk-conflict\nVersion: 1.0\nRelease: 1\nSummary: needs what nobody has\nLicense: MIT\nBuildArch: noarch\nRequires: nk-libmissing >= 2\n\
             %description\nUnsatisfiable.\n%files\n"
                .into(),
        );
        let (repo, deps) = (dir.join("repo"), dir.join("deps"));
        for r in [&repo, &deps] {
            std::fs::create_dir_all(r).unwrap();
        }
        for e in std::fs::read_dir(top.join("RPMS/noarch")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap();
            let to = if name.to_string_lossy().starts_with("nk-dep-") { &deps } else { &repo };
            std::fs::copy(&p, to.join(name)).unwrap();
        }
        for r in [&repo, &deps] {
            let ok = std::process::Command::new("createrepo_c")
                .arg("--quiet")
                .arg(r)
                .status()
                .expect("createrepo_c (scripts/install-test-deps.sh installs it)")
                .success();
            assert!(ok, "createrepo_c");
        }
        RpmRepo { dir }
    })
}

/// The installed `epoch:version-release` of a package in an installroot, from the RPM database.
pub fn rpm_installed(root: &Path, package: &str) -> Option<String> {
    let out = std::process::Command::new("rpm")
        .arg("--root")
        .arg(root)
        .args(["-q", "--qf", "%{EPOCHNUM}:%{VERSION}-%{RELEASE}", package])
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output())
        .expect("rpm -q");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
