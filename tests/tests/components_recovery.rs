//! The component manager interrupted, with real rpm tooling: `components apply` killed with -9
//! at each step of a change, killed together with its transaction in each scriptlet (a power
//! cut), killed while its transaction goes on; and files changed behind rpm's back.

use std::time::Duration;

use nodekeeper_tests::rpmnode::{Node, held_upgrade, rpm_truth, slow_spec, wait_for_file};

#[test]
fn a_power_cut_in_any_scriptlet_leaves_one_verified_version_after_the_next_pass() {
    for phase in nodekeeper_tests::SCRIPTLETS {
        let n = Node::new();
        let mut agent = held_upgrade(&n, phase);
        // The power cut: the agent, its dnf and the scriptlet at once.
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::SIGKILL).unwrap();
        agent.wait().unwrap();
        std::fs::remove_file(n.root().join(format!("nk-block-{phase}"))).unwrap();
        let (code, out) = n.apply(&slow_spec(&n, "2.0-1"));
        assert_eq!(code, 0, "{phase}: {out}");
        assert!(out.contains("slow: converged"), "{phase}: {out}");
        let (versions, verify, check) = rpm_truth(&n.root());
        assert_eq!(versions, ["0:2.0-1"], "{phase}: exactly one version recorded: {out}");
        assert!(verify.0, "{phase}: rpm -V nk-slow: {}", verify.1);
        assert!(check.0, "{phase}: dnf check: {}", check.1);
        if matches!(phase, "post" | "preun") {
            // Cut between recording the new version and forgetting the old: both were recorded.
            assert!(out.contains("repaired: removed the record of nk-slow 0:1.0-1"), "{phase}: {out}");
        }
    }
}

#[test]
fn a_transaction_that_outlives_its_agent_is_waited_for_not_doubled() {
    let n = Node::new();
    let mut agent = held_upgrade(&n, "post");
    // Only the agent dies; its dnf goes on, held in %post.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let mut second = n.command(&slow_spec(&n, "2.0-1")).spawn().unwrap();
    let stderr = second.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lines.lock().unwrap().iter().any(|l| l.contains("still running on this root") && l.contains("waiting")) {
        assert!(std::time::Instant::now() < deadline, "the second run did not wait: {:?}", lines.lock().unwrap());
        std::thread::park_timeout(Duration::from_millis(20));
    }
    // While it waits, one dnf works on this root.
    let root = n.root().display().to_string();
    let dnfs = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("dnf") && c.contains(&format!("--installroot={root}")))
        .count();
    assert_eq!(dnfs, 1, "one transaction on the root");
    // The first transaction goes on and ends; then the second run takes over.
    std::fs::write(n.root().join("nk-block-post"), "go\n").unwrap();
    let status = second.wait().unwrap();
    reader.join().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut second.stdout.take().unwrap(), &mut out).unwrap();
    let all = format!("{out}{}", lines.lock().unwrap().join("\n"));
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(out.contains("slow: converged") && !all.contains("FAILED"), "{all}");
    let (versions, verify, check) = rpm_truth(&n.root());
    assert_eq!(versions, ["0:2.0-1"], "{all}");
    assert!(verify.0 && check.0, "{verify:?} {check:?}");
}

#[test]
fn verification_finds_and_repairs_files_changed_behind_rpms_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    std::fs::write(n.root().join("usr/lib/nk-demo/VERSION"), "tampered\n").unwrap();
    // A plain pass compares versions and config files only.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("repaired"), "{out}");
    // A verifying pass (the agent's every `verify_interval`) finds the file and reinstalls.
    let spec = n.spec("1.0-1", "10", "");
    let mut c = n.command(&spec);
    c.arg("--verify");
    let out = c.spawn().unwrap().wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("demo: repaired: reinstalled nk-demo 0:1.0-1") && text.contains("/usr/lib/nk-demo/VERSION"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(n.root().join("usr/lib/nk-demo/VERSION")).unwrap(), "1.0\n");
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "the managed config stays");
}

/// Kills `components apply` with -9 while it waits at `step`, then runs it again.
fn kill_at(step: &str, expect_installed_at_kill: &str) -> (Node, String) {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let spec = n.spec("1.1-1", "11", "");
    std::fs::write(n.path(&format!("block-{step}")), "").unwrap();
    let mut child = n.command(&spec).spawn().unwrap();
    wait_for_file(&n.path(&format!("reached-{step}")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(n.installed().as_deref(), Some(expect_installed_at_kill), "at the kill ({step})");
    std::fs::remove_file(n.path(&format!("block-{step}"))).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 0, "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"), "{out}");
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"), "{out}");
    (n, out)
}

#[test]
fn killed_before_the_transaction_it_starts_over() {
    let (_n, out) = kill_at("pre", "0:1.0-1");
    assert!(out.contains("the agent restarted during a change of demo (step Begun): resumed"), "{out}");
}

#[test]
fn killed_after_the_transaction_it_resumes() {
    let (_n, out) = kill_at("post", "0:1.1-1");
    assert!(out.contains("the agent restarted during a change of demo (step Configured): resumed"), "{out}");
    assert!(!out.contains("upgrade nk-demo"), "the package is not installed twice: {out}");
}

#[test]
fn killed_during_verification_it_verifies_again() {
    let (_n, out) = kill_at("check", "0:1.1-1");
    assert!(out.contains("the agent restarted during a change of demo (step Verifying): resumed"), "{out}");
}

#[test]
fn killed_mid_change_when_the_desired_state_moved_back_it_rolls_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    std::fs::write(n.path("block-post"), "").unwrap();
    let mut child = n.command(&n.spec("1.1-1", "11", "")).spawn().unwrap();
    wait_for_file(&n.path("reached-post"));
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(n.path("block-post")).unwrap();
    // The operator went back to 1.0 meanwhile.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("(step Configured): rolled back"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"));
}
