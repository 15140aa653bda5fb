//! The CLI as a new user meets it: the README's walkthrough run line by line, and what the CLI
//! says when something is wrong (credentials of another CA, plaintext meeting TLS, a missing
//! fault, a flag given to the wrong command), its help, and `events watch -o json`.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_tests::{EventCenter, bin, cli, json_lines, signal, wait_for};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

type Lines = Arc<Mutex<Vec<String>>>;

/// A process whose stdout and stderr lines are collected as they come.
struct Running {
    child: Child,
    out: Lines,
    err: Lines,
}

fn collect(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut stream = BufReader::new(stream).lines();
        while let Ok(Some(line)) = stream.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().expect("spawn");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        Running { child, out, err }
    }

    fn lines(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    /// The first stdout line that passes `pred`; panics with its stderr if the process exits
    /// before printing one.
    async fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self.out.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // What it printed last may still be on its way through the pipe.
                tokio::task::yield_now().await;
                if let Some(line) = self.out.lock().unwrap().iter().find(|l| pred(l)) {
                    return line.clone();
                }
                panic!("{what}: it exited ({status}): {}", self.err.lock().unwrap().join("\n"));
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_stderr(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_in(&self.err, what, pred).await
    }
}

async fn wait_in(lines: &Lines, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_for(what, Duration::from_secs(60), || {
        let found = lines.lock().unwrap().iter().find(|l| pred(l)).cloned();
        async move { found }
    })
    .await
}

/// A shell line as a user would type it, in `cwd` with `home` as HOME and the binaries of this
/// build first on PATH.
fn shell(line: &str, cwd: &Path, home: &Path) -> Command {
    let bin_dir = bin("nodekeeper").parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("sh");
    // `exec`: the process is the command itself, so that signals reach it.
    cmd.arg("-c").arg(format!("exec {line}")).current_dir(cwd).env("HOME", home).env("PATH", path);
    cmd.env_remove("RUST_LOG").env_remove("NODEKEEPER_SERVER").env_remove("NODEKEEPER_CERTS");
    cmd
}

