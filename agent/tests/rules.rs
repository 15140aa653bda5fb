//! The default kernel rules on real kernel log lines and near misses, and node-problem-detector's
//! own rule files (../shared/fixtures/npd) loaded unmodified and replayed as that project
//! documents.

use std::path::{Path, PathBuf};

use nodekeeper_agent::monitor::logs::{Format, Replayed, replay};
use nodekeeper_agent::monitor::rules::{self, Input, LogMonitorSpec, MonitorSpec};
use nodekeeper_agent::monitor::{Problem, rules::default_kernel_monitor};
use nodekeeper_proto::v1::ConditionStatus;

fn defaults() -> LogMonitorSpec {
    default_kernel_monitor(Path::new("/dev/kmsg"))
}

/// What each finding is called: the reason of a temporary one, the condition of a permanent one.
fn names(found: &[Replayed]) -> Vec<String> {
    found
        .iter()
        .map(|r| match &r.finding.problem {
            Problem::Temporary => r.finding.reason.clone(),
            Problem::Permanent { condition, .. } => condition.clone(),
        })
        .collect()
}

fn one_line(spec: &LogMonitorSpec, line: &str) -> Vec<String> {
    names(&replay(std::slice::from_ref(spec), line, Format::Plain))
}

/// (reason or condition, real kernel lines that must report it, near misses that must not).
const CASES: &[(&str, &[&str], &[&str])] = &[
    (
        "OOMKilling",
        &[
            "Out of memory: Killed process 4242 (stress-ng) total-vm:8404036kB, anon-rss:7953540kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:15640kB oom_score_adj:0",
            "Memory cgroup out of memory: Killed process 1234 (java) total-vm:3421116kB, anon-rss:1046508kB, file-rss:22816kB, shmem-rss:0kB, UID:1000 pgtables:2432kB oom_score_adj:999",
        ],
        &[
            "java invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=999",
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=pod1,mems_allowed=0,task=java,pid=1234,uid=1000",
        ],
    ),
    (
        "TaskHung",
        &[
            "INFO: task kworker/u16:2:12345 blocked for more than 122 seconds.",
            "INFO: task jbd2/sda1-8:311 blocked for more than 120 seconds.",
        ],
        &[
            "\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.",
            "INFO: task kworker/u16:2:12345 blocked for more than 122 seconds. (again)",
        ],
    ),
    (
        "KernelDeadlock",
        &[
            "INFO: task dockerd:1234 blocked for more than 120 seconds.",
            "INFO: task containerd:981 blocked for more than 241 seconds.",
            "NMI watchdog: Watchdog detected hard LOCKUP on cpu 3",
            "WARNING: possible circular locking dependency detected",
        ],
        &[
            "INFO: task dockerd-helper:1234 blocked for more than 120 seconds.",
            "NMI watchdog: Enabled. Permanently consumes one hw-PMU counter.",
            "WARNING: possible recursive locking detected in a test module",
        ],
    ),
    (
        "SoftLockup",
        &[
            "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [kworker/3:1:123]",
            "BUG: soft lockup - CPU#0 stuck for 67s! [swapper/0:0]",
        ],
        &["watchdog: watchdog0: watchdog did not stop!", "soft lockup - CPU#3 stuck for 23s"],
    ),
    (
        "RcuStall",
        &["rcu: INFO: rcu_sched detected stalls on CPUs/tasks:", "rcu: INFO: rcu_preempt self-detected stall on CPU"],
        &["rcu: Hierarchical RCU implementation.", "rcu: INFO: rcu_sched detected expedited stalls"],
    ),
    (
        "KernelOops",
        &[
            "BUG: unable to handle kernel NULL pointer dereference at 0000000000000008",
            "BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "BUG: unable to handle page fault for address: ffffffffc0a1b000",
            "Oops: 0002 [#1] SMP PTI",
            "Oops: general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI",
            "divide error: 0000 [#1] SMP",
            "divide error: 0000 [#1] SMP PTI",
            "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
            "general protection fault: 0000 [#1] SMP",
        ],
        &[
            "traps: a.out[1234] trap divide error ip:401136 sp:7ffd3c0b9b50 error:0 in a.out[401000+1000]",
            "BUG: Bad page state in process java  pfn:1fe2e",
            "divide error: 0000 [#1] SMP PTI in a module",
        ],
    ),
    (
        "KernelBug",
        &["kernel BUG at mm/slub.c:3904!"],
        &["------------[ cut here ]------------", "kernel BUG at mm/slub.c:3904"],
    ),
    (
        "KernelPanic",
        &["Kernel panic - not syncing: Fatal exception", "Kernel panic - not syncing: hung_task: blocked tasks"],
        &["Kernel command line: BOOT_IMAGE=/vmlinuz root=/dev/sda1 panic=10"],
    ),
    (
        "Ext4Error",
        &["EXT4-fs error (device sda1): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0"],
        &[
            "EXT4-fs (sda1): mounted filesystem with ordered data mode. Opts: (null)",
            "EXT4-fs warning (device sda1): ext4_dx_add_entry:2461: Directory index full!",
        ],
    ),
    (
        "XfsError",
        &[
            "XFS (sdb1): Metadata corruption detected at xfs_buf_ioend+0x51/0x150 [xfs], xfs_inode block 0x1a0 xfs_inode_buf_verify",
        ],
        &["XFS (sdb1): Mounting V5 Filesystem", "XFS (sdb1): Ending clean mount"],
    ),
    (
        "XfsShutdown",
        &[
            "XFS (dm-0): Filesystem has been shut down due to log error (0x2).",
            "XFS (sdb1): Corruption of in-memory data detected.  Shutting down filesystem",
        ],
        &["XFS (sdb1): Unmounting Filesystem", "XFS (sdb1): Please unmount the filesystem and rectify the problem(s)"],
    ),
    (
        "ReadonlyFilesystem",
        &["EXT4-fs (sda1): Remounting filesystem read-only"],
        &[
            "EXT4-fs (sda1): re-mounted. Opts: errors=remount-ro",
            "EXT4-fs (sda1): Remounting filesystem read-only because of a test",
        ],
    ),
    (
        "IOError",
        &[
            "Buffer I/O error on dev sdb1, logical block 0, async page read",
            "blk_update_request: I/O error, dev sdb, sector 2048 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0",
            "I/O error, dev nvme0n1, sector 16 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2",
            "blk_update_request: critical medium error, dev sdc, sector 1234 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0",
        ],
        &["sd 0:0:0:0: [sda] Attached SCSI disk", "print_req_error: 1 callbacks suppressed"],
    ),
    (
        "CperHardwareErrorCorrected",
        &["{1}[Hardware Error]: event severity: corrected"],
        &[
            "{1}[Hardware Error]: event severity: corrected by firmware",
            "{1}[Hardware Error]: Hardware error from APEI Generic Hardware Error Source: 0",
        ],
    ),
    (
        "CperHardwareErrorRecoverable",
        &["{2}[Hardware Error]: event severity: recoverable"],
        &["[Hardware Error]: event severity: recoverable, really"],
    ),
    (
        "CperHardwareErrorFatal",
        &["{3}[Hardware Error]: event severity: fatal"],
        &["{3}[Hardware Error]: event severity: fatality"],
    ),
    (
        "MachineCheckCorrected",
        &["mce: [Hardware Error]: Machine check events logged"],
        &["mce: CPU supports 22 MCE banks"],
    ),
    (
        "UncorrectableMemoryError",
        &[
            "mce: Uncorrected hardware memory error in user-access at 1c41cd6d4b",
            "mce: [Hardware Error]: Machine check: Processor context corrupt",
            "EDAC MC0: 1 UE memory read error on CPU_SrcID#0_Ha#0_Chan#0_DIMM#1 (channel:0 slot:1 page:0x1234 offset:0x0 grain:32 - area:DRAM err_code:0001:0090 socket:0 ha:0 channel_mask:1 rank:4)",
        ],
        &["EDAC MC: Ver: 3.0.0", "mce: [Hardware Error]: CPU 2: Machine Check: 0 Bank 5: be00000000800400"],
    ),
    (
        "MemoryReadError",
        &[
            "EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0 page:0x8b2a22 offset:0x0 grain:32 syndrome:0x0 - area:DRAM err_code:0001:0091 socket:0 ha:0 channel_mask:2 rank:1)",
        ],
        &[
            "EDAC MC0: Giving out device to module sb_edac controller Haswell SrcID#0_Ha#0: DEV 0000:7f:12.0 (INTERRUPT)",
        ],
    ),
    (
        "NetdevWatchdogTimeout",
        &[
            "NETDEV WATCHDOG: eth0 (ixgbe): transmit queue 3 timed out",
            "NETDEV WATCHDOG: enp1s0 (r8169): transmit queue 0 timed out 5340 ms",
        ],
        &["ixgbe 0000:01:00.0 eth0: NIC Link is Up 10 Gbps, Flow Control: RX/TX"],
    ),
    (
        "FrequentConntrackTableFull",
        &["nf_conntrack: nf_conntrack: table full, dropping packet", "nf_conntrack: table full, dropping packet."],
        &[
            "nf_conntrack: default automatic helper assignment has been turned off for security reasons and CT-based firewall rule not found.",
        ],
    ),
    (
        "UnregisterNetDevice",
        &[
            "unregister_netdevice: waiting for eth0 to become free. Usage count = 1",
            "unregister_netdevice: waiting for lo to become free. Usage count = -1",
        ],
        &["IPv6: ADDRCONF(NETDEV_CHANGE): eth0: link becomes ready"],
    ),
];

