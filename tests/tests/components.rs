//! The component manager with real rpm tooling: RPMs built by rpmbuild, published by createrepo_c,
//! installed by dnf into an installroot, read back from the RPM database. Driven through
//! `nodekeeper-agent components apply` (one pass from a local spec). Interruptions are in
//! `components_recovery.rs`.

use std::process::Stdio;
use std::time::Duration;

use nodekeeper_tests::rpmnode::{Node, one_component};
use nodekeeper_tests::{bin, rpm_installed, rpm_repo};

#[test]
fn install_upgrade_downgrade_into_an_installroot() {
    let n = Node::new();
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: install nk-demo 0:1.0-1") && out.contains("demo: converged at 0:1.0-1"), "{out}");
    assert!(out.contains("demo: converged (changed), installed 0:1.0-1, desired 1.0-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "the spec's config replaces the package's");
    let mode = std::fs::metadata(n.root().join("etc/nk-demo/demo.conf")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777, 0o640);
    assert_eq!(n.restarts(), 1);

    // Converged: a second pass changes nothing.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("install nk-demo") && out.contains("demo: converged (unchanged), installed 0:1.0-1"),
        "{out}"
    );
    assert_eq!(n.restarts(), 1, "no change, no restart");

    let (code, out) = n.apply(&n.spec("1.1-1", "11", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: upgrade nk-demo from 0:1.0-1 to 0:1.1-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"));

    let (code, out) = n.apply(&n.spec("0:1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: downgrade nk-demo from 0:1.1-1 to 0:1.0-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));

    // Drift in the config file is repaired (and the unit restarted).
    std::fs::write(n.root().join("etc/nk-demo/demo.conf"), "setting = tampered\n").unwrap();
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: repair config /etc/nk-demo/demo.conf"), "{out}");
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"));
    assert_eq!(n.restarts(), 4);
}

#[test]
fn an_unhealthy_version_is_rolled_back_with_its_config() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.1-1", "11", "")).0, 0);
    let (code, out) = n.apply(&n.spec("1.2-1", "12", ""));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("not healthy within 2s") && out.contains("rolling back to 0:1.1-1") && out.contains("ROLLED BACK"),
        "{out}"
    );
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"), "the previous version runs again");
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"), "and its config");
    // The rolled-back version is not tried again until the desired state changes.
    let (code, out) = n.apply(&n.spec("1.2-1", "12", ""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("was rolled back") && !out.contains("upgrade nk-demo"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
}

#[test]
fn errors_change_nothing() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let unchanged = |n: &Node, out: &str| {
        assert_eq!(n.installed().as_deref(), Some("0:1.0-1"), "{out}");
        assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "{out}");
    };
    // Version missing from the repository.
    let (code, out) = n.apply(&n.spec("9.9-1", "99", ""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("package or version not found"), "{out}");
    unchanged(&n, &out);
    // Bad version string: the spec is invalid.
    let (code, out) = n.apply(&n.spec("1.1", "11", ""));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("invalid version \"1.1\": expected epoch:version-release"), "{out}");
    unchanged(&n, &out);
    // Repository unreachable.
    let spec = n.spec("1.1-1", "11", "");
    let text = std::fs::read_to_string(&spec).unwrap().replace(&rpm_repo().url(), "file:///nonexistent/nk-repo");
    std::fs::write(&spec, text).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("repository unreachable"), "{out}");
    unchanged(&n, &out);
    // Config path outside the allowed roots.
    let spec = n.spec("1.1-1", "11", "");
    std::fs::write(&spec, std::fs::read_to_string(&spec).unwrap().replace("/etc/nk-demo/demo.conf", "/etc/passwd"))
        .unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("config path \"/etc/passwd\" is outside the allowed roots"), "{out}");
    unchanged(&n, &out);
    // Dependency conflict.
    let spec = n.path("conflict.toml");
    std::fs::write(
        &spec,
        format!("[[component]]\nname = \"conflict\"\npackage = \"nk-conflict\"\nversion = \"1.0-1\"\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{}\"\n", rpm_repo().url()),
    )
    .unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("dependency conflict") && out.contains("nk-libmissing"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-conflict"), None);
    unchanged(&n, &out);
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).expect(needle)].matches('\n').count() + 1
}

#[test]
fn every_spec_defect_is_named_with_its_line_and_changes_nothing() {
    let n = Node::new();
    // The root's own accounts: config owners are looked up there, not on the host.
    std::fs::create_dir_all(n.root().join("etc")).unwrap();
    std::fs::write(n.root().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nnkdemo:x:4242:4243::/:/sbin/nologin\n")
        .unwrap();
    std::fs::write(n.root().join("etc/group"), "root:x:0:\nnkdemo:x:4243:\n").unwrap();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let base = std::fs::read_to_string(n.spec("1.1-1", "11", "")).unwrap();
    let second = |name: &str, package: &str, version: &str| {
        format!("\n[[component]]\nname = \"{name}\"\npackage = \"{package}\"\nversion = \"{version}\"\n")
    };
    let owned = |owner: &str, group: &str| {
        base.replace("mode = \"0640\"", &format!("mode = \"0640\"\nowner = \"{owner}\"\ngroup = \"{group}\""))
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "a component listed twice",
            base.clone() + &second("demo", "nk-other", "1.0-1"),
            "name = \"demo\"\npackage = \"nk-other\"",
            "component \"demo\" is listed twice",
        ),
        (
            "a package claimed twice",
            base.clone() + &second("demo2", "nk-demo", "1.0-1"),
            "name = \"demo2\"",
            "package \"nk-demo\" is already claimed by component \"demo\"",
        ),
        (
            "an owner the root does not have",
            owned("containerd", "nkdemo"),
            "name = \"demo\"",
            "owner \"containerd\" does not exist in",
        ),
        (
            "a group the root does not have",
            owned("nkdemo", "dockerr"),
            "name = \"demo\"",
            "group \"dockerr\" does not exist in",
        ),
        (
            "two kinds of health check",
            base.replace(
                "[component.health_check]\n",
                "[component.health_check]\nhttp_url = \"http://127.0.0.1:1/\"\n",
            ),
            "name = \"demo\"",
            "set one of command, http_url or unit_active",
        ),
        (
            "an unknown field",
            base.replace("unit = ", "restart = \"always\"\nunit = "),
            "restart = ",
            "unknown field `restart`",
        ),
        (
            "one bad entry beside a good one",
            base.clone() + &second("other", "nk-conflict", "1.0"),
            "name = \"other\"",
            "invalid version \"1.0\"",
        ),
    ];
    for (what, text, at, says) in cases {
        let spec = n.path("defect.toml");
        std::fs::write(&spec, &text).unwrap();
        let (code, out) = n.apply(&spec);
        assert_eq!(code, 78, "{what}: {out}");
        // `file:line:` for a defect of the spec, the config loader's `file, line N` for TOML itself.
        let line = line_of(&text, at);
        let located = out.contains(&format!("{}:{line}:", spec.display()))
            || out.contains(&format!("{}, line {line},", spec.display()));
        assert!(located && out.contains(says), "{what}: expected line {line} … {says}: {out}");
        assert!(!out.contains("upgrade nk-demo") && !out.contains("ROLLED BACK"), "{what}: {out}");
        assert_eq!(n.installed().as_deref(), Some("0:1.0-1"), "{what}: nothing changed");
        assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "{what}: nothing changed");
    }
    // The owner fixed: the change goes through, the file owned by the root's account.
    let (code, out) = n.apply(&{
        let spec = n.path("owned.toml");
        std::fs::write(&spec, owned("nkdemo", "nkdemo")).unwrap();
        spec
    });
    assert_eq!(code, 0, "{out}");
    let meta = std::fs::metadata(n.root().join("etc/nk-demo/demo.conf")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (4242, 4243));
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
}

