//! The hardware, resource, component and plugin monitors on fixture trees in the kernel's formats
//! (and a real tmpfs for disk usage, a real HTTP listener for health checks), each through the
//! transition problem → cleared; the file log source across rotation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper_agent::monitor::hardware::{self, Check};
use nodekeeper_agent::monitor::{Finding, Problem, components, logs, plugins, rules, state::Reporter};
use nodekeeper_agent::outbox::Outbox;
use nodekeeper_proto::v1::ConditionStatus;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The status each condition finding sets.
fn statuses(found: &[Finding]) -> Vec<(String, ConditionStatus)> {
    found
        .iter()
        .filter_map(|f| match &f.problem {
            Problem::Permanent { condition, status } => Some((condition.clone(), *status)),
            Problem::Temporary => None,
        })
        .collect()
}

fn status_of(found: &[Finding], condition: &str) -> Option<ConditionStatus> {
    statuses(found).into_iter().find(|(c, _)| c == condition).map(|(_, s)| s)
}

fn temporary<'a>(found: &'a [Finding], reason: &str) -> Option<&'a Finding> {
    found.iter().find(|f| f.problem == Problem::Temporary && f.reason == reason)
}

#[test]
fn edac_counters() {
    let t = tempfile::tempdir().unwrap();
    let mc = "devices/system/edac/mc";
    for m in ["mc0", "mc1"] {
        write(t.path(), &format!("{mc}/{m}/ce_count"), "0\n");
        write(t.path(), &format!("{mc}/{m}/ue_count"), "0\n");
        write(t.path(), &format!("{mc}/{m}/mc_name"), "Skylake Socket#0 IMC#0\n");
    }
    let mut edac = hardware::Edac::new(t.path());
    let f = edac.check();
    assert_eq!(status_of(&f, "EdacUncorrectableErrors"), Some(ConditionStatus::False));
    assert!(temporary(&f, "CorrectableMemoryErrors").is_none(), "the first reading is the baseline");
    write(t.path(), &format!("{mc}/mc1/ce_count"), "7\n");
    write(t.path(), &format!("{mc}/mc0/ue_count"), "1\n");
    let f = edac.check();
    assert_eq!(
        temporary(&f, "CorrectableMemoryErrors").unwrap().message,
        "7 new correctable memory errors (7 since boot)"
    );
    assert_eq!(status_of(&f, "EdacUncorrectableErrors"), Some(ConditionStatus::True));
    assert!(f.iter().any(|x| x.message.contains("mc0: 1")));
    // Counters reset (a reboot, a replaced DIMM): cleared.
    write(t.path(), &format!("{mc}/mc0/ue_count"), "0\n");
    assert_eq!(status_of(&edac.check(), "EdacUncorrectableErrors"), Some(ConditionStatus::False));
    // No EDAC driver: nothing to say.
    assert!(hardware::Edac::new(&t.path().join("none")).check().is_empty());
}

#[test]
fn thermal_throttle_counters() {
    let t = tempfile::tempdir().unwrap();
    for cpu in ["cpu0", "cpu1"] {
        write(t.path(), &format!("devices/system/cpu/{cpu}/thermal_throttle/core_throttle_count"), "3\n");
        write(t.path(), &format!("devices/system/cpu/{cpu}/thermal_throttle/package_throttle_count"), "0\n");
    }
    write(t.path(), "devices/system/cpu/cpufreq/policy0/scaling_governor", "performance\n");
    let mut th = hardware::Thermal::new(t.path());
    assert!(th.check().is_empty());
    write(t.path(), "devices/system/cpu/cpu1/thermal_throttle/package_throttle_count", "4\n");
    let f = th.check();
    assert_eq!(temporary(&f, "CPUThermalThrottling").unwrap().attributes, vec![("events".to_owned(), "4".to_owned())]);
    assert!(th.check().is_empty(), "no new throttling: nothing");
}