#[test]
fn every_default_rule_matches_real_lines_and_not_near_misses() {
    let spec = defaults();
    for (name, hits, misses) in CASES {
        for line in *hits {
            let found = one_line(&spec, line);
            assert!(found.iter().any(|f| f == name), "{name}: {line:?} must match, found {found:?}");
        }
        for line in *misses {
            let found = one_line(&spec, line);
            assert!(!found.iter().any(|f| f == name), "{name}: {line:?} must not match, found {found:?}");
        }
    }
    // Every default rule is covered above.
    for rule in &spec.rules {
        let name = rule.condition.as_deref().unwrap_or(&rule.reason);
        assert!(CASES.iter().any(|(n, _, _)| n == &name), "default rule {name} ({}) has no test lines", rule.reason);
    }
}

#[test]
fn default_conditions_carry_their_class() {
    let spec = defaults();
    let found = replay(std::slice::from_ref(&spec), "{3}[Hardware Error]: event severity: fatal", Format::Plain);
    let f = &found[0].finding;
    assert_eq!(
        f.problem,
        Problem::Permanent { condition: "CperHardwareErrorFatal".into(), status: ConditionStatus::True }
    );
    assert_eq!(f.action, nodekeeper_proto::v1::RecommendedAction::HardwareRepair);
    assert_eq!(f.severity, nodekeeper_proto::v1::Severity::Critical);
}