#[test]
fn rejections_and_state_belong_to_one_root_and_one_spec() {
    // Two roots, each with the default state folder (inside the root).
    let (a, b) = (Node::new(), Node::new());
    let apply = |n: &Node, version: &str, setting: &str| {
        let spec = n.spec(version, setting, "");
        let mut c = std::process::Command::new(bin("nodekeeper-agent"));
        c.args(["components", "apply", "--spec"]).arg(&spec).arg("--installroot").arg(n.root());
        c.args(["--config-root", "/etc/nk-demo", "--systemctl"]).arg(n.path("systemctl")).env("RUST_LOG", "warn");
        let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap().wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    };
    for n in [&a, &b] {
        assert_eq!(apply(n, "1.1-1", "11").0, 0);
    }
    let (code, out) = apply(&a, "1.2-1", "12");
    assert_eq!(code, 3, "{out}");
    assert!(a.root().join("var/lib/nodekeeper/components/rejected.json").exists(), "state inside root A");
    // Root B has not seen 1.2-1 fail: it tries it.
    let (code, out) = apply(&b, "1.2-1", "12");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("upgrade nk-demo from 0:1.1-1 to 0:1.2-1"), "{out}");
    // In root A the same spec is not tried again; a changed spec (its config) is.
    let (code, out) = apply(&a, "1.2-1", "12");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("was rolled back") && !out.contains("upgrade nk-demo"), "{out}");
    let (code, out) = apply(&a, "1.2-1", "13");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("upgrade nk-demo from 0:1.1-1 to 0:1.2-1"), "{out}");
}

