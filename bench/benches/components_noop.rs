//! The cost of a no-op reconciliation pass: five components, all converged (installed at their
//! desired versions, config files in place). Measured as CPU time of the agent's code and of the
//! commands it runs (getrusage SELF + CHILDREN), side by side in one run with two naive ways of
//! checking the same thing: one `rpm -q` per component, and asking `dnf install` (which answers
//! "Nothing to do") per component.
//!
//! ```text
//! cargo bench -p nodekeeper-bench --bench components_noop [-- --passes 50]
//! ```
//!
//! Needs rpm, rpmbuild, createrepo_c and dnf (scripts/install-test-deps.sh installs them).

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};
use nodekeeper_agent::components::{Manager, Outcome, Settings, spec};

fn cpu() -> Duration {
    let t = |w| {
        let u = getrusage(w).expect("getrusage");
        let d = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
        d(u.user_time()) + d(u.system_time())
    };
    t(UsageWho::RUSAGE_SELF) + t(UsageWho::RUSAGE_CHILDREN)
}

fn run(cmd: &mut Command) {
    let ok = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("run").success();
    assert!(ok, "{cmd:?}");
}

fn build_repo(dir: &Path) -> String {
    let top = dir.join("top");
    std::fs::create_dir_all(top.join("SPECS")).unwrap();
    for i in 1..=5 {
        let spec = top.join(format!("SPECS/nk-c{i}.spec"));
        std::fs::write(
            &spec,
            format!(
                "Name: nk-c{i}\nVersion: 1.{i}\nRelease: 1\nSummary: bench\nLicense: MIT\nBuildArch: noarch\n%description\nbench\n\
                 %install\nmkdir -p %{{buildroot}}/usr/lib/nk-c{i}\necho ok > %{{buildroot}}/usr/lib/nk-c{i}/HEALTH\n%files\n/usr/lib/nk-c{i}/HEALTH\n"
            ),
        )
        .unwrap();
        run(Command::new("rpmbuild")
            .args(["--quiet", "--define", &format!("_topdir {}", top.display()), "-bb"])
            .arg(&spec));
    }
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for e in std::fs::read_dir(top.join("RPMS/noarch")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, repo.join(p.file_name().unwrap())).unwrap();
    }
    run(Command::new("createrepo_c").arg(&repo));
    format!("file://{}", repo.display())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut passes = 50u32;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--passes" {
            passes = it.next().and_then(|v| v.parse().ok()).expect("--passes N");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = build_repo(tmp.path());
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut toml = String::new();
    for i in 1..=5 {
        toml.push_str(&format!(
            "[[component]]\nname = \"c{i}\"\npackage = \"nk-c{i}\"\nversion = \"1.{i}-1\"\n\
             [[component.repositories]]\nid = \"bench\"\nbase_url = \"{url}\"\n\
             [[component.config_files]]\npath = \"/etc/nk-c{i}/c.conf\"\ncontent = \"setting = {i}\\n\"\n\n"
        ));
    }
    let spec_path = tmp.path().join("spec.toml");
    std::fs::write(&spec_path, toml).unwrap();
    let specs = spec::load(&spec_path).unwrap();
    let mut m = Manager::new(Settings {
        installroot: Some(root.clone()),
        rpm: "rpm".into(),
        dnf: "dnf".into(),
        systemctl: "/bin/true".into(),
        config_roots: vec!["/etc".into()],
        state_dir: tmp.path().join("state"),
        releasever: "1".into(),
        step_timeout: Duration::from_secs(300),
        // As the agent's default: the first pass verifies, the next ones are due in a day.
        verify_interval: Some(Duration::from_secs(24 * 3600)),
        transaction_runner: Vec::new(),
        // As the agent's default: every pass keeps the version lock (reads dnf.conf).
        version_lock: true,
    });
    let mut quiet = |_: String| {};
    for (name, o) in m.reconcile(&specs, &mut quiet).await {
        assert_eq!(o, Outcome::Converged { changed: true }, "{name}");
    }
    // nodekeeper's pass.
    let before = cpu();
    for _ in 0..passes {
        for (name, o) in m.reconcile(&specs, &mut quiet).await {
            assert_eq!(o, Outcome::Converged { changed: false }, "{name}");
        }
    }
    let ours = (cpu() - before) / passes;
    // One rpm -q per component.
    let before = cpu();
    for _ in 0..passes {
        for i in 1..=5 {
            run(Command::new("rpm").arg("--root").arg(&root).args(["-q", &format!("nk-c{i}")]));
        }
    }
    let per_component = (cpu() - before) / passes;
    // dnf install per component: "Nothing to do".
    let dnf_passes = 3;
    let before = cpu();
    for _ in 0..dnf_passes {
        for i in 1..=5 {
            run(Command::new("dnf")
                .args(["-y", "-q", "-C"])
                .arg(format!("--installroot={}", root.display()))
                .args(["--releasever=1", "--setopt=reposdir=/nonexistent", "--disablerepo=*"])
                // The manager's version lock hides the packages from other dnf runs.
                .arg("--disableexcludes=main")
                .arg(format!("--repofrompath=bench,{url}"))
                .args(["--enablerepo=bench", "--setopt=bench.gpgcheck=0"])
                .arg(format!("--setopt=cachedir={}", tmp.path().join("state/components/dnf-cache").display()))
                .args(["install", &format!("nk-c{i}-1.{i}-1")]));
        }
    }
    let dnf = (cpu() - before) / dnf_passes;
    println!("5 components, all converged; CPU per pass (this process and its children)");
    println!("| method | CPU per pass |");
    println!("|---|---|");
    println!(
        "| nodekeeper: whole-spec check, version lock, one `rpm -q` for all, config files compared ({passes} passes) | {:.1} ms |",
        ours.as_secs_f64() * 1e3
    );
    println!("| one `rpm -q` per component ({passes} passes) | {:.1} ms |", per_component.as_secs_f64() * 1e3);
    println!(
        "| `dnf install` per component, answering \"Nothing to do\" ({dnf_passes} passes) | {:.1} ms |",
        dnf.as_secs_f64() * 1e3
    );
    assert!(ours <= Duration::from_millis(20), "a no-op pass costs {ours:?}, above the 20 ms target");
}