#[test]
fn kmsg_records_are_replayed_with_their_line_numbers() {
    let log = "6,1,100,-;Linux version 6.1.0\n SUBSYSTEM=cpu\n DEVICE=+cpu:0\n3,2,200,-;EXT4-fs (sda1): Remounting filesystem read-only\n3,3,300,-;EXT4-fs (sda1): Remounting filesystem read-only\n";
    let found = replay(&[defaults()], log, Format::Kmsg);
    assert_eq!(found.len(), 1, "a condition is reported when it changes, not again");
    assert_eq!(found[0].line, 4);
    assert_eq!(Format::detect(log), Format::Kmsg);
}

#[test]
fn multi_line_rules_in_the_toml_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.toml");
    std::fs::write(
        &path,
        r#"
source = "trace-monitor"
[log]
kind = "kmsg"
buffer_lines = 3
[[rules]]
type = "temporary"
reason = "WarnTrace"
pattern = 'WARNING: CPU: \d+ PID: \d+ at \S+\n.*Modules linked in: .*'
"#,
    )
    .unwrap();
    let MonitorSpec::Log(spec) = rules::load(&path).unwrap() else { panic!("a log monitor") };
    let log = "WARNING: CPU: 1 PID: 42 at net/core/dev.c:5000\nModules linked in: xfs ext4\nunrelated";
    let found = replay(std::slice::from_ref(&spec), log, Format::Plain);
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].line, found[0].finding.message.as_str()),
        (2, "WARNING: CPU: 1 PID: 42 at net/core/dev.c:5000\nModules linked in: xfs ext4")
    );
    // Rotated out of a buffer of 3 lines: no match.
    let log = "WARNING: CPU: 1 PID: 42 at net/core/dev.c:5000\nx\ny\nModules linked in: xfs ext4";
    assert!(replay(std::slice::from_ref(&spec), log, Format::Plain).is_empty());
}

fn npd(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/npd").join(name)
}

fn npd_log(name: &str) -> LogMonitorSpec {
    match rules::load(&npd(name)).unwrap_or_else(|e| panic!("{name}: {e}")) {
        MonitorSpec::Log(l) => l,
        MonitorSpec::Plugin(_) => panic!("{name} is a log monitor"),
    }
}