async fn run_line(line: &str, cwd: &Path, home: &Path) -> (i32, String, String) {
    let out = shell(line, cwd, home).output().await.expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The commands of the README's "Trying it" walkthrough, without their comments.
fn walkthrough() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("## Trying it").nth(1).expect("a Trying it section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap().trim().to_owned())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Runs `line` until it succeeds with an output that passes `check`: faults and plans are made
/// asynchronously, as a user typing the next line sees.
async fn expect(line: &str, cwd: &Path, home: &Path, what: &str, check: fn(&str) -> bool) -> String {
    wait_for(what, Duration::from_secs(60), || async move {
        let (code, out, _) = run_line(line, cwd, home).await;
        (code == 0 && check(&out)).then_some(out)
    })
    .await
}

/// Table rows (without the header) of a listing.
fn rows(out: &str) -> Vec<&str> {
    out.lines().skip(1).filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_does_what_it_says_in_order_on_a_fresh_data_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (cwd, home) = (tmp.path().join("repo"), tmp.path().join("home"));
    std::fs::create_dir_all(&cwd).unwrap();
    let lines = walkthrough();
    assert!(lines.len() >= 8, "{lines:?}");
    let mut dev = None;
    let mut watch = None;
    for line in &lines {
        let expect = |what: &'static str, check: fn(&str) -> bool| expect(line, &cwd, &home, what, check);
        match line.as_str() {
            // The test runs this build's binaries (debug), put first on PATH by `shell`.
            "export PATH=$PWD/target/release:$PATH" => {}
            "nodekeeper dev" => {
                let mut d = Running::spawn(shell(line, &cwd, &home));
                d.wait_line("dev running", |l| l.contains("nodekeeper dev is running")).await;
                dev = Some(d);
            }
            "nodekeeper nodes list" => {
                expect("this machine, alive and connected", |out| {
                    rows(out).len() == 1 && rows(out)[0].contains("alive") && rows(out)[0].contains(" yes ")
                })
                .await;
            }
            "nodekeeper events watch -o json" => {
                let w = Running::spawn(shell(line, &cwd, &home));
                // It follows from now: what happens once it says so is printed.
                w.wait_stderr("the watch following", |l| l.contains("following events from now")).await;
                watch = Some(w);
            }
            l if l.starts_with("nodekeeper-agent emit --type KernelDeadlock") => {
                let (code, out, err) = run_line(line, &cwd, &home).await;
                assert_eq!(code, 0, "{err}");
                assert!(out.contains("KernelDeadlock stored in the agent's outbox as observation"), "{out}");
            }
            "nodekeeper faults list --type KernelDeadlock" => {
                let out = expect("the fault it opened", |out| rows(out).len() == 1).await;
                assert!(rows(&out)[0].contains("KernelDeadlock"), "{out}");
            }
            "nodekeeper faults show --type KernelDeadlock" => {
                let out = expect("the remediator's plan in the fault's timeline", |out| {
                    out.contains("[dry run] isolate") && out.contains("[dry run] label-pods")
                })
                .await;
                assert!(out.lines().any(|l| l.starts_with("Type") && l.ends_with("KernelDeadlock")), "{out}");
            }
            "nodekeeper events list --type NodeRegistered" => {
                let out = expect("this machine's registration", |out| rows(out).len() == 1).await;
                assert!(rows(&out)[0].contains("NodeRegistered"), "{out}");
            }
            "nodekeeper consumers list" => {
                let out = expect("the remediator's durable consumer", |out| {
                    rows(out).iter().any(|r| r.starts_with("remediator") && r.contains("subscriber/dev/remediator"))
                })
                .await;
                assert!(out.starts_with("CONSUMER"), "{out}");
            }
            other => panic!("the README's walkthrough has a line this test does not check: {other:?}"),
        }
    }

    // The watch printed the emitted event as an Event object, and nothing but events.
    let mut watch = watch.expect("the walkthrough watches events");
    watch.wait_line("the emitted event in the watch", |l| l.contains("\"KernelDeadlock\"")).await;
    for l in watch.lines() {
        let v: serde_json::Value = serde_json::from_str(&l).expect("one JSON object per line");
        assert!(v.get("cursor").is_some() && v.get("type").is_some() && v.get("bookmark").is_none(), "{l}");
    }

    // Ctrl-C stops everything cleanly; each service says so in its log.
    let mut dev = dev.expect("the walkthrough starts dev");
    signal(dev.child.id().unwrap(), "INT");
    let status = tokio::time::timeout(Duration::from_secs(60), dev.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    let log = |name: &str| std::fs::read_to_string(cwd.join(".nodekeeper").join(name)).unwrap();
    assert!(log("remediator.log").contains("remediator stopped"));
    assert!(log("agent.log").contains("agent stopped"));
    // A machine without systemd (or without these units) gets one line about it, not one per
    // component and check.
    let unreadable = log("agent.log").matches("cannot read the units' state").count();
    assert!(unreadable <= 1, "{}", log("agent.log"));
}

/// `nodekeeper dev` with its own ports and data folder.
fn dev(data: &Path, home: &Path, port: u16, status_port: u16) -> Command {
    let mut cmd = Command::new(bin("nodekeeper"));
    cmd.args(["dev", "--data-dir"]).arg(data);
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--status-port", &status_port.to_string()]);
    cmd.args(["--dashboard", &format!("127.0.0.1:{}", nodekeeper_tests::free_port())]);
    cmd.env("HOME", home).env_remove("RUST_LOG").stderr(Stdio::piped());
    cmd
}

async fn nodekeeper(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("nodekeeper"))
        .args(args)
        .env("HOME", home)
        .env("RUST_LOG", "warn")
        .env_remove("NODEKEEPER_SERVER")
        .env_remove("NODEKEEPER_CERTS")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_of_another_ca_and_plaintext_against_tls_are_named_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    // An earlier dev run left credentials of its own CA where the CLI looks by default.
    let old = home.join(".config/nodekeeper/pki");
    let (code, _, err) = nodekeeper(&home, &["certs", "init", "--dir", old.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) =
        nodekeeper(&home, &["certs", "issue", "--dir", old.to_str().unwrap(), "--kind", "admin", "--name", "admin"])
            .await;
    assert_eq!(code, 0, "{err}");

    let data = tmp.path().join("dev");
    let (port, status_port) = (nodekeeper_tests::free_port(), nodekeeper_tests::free_port());
    let mut d = Running::spawn(dev(&data, &home, port, status_port));
    d.wait_line("dev running", |l| l.contains("Ctrl-C stops everything")).await;
    let pki = data.canonicalize().unwrap().join("pki");
    let out = d.lines().join("\n");
    assert!(out.contains("holds credentials of another CA, left as they are"), "{out}");
    // Every "Try:" line of the CLI carries the folder that works.
    let try_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("  nodekeeper ")).collect();
    assert!(!try_lines.is_empty(), "{out}");
    for l in &try_lines {
        assert!(l.contains(&format!("--certs {}", pki.display())), "{l}");
    }
    let nodes_line = try_lines.iter().find(|l| l.trim_end().ends_with("nodes list")).expect("a nodes list line");
    let args: Vec<&str> = nodes_line.split_whitespace().skip(1).collect();
    let (code, listed, err) = nodekeeper(&home, &args).await;
    assert_eq!(code, 0, "the printed line works: {err}");
    assert!(rows(&listed).len() == 1, "{listed}");

    let host_port = format!("127.0.0.1:{port}");
    // Without --certs: the center's certificate is not from the CA in that folder; say so, and
    // what to do.
    let (code, _, err) = nodekeeper(&home, &["--server", &host_port, "nodes", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("not signed by the CA in {}", old.join("ca.pem").display())), "{err}");
    assert!(err.contains("--certs") && !err.contains("BadSignature"), "{err}");
    // host:port is TLS; with the right folder it works.
    let (code, _, err) =
        nodekeeper(&home, &["--server", &host_port, "--certs", pki.to_str().unwrap(), "nodes", "list"]).await;
    assert_eq!(code, 0, "{err}");
    // A client certificate of another CA that trusts the center: the center refuses it.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(pki.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["admin.pem", "admin-key.pem"] {
        std::fs::copy(old.join(f), mixed.join(f)).unwrap();
    }
    let (code, _, err) =
        nodekeeper(&home, &["--server", &host_port, "--certs", mixed.to_str().unwrap(), "nodes", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("refused the certificate in") && err.contains("issued by the center's CA"), "{err}");
    // Plaintext meeting TLS.
    let http = format!("http://{host_port}");
    let (code, _, err) = nodekeeper(&home, &["--server", &http, "nodes", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("speaks TLS, not plaintext: use --server https://"), "{err}");
    assert!(!err.contains("broken pipe") && !err.contains("h2 protocol"), "{err}");

    // A second dev on the same ports says which port is taken instead of finding the first one.
    let second = dev(&tmp.path().join("dev2"), &home, port, nodekeeper_tests::free_port()).output().await.unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{host_port} is not free")) && err.contains("--listen"), "{err}");

    // However dev ends, its services end with it: after `kill -9` each stops cleanly (SIGTERM
    // from the kernel) and the center's port closes.
    signal(d.child.id().unwrap(), "KILL");
    d.child.wait().await.unwrap();
    let dir = data.canonicalize().unwrap();
    for (log, says) in [
        ("eventcenter.log", "event center stopped"),
        ("agent.log", "agent stopped"),
        ("detector.log", "detector stopped"),
        ("remediator.log", "remediator stopped"),
    ] {
        wait_for(says, Duration::from_secs(30), || {
            let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            async move { text.contains(says).then_some(()) }
        })
        .await;
    }
    wait_for("the center's port closed", Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_fails_to_start_under_dev_shows_why() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    std::fs::create_dir_all(&data).unwrap();
    // The center's data folder cannot be made: a file is in the way.
    std::fs::write(data.join("eventcenter"), "not a folder").unwrap();
    let (port, status_port) = (nodekeeper_tests::free_port(), nodekeeper_tests::free_port());
    let out = dev(&data, &tmp.path().join("home"), port, status_port).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the event center exited (exit status:") && err.contains("during start"), "{err}");
    // The center's own error line, from its log of this run.
    let cause = err.lines().find(|l| l.contains("ERROR")).unwrap_or_else(|| panic!("no cause: {err}"));
    assert!(cause.contains(&data.join("eventcenter").display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_read_once_plaintext_centers_are_named_and_help_lines_are_complete() {
    let center = EventCenter::start("bookmark_interval = \"100ms\"\n").await;
    let url = center.url();
    let home = tempfile::tempdir().unwrap();

    // A status reads once: its code in words and its message.
    let (code, _, err) = cli(&url, &["faults", "show", "99"]).await;
    assert_eq!(code, 4);
    assert_eq!(err.trim(), "nodekeeper: not found: no fault 99");
    let (code, _, err) = cli(&url, &["faults", "show", "--type", "NoSuchType"]).await;
    assert_eq!((code, err.trim()), (4, "nodekeeper: not found: no fault of type NoSuchType"));
    // TLS meeting a plaintext center: without credentials, what is missing and where; with them,
    // that the center does not speak TLS.
    let host_port = url.trim_start_matches("http://");
    let (code, _, err) = nodekeeper(home.path(), &["--server", host_port, "nodes", "list"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a TLS connection needs ca.pem, admin.pem and admin-key.pem in --certs"), "{err}");
    assert!(err.contains(&format!("for a center without TLS use --server {url}")), "{err}");
    let pki = home.path().join(".config/nodekeeper/pki");
    let pki = pki.to_str().unwrap();
    assert_eq!(nodekeeper(home.path(), &["certs", "init", "--dir", pki]).await.0, 0);
    assert_eq!(
        nodekeeper(home.path(), &["certs", "issue", "--dir", pki, "--kind", "admin", "--name", "admin"]).await.0,
        0
    );
    let (code, _, err) = nodekeeper(home.path(), &["--server", host_port, "nodes", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("does not speak TLS (a center with insecure = true?): use --server {url}")), "{err}");

    // Help: every local command shows only its own flags; dev says what it runs.
    for args in [&["dev", "--help"][..], &["certs", "issue", "--help"], &["certs", "init", "--help"]] {
        let (code, out, _) = nodekeeper(home.path(), args).await;
        assert_eq!(code, 0);
        for global in ["--server", "--certs", "--identity", "--output"] {
            assert!(!out.contains(global), "{args:?} shows {global}: {out}");
        }
    }
    let (_, out, _) = nodekeeper(home.path(), &["dev", "--help"]).await;
    for part in ["event center", "agent", "detector", "remediator"] {
        assert!(out.contains(part), "{out}");
    }
    let (code, _, err) = nodekeeper(home.path(), &["dev", "--server", "x:1"]).await;
    assert_eq!(code, 2, "a connection flag on dev is bad usage: {err}");
    assert!(err.contains("--server applies to the commands that talk to an event center"), "{err}");
    // Flags the review found without a help line now have one (`-h`: one line per flag).
    for (args, flag, words) in [
        (&["freeze", "-h"][..], "--reason", "Why"),
        (&["unfreeze", "-h"], "--cluster", "The cluster to unfreeze"),
        (&["permits", "list", "-h"], "--cluster", "Only permits of this cluster"),
        (&["breaker", "reset", "-h"], "--cluster", "The cluster whose breaker"),
        (&["components", "set", "-h"], "--cluster", "The cluster of the nodes"),
        (&["components", "restart", "-h"], "<COMPONENT>", "The component's name"),
        (&["components", "reinstall", "-h"], "--node", "The node's name"),
        (&["consumers", "delete", "-h"], "<NAME>", "The consumer's name"),
        (&["faults", "list", "-h"], "--limit", "At most this many faults"),
        (&["storage", "force", "-h"], "--target", "The list's target name"),
    ] {
        let (_, out, _) = nodekeeper(home.path(), &[&["--server", &url][..], args].concat()).await;
        let line = out.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{args:?}: {out}"));
        assert!(line.contains(words), "{args:?}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_watch_json_prints_events_only_and_bookmarks_on_request() {
    // Bookmarks every 100 ms while nothing matches.
    let center = EventCenter::start("bookmark_interval = \"100ms\"\n").await;
    let url = center.url();
    let watch = |extra: &[&str]| {
        let mut cmd = Command::new(bin("nodekeeper"));
        cmd.args(["--server", &url, "events", "watch", "-o", "json", "--type", "KernelDeadlock"]).args(extra);
        cmd
    };
    let mut plain = Running::spawn(watch(&[]));
    plain.wait_stderr("the plain watch following", |l| l.contains("following events from now")).await;
    // The bookmarks watch starts after the plain one: by the time it has printed two bookmarks,
    // the plain one has been idle through them as well.
    let mut with_bookmarks = Running::spawn(watch(&["--bookmarks"]));
    with_bookmarks.wait_line("a bookmark", |l| l.contains("\"bookmark\"")).await;
    wait_for("a second bookmark", Duration::from_secs(30), || {
        let n = with_bookmarks.lines().len();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert!(plain.lines().is_empty(), "no bookmarks without --bookmarks: {:?}", plain.lines());

    // An event: the plain watch prints it as an Event, the other wrapped as {"event": ...}.
    let mut agent =
        nodekeeper_tests::AgentConn::connect(&url, nodekeeper_tests::hello("c1", "n1", "b1")).await.unwrap();
    let mut o = nodekeeper_tests::observation(1);
    o.r#type = "KernelDeadlock".into();
    agent.send_acked(1, vec![o]).await;
    let line = plain.wait_line("the event", |_| true).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["type"].as_str(), v["node"].as_str()), (Some("KernelDeadlock"), Some("n1")), "{line}");
    let wrapped = with_bookmarks.wait_line("the wrapped event", |l| l.contains("\"event\"")).await;
    assert_eq!(json_lines(&wrapped)[0]["event"]["cursor"], v["cursor"]);
}