#[test]
fn an_http_health_check_that_gets_no_answer_rolls_the_change_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let closed = nodekeeper_tests::free_port();
    let health = format!("http_url = \"http://127.0.0.1:{closed}/healthz\"\n");
    let (code, out) = n.apply(&n.spec_with("1.1-1", "11", &health, ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not healthy within 2s") && out.contains("ROLLED BACK"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
}

#[test]
fn the_roots_own_repositories_stay_enabled_and_repository_options_reach_dnf() {
    let n = Node::new();
    let spec = |extra: &str| one_component(&n, "needs", "nk-needs-dep", "1.0-1", extra);
    // An exclude on the component's repository: dnf is told, and finds nothing to install.
    let (code, out) = n.apply(&spec("exclude = [\"nk-needs*\"]\npriority = 10\n"));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("package or version not found"), "{out}");
    // The dependency is only in a repository the root has configured itself: without it the
    // transaction cannot be resolved; with it, listing the component's repository did not turn
    // it off.
    let (code, out) = n.apply(&spec(""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("nk-dep"), "{out}");
    std::fs::create_dir_all(n.root().join("etc/yum.repos.d")).unwrap();
    std::fs::write(
        n.root().join("etc/yum.repos.d/deps.repo"),
        format!("[deps]\nname=deps\nbaseurl={}\ngpgcheck=0\n", rpm_repo().deps_url()),
    )
    .unwrap();
    let (code, out) = n.apply(&spec(""));
    assert_eq!(code, 0, "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-dep").as_deref(), Some("0:1.0-1"), "{out}");
    // A malformed option is a defect of the spec.
    let (code, out) = n.apply(&spec("proxy = \"socks5://p:1080\"\n"));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("invalid proxy"), "{out}");
}