#[test]
fn every_npd_file_loads_unmodified() {
    let mut n = 0;
    for entry in std::fs::read_dir(npd("")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            rules::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert_eq!(n, 11);
}

#[test]
fn npd_kernel_monitor_behaves_as_documented() {
    let spec = npd_log("kernel-monitor.json");
    assert_eq!(spec.input, Input::Kmsg { path: "/dev/kmsg".into() });
    assert_eq!((spec.buffer_size, spec.lookback.as_secs(), spec.source.as_str()), (10, 300, "kernel-monitor"));
    let log = "task docker:1234 blocked for more than 120 seconds.\n\
               divide error: 0000 [#1] SMP\n\
               divide error: 0000 [#1] SMP PTI\n\
               XFS (sda1): Corruption detected. Shutting down filesystem\n";
    let found = replay(std::slice::from_ref(&spec), log, Format::Plain);
    let got: Vec<(usize, String, String)> =
        found.iter().map(|r| (r.line, names(std::slice::from_ref(r))[0].clone(), r.finding.reason.clone())).collect();
    assert_eq!(
        got,
        vec![
            (1, "TaskHung".into(), "TaskHung".into()),
            (1, "KernelDeadlock".into(), "DockerHung".into()),
            // node-problem-detector's pattern ends at "SMP": the modern "SMP PTI" line does not
            // match it (the built-in rules handle it).
            (2, "KernelOops".into(), "KernelOops".into()),
            (4, "XfsShutdown".into(), "XfsHasShutdown".into()),
        ]
    );
}

#[test]
fn npd_readonly_docker_and_systemd_monitors() {
    let ro = npd_log("readonly-monitor.json");
    assert_eq!(one_line(&ro, "EXT4-fs (sda1): Remounting filesystem read-only"), vec!["ReadonlyFilesystem"]);
    let docker = npd_log("docker-monitor.json");
    assert_eq!(
        docker.input,
        Input::Journal { path: Some("/var/log/journal".into()), identifiers: vec!["dockerd".into()], units: vec![] }
    );
    let journal = r#"{"__CURSOR":"s=1;i=1","__REALTIME_TIMESTAMP":"1795334364507474","SYSLOG_IDENTIFIER":"dockerd","MESSAGE":"time=\"2026-11-22T08:00:00Z\" level=error msg=\"Handler for POST /containers/abc/start returned error: readlink /var/lib/docker/overlay2/l: invalid argument\""}"#;
    // The pattern must match to the end of the message: the trailing quote is covered by ".*".
    let found = replay(std::slice::from_ref(&docker), journal, Format::JournalJson);
    assert_eq!(names(&found), vec!["CorruptDockerOverlay2"]);
    let systemd = npd_log("systemd-monitor.json");
    assert_eq!(one_line(&systemd, "Started Kubernetes kubelet."), vec!["KubeletStart"]);
    assert_eq!(one_line(&systemd, "Starting containerd container runtime..."), vec!["ContainerdStart"]);
    assert!(one_line(&systemd, "Stopping containerd container runtime...").is_empty());
}

#[test]
fn npd_filelog_translates_lines_before_matching() {
    let spec = npd_log("kernel-monitor-filelog.json");
    let log = "Nov 22 08:00:01 node-1 kernel: [12345.678901] Out of memory: Killed process 4242 (stress) total-vm:8404036kB, anon-rss:7953540kB, file-rss:4kB, shmem-rss:0kB\n\
               Nov 22 08:00:02 node-1 systemd[1]: Started Session 42 of user root.\n\
               garbage without a timestamp: Killed process 1 (x) total-vm:1kB, anon-rss:1kB, file-rss:1kB\n";
    let found = replay(std::slice::from_ref(&spec), log, Format::Plain);
    assert_eq!(names(&found), vec!["OOMKilling"]);
    assert_eq!(found[0].line, 1);
    assert!(
        found[0].finding.message.starts_with("Out of memory: Killed process 4242"),
        "the message group: {}",
        found[0].finding.message
    );
    // disk-log-message-filelog.json also loads; its skip list drops audit lines before matching.
    let disk = npd_log("disk-log-message-filelog.json");
    assert_eq!(disk.skip, vec![" audit:", " audit["]);
}

#[test]
fn npd_custom_plugin_files_load_with_their_settings() {
    let MonitorSpec::Plugin(p) = rules::load(&npd("custom-plugin-monitor.json")).unwrap() else {
        panic!("a plugin monitor")
    };
    assert_eq!((p.interval.as_secs(), p.timeout.as_secs(), p.max_output_length, p.concurrency), (30, 5, 80, 3));
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[0].condition, None);
    assert_eq!(p.rules[1].condition.as_deref(), Some("NTPProblem"));
    assert_eq!(p.rules[1].timeout.as_secs(), 3);
    assert!(
        p.rules[1].path.ends_with("config/plugin/check_ntp.sh"),
        "relative to the rule file: {}",
        p.rules[1].path.display()
    );
    let MonitorSpec::Plugin(s) = rules::load(&npd("systemd-monitor-counter.json")).unwrap() else { panic!() };
    assert_eq!((s.interval.as_secs(), s.rules.len()), (300, 3));
    assert_eq!(s.rules[0].args[4], "--count=5");
}