#[test]
fn nic_link_state_and_flaps() {
    let t = tempfile::tempdir().unwrap();
    let net = "class/net";
    let nic = |name: &str, carrier: &str, changes: u64, flags: &str| {
        write(t.path(), &format!("{net}/{name}/carrier"), &format!("{carrier}\n"));
        write(t.path(), &format!("{net}/{name}/carrier_changes"), &format!("{changes}\n"));
        write(t.path(), &format!("{net}/{name}/flags"), &format!("{flags}\n"));
        write(t.path(), &format!("{net}/{name}/operstate"), if carrier == "1" { "up\n" } else { "down\n" });
    };
    nic("eth0", "1", 2, "0x1003");
    std::fs::create_dir_all(t.path().join(format!("{net}/eth0/device"))).unwrap();
    nic("eth1", "1", 0, "0x1002"); // administratively down: its state is not a fault
    std::fs::create_dir_all(t.path().join(format!("{net}/eth1/device"))).unwrap();
    nic("veth12", "0", 0, "0x1003"); // virtual: no device link, not watched
    let mut n = hardware::Nics::new(t.path(), Vec::new(), 6, Duration::from_secs(600));
    let f = n.check();
    assert_eq!(status_of(&f, "NICLinkDown"), Some(ConditionStatus::False));
    assert_eq!(status_of(&f, "NICLinkFlapping"), Some(ConditionStatus::False));
    nic("eth0", "0", 3, "0x1003");
    nic("eth1", "0", 0, "0x1002");
    let f = n.check();
    assert_eq!(status_of(&f, "NICLinkDown"), Some(ConditionStatus::True));
    assert!(f.iter().any(|x| x.message == "no carrier on eth0"), "{f:?}");
    nic("eth0", "1", 9, "0x1003"); // 7 changes since the first reading
    let f = n.check();
    assert_eq!(status_of(&f, "NICLinkDown"), Some(ConditionStatus::False));
    assert_eq!(status_of(&f, "NICLinkFlapping"), Some(ConditionStatus::True));
    // A window that has passed forgets the flaps.
    let mut quick = hardware::Nics::new(t.path(), vec!["eth0".into()], 6, Duration::from_millis(1));
    quick.check();
    nic("eth0", "1", 20, "0x1003");
    assert_eq!(status_of(&quick.check(), "NICLinkFlapping"), Some(ConditionStatus::True));
    let deadline = std::time::Instant::now() + Duration::from_millis(2);
    while std::time::Instant::now() < deadline {
        std::hint::spin_loop();
    }
    assert_eq!(status_of(&quick.check(), "NICLinkFlapping"), Some(ConditionStatus::False));
}

#[test]
fn read_only_mounts() {
    let t = tempfile::tempdir().unwrap();
    let mounts = |root_opts: &str| {
        write(
            t.path(),
            "mounts",
            &format!(
                "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n/dev/sda1 / ext4 {root_opts},relatime,errors=remount-ro 0 0\n\
                 /dev/sdb1 /var/lib/kubelet xfs rw,relatime,attr2,inode64 0 0\n/dev/sr0 /media/cdrom iso9660 ro,relatime 0 0\n"
            ),
        )
    };
    mounts("rw");
    let mut m = hardware::Mounts::new(t.path(), vec!["/".into(), "/var/lib/kubelet".into(), "/var/lib/docker".into()]);
    assert_eq!(status_of(&m.check(), "ReadonlyMount"), Some(ConditionStatus::False), "a read-only CD is not watched");
    mounts("ro");
    let f = m.check();
    assert_eq!(status_of(&f, "ReadonlyMount"), Some(ConditionStatus::True));
    assert_eq!(f[0].message, "mounted read-only: /");
    mounts("rw");
    assert_eq!(status_of(&m.check(), "ReadonlyMount"), Some(ConditionStatus::False));
}