#[test]
fn components_change_in_order_can_be_absent_reload_and_have_their_own_step_timeout() {
    let n = Node::new();
    let url = rpm_repo().url();
    let write = |text: String| {
        let path = n.path("two.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    // slow comes after demo, though listed first; demo's config and unit as `extra` says.
    let two = |slow: &str, demo: &str, setting: &str, extra: &str| {
        write(format!(
            "[[component]]\nname = \"slow\"\npackage = \"nk-slow\"\n{slow}\nafter = [\"demo\"]\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{url}\"\n\n\
             [[component]]\nname = \"demo\"\npackage = \"nk-demo\"\nversion = \"{demo}\"\nunit = \"nk-demo.service\"\n{extra}\n\
             [[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{url}\"\n\
             [[component.config_files]]\npath = \"/etc/nk-demo/demo.conf\"\ncontent = \"setting = {setting}\\n\"\n\
             [component.health_check]\ncommand = [\"/bin/sh\", \"-c\", \"grep -qx ok {root}/usr/lib/nk-demo/HEALTH\"]\ndeadline = \"2s\"\n",
            root = n.root().display()
        ))
    };
    let (code, out) = n.apply(&two("version = \"1.0-1\"", "1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    let at = |what: &str| out.find(what).unwrap_or_else(|| panic!("{what}: {out}"));
    assert!(at("demo: install nk-demo") < at("slow: install nk-slow"), "demo first: {out}");

    // demo's upgrade is rolled back: slow, which comes after it, is not changed.
    let (code, out) = n.apply(&two("version = \"2.0-1\"", "1.2-1", "12", ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("slow: not changed: it comes after demo, which has not converged"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-slow").as_deref(), Some("0:1.0-1"));

    // A cycle is a defect of the spec.
    let cyclic = std::fs::read_to_string(two("version = \"1.0-1\"", "1.0-1", "10", "")).unwrap();
    let cyclic = cyclic.replace("unit = \"nk-demo.service\"", "unit = \"nk-demo.service\"\nafter = [\"slow\"]");
    let (code, out) = n.apply(&write(cyclic));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("make a cycle"), "{out}");

    // Absent: removed, and reported so.
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-slow"), None, "{out}");
    assert!(out.contains("slow: converged (changed), installed none, desired absent"), "{out}");

    // reload: a config change reloads the unit; a package change restarts it.
    let log = || std::fs::read_to_string(n.path("systemctl.log")).unwrap_or_default();
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "11", "restart_policy = \"reload\""));
    assert_eq!(code, 0, "{out}");
    assert!(log().lines().last() == Some("reload nk-demo.service"), "{}", log());
    let (code, out) = n.apply(&two("state = \"absent\"", "1.1-1", "11", "restart_policy = \"reload\""));
    assert_eq!(code, 0, "{out}");
    assert!(log().lines().last() == Some("restart nk-demo.service"), "{}", log());

    // A step over the component's own timeout fails it, and nothing changes.
    let slow_hook = "step_timeout = \"1s\"\npre_hook = [\"/bin/sleep\", \"30\"]";
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "11", slow_hook));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("pre-hook: /bin/sleep did not finish within 1s"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.1-1"));
}

#[test]
fn version_order_equals_rpms_own() {
    // A generated corpus: epochs, numeric and alphabetic segments, separators, ~ and ^.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn part(&mut self) -> String {
            const ATOMS: [&str; 20] = [
                "0", "1", "2", "10", "01", "a", "b", "rc", "alpha", "9", "~", "^", ".", "_", "+", "~rc1", "^git",
                "el9", "1a", "a1",
            ];
            let mut s = String::from(["1", "2", "0", "3"][self.below(4) as usize]);
            for _ in 0..self.below(4) {
                s.push_str(ATOMS[self.below(ATOMS.len() as u64) as usize]);
            }
            s
        }
        fn evr(&mut self) -> String {
            let epoch = if self.below(3) == 0 { format!("{}:", self.below(3)) } else { String::new() };
            format!("{epoch}{}-{}", self.part(), self.part())
        }
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut pairs: Vec<(String, String)> = Vec::new();
    for _ in 0..3000 {
        let a = rng.evr();
        let b = if rng.below(4) == 0 { a.clone() } else { rng.evr() };
        pairs.push((a, b));
    }
    // rpm's own answers, a few hundred pairs per `rpm --eval` (an argument has a size limit).
    let mut theirs: Vec<i32> = Vec::new();
    for chunk in pairs.chunks(500) {
        let lua: String =
            chunk.iter().map(|(a, b)| format!("print(rpm.vercmp(\"{a}\", \"{b}\") .. \" \")\n")).collect();
        let out = std::process::Command::new("rpm")
            .arg("--eval")
            .arg(format!("%{{lua:\n{lua}}}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .unwrap();
        theirs.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse::<i32>().unwrap()));
    }
    assert_eq!(theirs.len(), pairs.len());
    let mut checked = 0;
    for ((a, b), rpm) in pairs.iter().zip(theirs) {
        let (Ok(x), Ok(y)) = (
            nodekeeper_agent::components::version::Evr::parse(a),
            nodekeeper_agent::components::version::Evr::parse(b),
        ) else {
            continue;
        };
        let ours = x.cmp(&y) as i32;
        assert_eq!(ours, rpm.signum(), "{a} vs {b}: ours {ours}, rpm {rpm}");
        checked += 1;
    }
    assert!(checked > 2500, "only {checked} pairs were valid versions");
}

/// The CommandResult event of the command whose `SendCommandResponse` (JSON) is `sent`.
async fn command_result(center: &nodekeeper_tests::EventCenter, sent: &str) -> nodekeeper_proto::v1::Event {
    let command_id = nodekeeper_tests::json_lines(sent)[0]["commandId"].as_str().unwrap().to_owned();
    nodekeeper_tests::wait_for("the command result", Duration::from_secs(60), || async {
        nodekeeper_tests::stored_events(center.channel().await, "node-c", "CommandResult")
            .await
            .into_iter()
            .find(|e| e.attributes.get("command_id") == Some(&command_id))
    })
    .await
}

/// End to end with real processes: the desired version set in the event center reaches the agent,
/// which converges; the center lists it; a restart command round-trips; a rollback opens a fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_from_the_center_converges_and_commands_round_trip() {
    use nodekeeper_tests::{Agent, AgentSpec, EventCenter, cli, json_lines, wait_for};
    let center = EventCenter::start("[nodes]\ncheck_interval = \"50ms\"\n").await;
    let url = center.url();
    let n = Node::new();
    let extra = format!(
        "[component_manager]\ninstallroot = \"{}\"\nreleasever = \"1\"\nconfig_roots = [\"/etc/nk-demo\"]\nsystemctl = \"{}\"\nreconcile_interval = \"1h\"\n",
        n.root().display(),
        n.path("systemctl").display()
    );
    let agent = Agent::start(AgentSpec { extra: &extra, ..AgentSpec::new("node-c", &url) }).await;
    agent.wait_connected().await;

    let converged_at = |version: &'static str| {
        let url = url.clone();
        async move {
            let (code, out, _) = cli(&url, &["components", "list", "--node", "node-c", "-o", "json"]).await;
            if code != 0 {
                return None;
            }
            let nodes = json_lines(&out);
            let n = nodes.first()?;
            let c = &n["components"][0];
            (n["converged"] == true && c["installedVersion"] == version && c["phase"] == "COMPONENT_PHASE_CONVERGED")
                .then(|| n.clone())
        }
    };
    for (version, installed) in [("1.0-1", "0:1.0-1"), ("1.1-1", "0:1.1-1")] {
        let spec = n.spec(version, "x", "");
        let (code, out, err) =
            cli(&url, &["components", "set", "--cluster", "c1", "--node", "node-c", spec.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("1 nodes matched"), "{out}");
        let listed =
            wait_for(&format!("node-c converged at {installed}"), Duration::from_secs(60), || converged_at(installed))
                .await;
        assert_eq!(listed["components"][0]["desiredVersion"], version);
        assert_eq!(n.installed().as_deref(), Some(installed), "the RPM database agrees");
    }

    // A restart command round-trips: issued, carried out (the unit restarted), result recorded.
    let restarts = n.restarts();
    let (code, out, err) =
        cli(&url, &["components", "restart", "--cluster", "c1", "--node", "node-c", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let result = command_result(&center, &out).await;
    assert_eq!(result.attributes["success"], "true", "{}", result.message);
    assert!(result.message.contains("nk-demo.service restarted and healthy"), "{}", result.message);
    assert_eq!(n.restarts(), restarts + 1);

    // A reinstall command too: the same version installed again, verified.
    std::fs::write(n.root().join("usr/lib/nk-demo/VERSION"), "damaged\n").unwrap();
    let (code, out, err) =
        cli(&url, &["components", "reinstall", "--cluster", "c1", "--node", "node-c", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let result = command_result(&center, &out).await;
    assert_eq!(result.attributes["success"], "true", "{}", result.message);
    assert!(result.message.contains("demo reinstalled at 1.1-1"), "{}", result.message);
    assert_eq!(
        std::fs::read_to_string(n.root().join("usr/lib/nk-demo/VERSION")).unwrap(),
        "1.1\n",
        "the package's files are back"
    );

    // An unhealthy version is rolled back; the fault reaches the center.
    let spec = n.spec("1.2-1", "x", "");
    let (code, _, err) =
        cli(&url, &["components", "set", "--cluster", "c1", "--node", "node-c", spec.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let fault = wait_for("the DemoUpgradeFailed fault", Duration::from_secs(60), || async {
        let (_, out, _) = cli(&url, &["faults", "list", "-o", "json"]).await;
        json_lines(&out).into_iter().find(|f| f["type"] == "DemoUpgradeFailed")
    })
    .await;
    assert!(fault["message"].as_str().unwrap().contains("rolled back to 0:1.1-1"), "{fault}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
    let (_, out, _) = cli(&url, &["components", "list", "-o", "json"]).await;
    let node = &json_lines(&out)[0];
    assert!(!node["converged"].as_bool().unwrap_or(false), "canonical JSON omits false: {node}");
    assert_eq!(node["components"][0]["phase"], "COMPONENT_PHASE_FAILED", "{node}");

    // In a listing of several nodes, each node's readiness gates are its own: node-c's components
    // are behind, the nodes around it (by name) have none desired.
    let _others = [
        nodekeeper_tests::AgentConn::connect(&url, nodekeeper_tests::hello("c1", "node-a", "b1")).await.unwrap(),
        nodekeeper_tests::AgentConn::connect(&url, nodekeeper_tests::hello("c1", "node-z", "b1")).await.unwrap(),
    ];
    let listed = nodekeeper_proto::v1::fleet_service_client::FleetServiceClient::new(center.channel().await)
        .list_nodes(nodekeeper_proto::v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let components_gate = |name: &str| {
        let n = listed.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("{name} listed"));
        n.gates.iter().find(|g| g.name == "components converged").cloned().expect("the components gate")
    };
    let c = components_gate("node-c");
    assert!(!c.holds && c.reason.contains("demo at 0:1.1-1, desired 1.2-1"), "{c:?}");
    for other in ["node-a", "node-z"] {
        assert!(components_gate(other).holds, "{other}: {:?}", components_gate(other));
    }
}