#[test]
fn malformed_rule_files_name_the_file_the_rule_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let base = std::fs::read_to_string(npd("readonly-monitor.json")).unwrap();
    let bad_regex = write("bad-regex.json", &base.replace("Remounting filesystem read-only", "Remounting (filesystem"));
    let e = rules::load(&bad_regex).unwrap_err().to_string();
    assert!(
        e.contains("bad-regex.json") && e.contains("rule 1 (FilesystemIsReadOnly)") && e.contains("bad pattern"),
        "{e}"
    );
    let bad_type = write("bad-type.json", &base.replace("\"type\": \"permanent\"", "\"type\": \"sometimes\""));
    let e = rules::load(&bad_type).unwrap_err().to_string();
    assert!(e.contains("bad-type.json") && e.contains("rule 1") && e.contains("unknown type \"sometimes\""), "{e}");
    let undeclared =
        write("undeclared.json", &base.replace("\"condition\": \"ReadonlyFilesystem\"", "\"condition\": \"Nope\""));
    let e = rules::load(&undeclared).unwrap_err().to_string();
    assert!(e.contains("condition \"Nope\" is not declared"), "{e}");
    let plugin = write("bad-plugin.json", &base.replace("\"kmsg\"", "\"carrier-pigeon\""));
    assert!(rules::load(&plugin).unwrap_err().to_string().contains("unknown plugin \"carrier-pigeon\""));
    let toml = write(
        "bad.toml",
        "source = \"x\"\n[log]\nkind = \"kmsg\"\n[[rules]]\ntype = \"temporary\"\nreason = \"R\"\npattern = '(unclosed'\n",
    );
    let e = rules::load(&toml).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("rule 1 (R)") && e.contains("bad pattern"), "{e}");
    let unknown_key = write("key.toml", "source = \"x\"\nbogus = 1\n[log]\nkind = \"kmsg\"\n");
    assert!(rules::load(&unknown_key).unwrap_err().to_string().contains("unknown field `bogus`"));
}

#[test]
fn a_clearing_pattern_closes_its_condition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nfs.toml");
    std::fs::write(
        &path,
        r#"
source = "nfs-monitor"
[log]
kind = "kmsg"
[[conditions]]
type = "NFSServerUnreachable"
reason = "NFSServerReachable"
message = "NFS servers answer"
clear = "never"
[[rules]]
type = "permanent"
condition = "NFSServerUnreachable"
reason = "NFSServerNotResponding"
pattern = 'nfs: server \S+ not responding, still trying'
category = "network"
action = "manual"
[[rules]]
type = "permanent"
condition = "NFSServerUnreachable"
reason = "NFSServerOK"
pattern = 'nfs: server \S+ OK'
clears = true
"#,
    )
    .unwrap();
    let MonitorSpec::Log(spec) = rules::load(&path).unwrap() else { panic!("a log monitor") };
    assert_eq!(spec.conditions[0].clear, rules::Clear::Never);
    let log = "nfs: server 10.0.0.5 OK\nnfs: server 10.0.0.5 not responding, still trying\nnfs: server 10.0.0.5 not responding, still trying\nnfs: server 10.0.0.5 OK\n";
    let found = replay(std::slice::from_ref(&spec), log, Format::Plain);
    let got: Vec<(usize, Problem, &str)> =
        found.iter().map(|r| (r.line, r.finding.problem.clone(), r.finding.reason.as_str())).collect();
    let cond = |status| Problem::Permanent { condition: "NFSServerUnreachable".into(), status };
    assert_eq!(
        got,
        vec![
            (2, cond(ConditionStatus::True), "NFSServerNotResponding"),
            (4, cond(ConditionStatus::False), "NFSServerOK")
        ],
        "a clear of a condition that is not open is not reported; an open one is reported once"
    );
    assert_eq!(found[0].finding.action, nodekeeper_proto::v1::RecommendedAction::Manual);
    assert_eq!(found[0].finding.category, nodekeeper_proto::v1::Category::Network);
}