#[test]
fn pressure_stall_information() {
    let t = tempfile::tempdir().unwrap();
    let psi = |mem_full: f64| {
        write(
            t.path(),
            "pressure/cpu",
            "some avg10=1.00 avg60=2.00 avg300=1.00 total=100\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        write(
            t.path(),
            "pressure/memory",
            &format!(
                "some avg10=0.00 avg60=30.00 avg300=0.00 total=5\nfull avg10=0.00 avg60={mem_full:.2} avg300=0.00 total=5\n"
            ),
        );
        write(
            t.path(),
            "pressure/io",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
    };
    psi(5.0);
    let mut p =
        hardware::Pressure::new(t.path(), hardware::PsiThresholds { cpu_some: 80.0, memory_full: 20.0, io_full: 30.0 });
    assert_eq!(statuses(&p.check()).iter().filter(|(_, s)| *s == ConditionStatus::True).count(), 0);
    psi(25.5);
    let f = p.check();
    assert_eq!(status_of(&f, "MemoryPressureStall"), Some(ConditionStatus::True));
    assert_eq!(status_of(&f, "CPUPressureStall"), Some(ConditionStatus::False));
    psi(1.0);
    assert_eq!(status_of(&p.check(), "MemoryPressureStall"), Some(ConditionStatus::False));
}

/// A real 1 MiB tmpfs with 64 inodes, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,nr_inodes=64", "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs the tests as root)");
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn disk_and_inode_usage_on_a_real_file_system() {
    let fs = Tmpfs::mount();
    let root = fs.0.path();
    let mut d = hardware::DiskUsage::new(vec![root.to_owned(), PathBuf::from("/nonexistent")], 90.0, 90.0);
    let f = d.check();
    assert_eq!(status_of(&f, "DiskUsageHigh"), Some(ConditionStatus::False));
    assert_eq!(status_of(&f, "InodeUsageHigh"), Some(ConditionStatus::False));
    std::fs::write(root.join("big"), vec![7u8; 980 * 1024]).unwrap();
    let f = d.check();
    assert_eq!(status_of(&f, "DiskUsageHigh"), Some(ConditionStatus::True), "{f:?}");
    std::fs::remove_file(root.join("big")).unwrap();
    for i in 0..60 {
        std::fs::write(root.join(format!("f{i}")), "").unwrap();
    }
    let f = d.check();
    assert_eq!(status_of(&f, "DiskUsageHigh"), Some(ConditionStatus::False));
    assert_eq!(status_of(&f, "InodeUsageHigh"), Some(ConditionStatus::True));
    for i in 0..60 {
        std::fs::remove_file(root.join(format!("f{i}"))).unwrap();
    }
    assert_eq!(status_of(&d.check(), "InodeUsageHigh"), Some(ConditionStatus::False));
}

#[test]
fn smart_health_through_smartctl() {
    // smartctl cannot reach real disks here: a stand-in that prints smartctl 7.3's JSON shapes,
    // passing or failing as the test says.
    let t = tempfile::tempdir().unwrap();
    let verdict = t.path().join("passed");
    std::fs::write(&verdict, "true").unwrap();
    let script = t.path().join("smartctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n--scan) echo '{{\"devices\":[{{\"name\":\"/dev/sda\",\"type\":\"sat\"}}]}}' ;;\n*) echo \"{{\\\"device\\\":{{\\\"name\\\":\\\"$3\\\"}},\\\"smart_status\\\":{{\\\"passed\\\":$(cat {})}}}}\" ;;\nesac\n",
            verdict.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut s = hardware::Smart::new(&script, Duration::from_secs(5)).expect("found");
    assert_eq!(status_of(&s.check(), "DiskSMARTFailing"), Some(ConditionStatus::False));
    std::fs::write(&verdict, "false").unwrap();
    let f = s.check();
    assert_eq!(status_of(&f, "DiskSMARTFailing"), Some(ConditionStatus::True));
    assert_eq!(f[0].message, "SMART health failed: /dev/sda");
    assert!(
        hardware::Smart::new(Path::new("/nonexistent/smartctl"), Duration::from_secs(1)).is_none(),
        "not installed: off"
    );
}

fn reporter() -> (tempfile::TempDir, Outbox, Reporter) {
    let t = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(t.path(), 1 << 20).unwrap();
    let r = Reporter::open(outbox.clone(), "boot-1").unwrap();
    (t, outbox, r)
}

/// (type, condition status if any, message) of what is in the outbox.
fn pending(outbox: &Outbox) -> Vec<(String, Option<ConditionStatus>, String)> {
    outbox
        .pending_blocking(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|o| (o.r#type.clone(), o.condition.map(|c| c.status()), o.message))
        .collect()
}

async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_unit_state_restarts_and_health() {
    // systemd cannot run here: a stand-in systemctl that prints `systemctl show` properties from a
    // file per unit (the exact KEY=value format); kubelet's health endpoint is a real listener.
    let t = tempfile::tempdir().unwrap();
    let systemctl = t.path().join("systemctl");
    std::fs::write(&systemctl, format!("#!/bin/sh\ncat {}/\"$2\".props\n", t.path().display())).unwrap();
    std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let props = |unit: &str, text: &str| std::fs::write(t.path().join(format!("{unit}.props")), text).unwrap();
    props("docker.service", "LoadState=not-found\nActiveState=inactive\nSubState=dead\nNRestarts=0\nInvocationID=\n");
    props("kubelet.service", "LoadState=loaded\nActiveState=active\nSubState=running\nNRestarts=0\nInvocationID=a0\n");
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = healthy.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let status = if h.load(std::sync::atomic::Ordering::SeqCst) { "200 OK" } else { "503 Service Unavailable" };
            let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes()).await;
        }
    });
    let watch = vec![
        components::ComponentWatch {
            name: "docker".into(),
            unit: "docker.service".into(),
            health_url: None,
            socket: None,
            socket_http_path: None,
        },
        components::ComponentWatch {
            name: "kubelet".into(),
            unit: "kubelet.service".into(),
            health_url: Some(format!("http://{addr}/healthz")),
            socket: None,
            socket_http_path: None,
        },
    ];
    let settings = components::Settings {
        interval: Duration::from_millis(100),
        systemctl,
        timeout: Duration::from_secs(2),
        restart_count: 5,
        restart_window: Duration::from_secs(1200),
    };
    let (_dir, outbox, reporter) = reporter();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(components::run(watch, settings, reporter, cancel.clone()));
    let has = |kind: &str, status: Option<ConditionStatus>| {
        let p = pending(&outbox);
        p.iter().any(|(t, s, _)| t == kind && *s == status).then_some(p)
    };
    // docker is checked first, kubelet second.
    let p = wait_until("kubelet reported present", || has("ComponentPresent", None)).await;
    assert!(p.iter().any(|(t, _, m)| t == "ComponentAbsent" && m.contains("docker")), "{p:?}");
    assert!(
        !p.iter().any(|(t, _, _)| t.starts_with("Docker") || t.starts_with("FrequentDocker")),
        "absent is not failed: {p:?}"
    );
    assert!(!p.iter().any(|(_, s, _)| s.is_some()), "healthy conditions are not reported: {p:?}");

    // The health endpoint fails: KubeletUnhealthy; it answers again: cleared.
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let p = wait_until("KubeletUnhealthy", || has("KubeletUnhealthy", Some(ConditionStatus::True))).await;
    assert!(p.iter().any(|(_, _, m)| m.contains("503")), "{p:?}");
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until("KubeletUnhealthy cleared", || has("KubeletUnhealthy", Some(ConditionStatus::False))).await;

    // Five starts (new invocation ids, automatic restarts counted too) within the window.
    for (i, n) in [(1, 0), (2, 2), (3, 4)] {
        props(
            "kubelet.service",
            &format!("LoadState=loaded\nActiveState=active\nSubState=running\nNRestarts={n}\nInvocationID=a{i}\n"),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let p = wait_until("FrequentKubeletRestart", || has("FrequentKubeletRestart", Some(ConditionStatus::True))).await;
    assert!(p.iter().any(|(_, _, m)| m.starts_with("kubelet started 5 times")), "{p:?}");

    // A failed unit.
    props("kubelet.service", "LoadState=loaded\nActiveState=failed\nSubState=failed\nNRestarts=4\nInvocationID=a3\n");
    let p = wait_until("a failed unit", || {
        let p = pending(&outbox);
        p.iter()
            .any(|(t, s, m)| t == "KubeletUnhealthy" && *s == Some(ConditionStatus::True) && m.contains("is failed"))
            .then_some(p)
    })
    .await;
    assert!(!p.is_empty());
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn npd_custom_plugin_file_unmodified_with_its_plugin() {
    // The file as node-problem-detector ships it, next to the plugin it names.
    let t = tempfile::tempdir().unwrap();
    let npd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/npd/custom-plugin-monitor.json");
    std::fs::copy(&npd, t.path().join("custom-plugin-monitor.json")).unwrap();
    let script = t.path().join("config/plugin/check_ntp.sh");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    let set = |code: i32, msg: &str| {
        std::fs::write(&script, format!("#!/bin/sh\necho '{msg}'\nexit {code}\n")).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    let rules::MonitorSpec::Plugin(spec) = rules::load(&t.path().join("custom-plugin-monitor.json")).unwrap() else {
        panic!()
    };
    let run = || async {
        let mut found = Vec::new();
        for r in &spec.rules {
            found.extend(plugins::finding(&spec, r, plugins::invoke(r, spec.max_output_length).await));
        }
        found
    };
    let (_dir, outbox, reporter) = reporter();
    for c in &spec.conditions {
        reporter.declare(c);
    }
    set(1, "NTP service is not running");
    reporter.report(run().await).await.unwrap();
    set(1, "NTP service is not running");
    reporter.report(run().await).await.unwrap();
    set(0, "NTP service is running");
    reporter.report(run().await).await.unwrap();
    set(2, "cannot tell");
    reporter.report(run().await).await.unwrap();
    assert_eq!(
        pending(&outbox),
        vec![
            ("NTPIsDown".into(), None, "NTP service is not running".into()),
            ("NTPProblem".into(), Some(ConditionStatus::True), "NTP service is not running".into()),
            // The temporary rule reports every problem; the condition only when it changes.
            ("NTPIsDown".into(), None, "NTP service is not running".into()),
            ("NTPProblem".into(), Some(ConditionStatus::False), "ntp service is up".into()),
            ("NTPProblem".into(), Some(ConditionStatus::Unknown), "cannot tell".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_file_is_followed_across_rotation_and_truncation() {
    let t = tempfile::tempdir().unwrap();
    let log = t.path().join("messages");
    std::fs::write(&log, "old line: Remounting filesystem read-only\n").unwrap();
    let rules_file = t.path().join("file.toml");
    std::fs::write(
        &rules_file,
        format!(
            "source = \"file-monitor\"\n[log]\nkind = \"file\"\npath = \"{}\"\n[[rules]]\ntype = \"temporary\"\nreason = \"Boom\"\npattern = 'boom \\d+'\n",
            log.display()
        ),
    )
    .unwrap();
    let rules::MonitorSpec::Log(spec) = rules::load(&rules_file).unwrap() else { panic!() };
    let (_dir, outbox, reporter) = reporter();
    let budget = logs::Budget { lines_per_second: 1000.0, burst: 1000.0 };
    let handle = logs::spawn(spec, reporter, nodekeeper_agent::metrics::Metrics::default(), budget, "boot-1");
    let append = |text: &str| {
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).create(true).open(&log).unwrap().write_all(text.as_bytes()).unwrap();
    };
    let messages = || pending(&outbox).into_iter().map(|(_, _, m)| m).collect::<Vec<_>>();
    // Started without a position and without timestamps: only new lines.
    append("boom 1\nnothing\n");
    wait_until("boom 1", || (messages() == ["boom 1"]).then_some(())).await;
    // Rotation: renamed away, a new file at the path. The rest of the old one is read first.
    append("boom 2\n");
    std::fs::rename(&log, t.path().join("messages.1")).unwrap();
    std::fs::OpenOptions::new().append(true).open(t.path().join("messages.1")).unwrap();
    append("boom 3\nand a longer line that is no problem at all\n");
    wait_until("boom 3", || (messages() == ["boom 1", "boom 2", "boom 3"]).then_some(())).await;
    // copytruncate: the file shrinks; reading starts over. (As with `tail -F`, a truncation is seen
    // by the size going down: it must not have grown back past the old size before the next look.)
    std::fs::write(&log, "").unwrap();
    append("boom 4\n");
    wait_until("boom 4", || (messages().last().map(String::as_str) == Some("boom 4")).then_some(())).await;
    tokio::task::spawn_blocking(move || handle.stop()).await.unwrap();
}
