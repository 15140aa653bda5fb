//! Rule matching throughput with the default kernel rules over a realistic kernel log mix, side by
//! side with node-problem-detector's way of matching (every rule's regex, anchored at the end, run
//! over the last `bufferSize` lines joined by "\n", as its log buffer does), implemented here with
//! the same regex engine so that only the method differs.
//!
//! ```text
//! cargo bench -p nodekeeper-bench --bench rules [-- --lines 2000000]
//! ```
//!
//! Single-threaded: the figures are lines per second on one core.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use nodekeeper_agent::monitor::logs::{Format, RuleEngine, replay};
use nodekeeper_agent::monitor::matcher::compile;
use nodekeeper_agent::monitor::rules::default_kernel_monitor;

/// What a busy Kubernetes node's kernel log looks like: mostly container networking and audit
/// noise, with a problem now and then (about 1 line in 50).
const NOISE: &[&str] = &[
    "IPv6: ADDRCONF(NETDEV_CHANGE): vethc1f2a3b4: link becomes ready",
    "cni0: port 3(vethc1f2a3b4) entered blocking state",
    "cni0: port 3(vethc1f2a3b4) entered forwarding state",
    "device vethc1f2a3b4 entered promiscuous mode",
    "eth0: renamed from tmp8d6e2",
    "audit: type=1400 audit(1732262400.123:4242): apparmor=\"DENIED\" operation=\"open\" profile=\"cri-containerd.apparmor.d\" name=\"/proc/sys/kernel/hostname\" pid=31337 comm=\"java\" requested_mask=\"r\" denied_mask=\"r\" fsuid=1000 ouid=0",
    "overlayfs: upperdir is in-use as upperdir/workdir of another mount, accessing files from both mounts will result in undefined behavior.",
    "kauditd_printk_skb: 12 callbacks suppressed",
    "TCP: request_sock_TCP: Possible SYN flooding on port 10250. Sending cookies.  Check SNMP counters.",
    "EXT4-fs (sdb1): mounted filesystem with ordered data mode. Opts: (null). Quota mode: none.",
    "xfs filesystem being remounted at /var/lib/kubelet/pods/1c2d/volumes supports timestamps until 2038 (0x7fffffff)",
    "nfs: server 10.0.0.5 OK",
    "IPVS: rr: TCP 10.96.0.1:443 - no destination available",
    "cgroup: fork rejected by pids controller in /kubepods/burstable/pod1c2d",
];
const PROBLEMS: &[&str] = &[
    "Out of memory: Killed process 4242 (java) total-vm:8404036kB, anon-rss:7953540kB, file-rss:4kB, shmem-rss:0kB, UID:1000 pgtables:15640kB oom_score_adj:999",
    "INFO: task kworker/u16:2:12345 blocked for more than 122 seconds.",
    "nf_conntrack: nf_conntrack: table full, dropping packet",
    "EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0 page:0x8b2a22 offset:0x0 grain:32 syndrome:0x0 - area:DRAM err_code:0001:0091 socket:0 ha:0 channel_mask:2 rank:1)",
];

fn mix(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 50 == 49 { PROBLEMS[(i / 50) % PROBLEMS.len()] } else { NOISE[(i * 7 + i / 13) % NOISE.len()] }
                .to_owned()
        })
        .collect()
}

/// node-problem-detector's method: every rule on the joined buffer.
fn npd_method(patterns: &[regex::bytes::Regex], buffer_size: usize, lines: &[String]) -> usize {
    let mut buffer: std::collections::VecDeque<&str> = Default::default();
    let mut found = 0;
    for l in lines {
        if buffer.len() == buffer_size {
            buffer.pop_front();
        }
        buffer.push_back(l);
        let joined = buffer.iter().copied().collect::<Vec<_>>().join("\n");
        for re in patterns {
            if re.is_match(joined.as_bytes()) {
                found += 1;
            }
        }
    }
    found
}

fn main() {
    let mut n = 1_000_000;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--lines" {
            n = it.next().and_then(|v| v.parse().ok()).expect("--lines N");
        }
    }
    let spec = default_kernel_monitor(Path::new("/dev/kmsg"));
    let lines = mix(n);
    let kmsg: String = lines.iter().enumerate().map(|(i, l)| format!("6,{i},{},-;{l}\n", i * 1000)).collect();

    println!("{n} lines, {} default rules, 1 line in 50 a problem; one core", spec.rules.len());
    println!("| method | lines/s | findings |");
    println!("|---|---|---|");
    // Ours: matching only.
    let mut engine = RuleEngine::new(spec.clone());
    let mut out = Vec::new();
    let t = Instant::now();
    let mut findings = 0;
    for l in &lines {
        engine.feed(l, None, &mut out);
        findings += out.len();
        out.clear();
    }
    let ours = n as f64 / t.elapsed().as_secs_f64();
    println!("| nodekeeper: default rules (one RegexSet on the newest line) | {ours:.0} | {findings} |");
    // Ours: parsing /dev/kmsg records too, and condition bookkeeping.
    let t = Instant::now();
    let replayed = black_box(replay(std::slice::from_ref(&spec), &kmsg, Format::Kmsg)).len();
    println!(
        "| nodekeeper: kmsg records parsed and matched (`rules test` path) | {:.0} | {replayed} |",
        n as f64 / t.elapsed().as_secs_f64()
    );
    // node-problem-detector's method, same rules, same regex engine.
    let patterns: Vec<regex::bytes::Regex> =
        spec.rules.iter().map(|r| compile(&format!("(?:{})\\z", r.pattern)).unwrap()).collect();
    let sample = &lines[..(n / 10).max(1)];
    let t = Instant::now();
    let npd = npd_method(&patterns, spec.buffer_size, sample);
    println!(
        "| node-problem-detector's method (each rule on the joined 10-line buffer), {} lines | {:.0} | {npd} |",
        sample.len(),
        sample.len() as f64 / t.elapsed().as_secs_f64()
    );
    assert!(ours >= 500_000.0, "below the 500,000 lines/s target: {ours:.0}");
}
