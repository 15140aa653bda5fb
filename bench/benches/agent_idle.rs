//! The agent at rest with every monitor on at its default interval (the built-in kernel rules on
//! this machine's /dev/kmsg, hardware and resource checks every 60 s, component checks every 30 s),
//! side by side with the node agents operators already run: Debian's prometheus-node-exporter
//! (scraped every 15 s) and collectd (Debian's default plugins, 10 s).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo build --profile node-agent -p nodekeeper-agent
//! cargo bench -p nodekeeper-bench --bench agent_idle [-- --seconds 300]
//! ```
//!
//! CPU is the processes' own user+system time over the window (from /proc/PID/stat), so other
//! load on the machine does not count against them; RSS is sampled every 10 s.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_bench::{Sampler, target_dir};
use nodekeeper_tests::{EventCenter, free_port, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn"))
}

/// Debian's collectd package enables these plugins in its default configuration; rrdtool is
/// replaced by csv (collectd-core ships without librrd's plugin dependencies).
fn collectd_conf(dir: &std::path::Path) -> String {
    let plugins = ["cpu", "df", "disk", "entropy", "interface", "irq", "load", "memory", "processes", "swap", "users"];
    let mut s = format!(
        "Interval 10\nBaseDir \"{0}\"\nPIDFile \"{0}/collectd.pid\"\nPluginDir \"/usr/lib/collectd\"\nTypesDB \"/usr/share/collectd/types.db\"\n",
        dir.display()
    );
    for p in plugins {
        s.push_str(&format!("LoadPlugin {p}\n"));
    }
    s.push_str(&format!("LoadPlugin csv\n<Plugin csv>\n  DataDir \"{}/csv\"\n</Plugin>\n", dir.display()));
    s
}

async fn scrape(port: u16) -> usize {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return 0 };
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.is_err() {
        return 0;
    }
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.map(|_| body.len()).unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut seconds = 300;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--seconds" {
            seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N");
        }
    }
    let agent_bin = target_dir().join("node-agent/nodekeeper-agent");
    assert!(agent_bin.exists(), "build the agent first: cargo build --profile node-agent -p nodekeeper-agent");
    let tmp = tempfile::tempdir().unwrap();
    let center = EventCenter::start("").await;

    let status_port = free_port();
    let agent_conf = tmp.path().join("agent.toml");
    std::fs::write(
        &agent_conf,
        format!(
            "cluster = \"bench\"\nstate_dir = \"{}\"\ncenter = \"{}\"\ninsecure = true\n[status]\nport = {status_port}\nlisten = [\"127.0.0.1\"]\n",
            tmp.path().join("agent").display(),
            center.url()
        ),
    )
    .unwrap();
    let agent = spawn(Command::new(&agent_bin).arg("--config").arg(&agent_conf));

    let exporter_port = free_port();
    let exporter =
        spawn(Command::new("prometheus-node-exporter").arg(format!("--web.listen-address=127.0.0.1:{exporter_port}")));
    let collectd_dir = tmp.path().join("collectd");
    std::fs::create_dir_all(&collectd_dir).unwrap();
    let conf = collectd_dir.join("collectd.conf");
    std::fs::write(&conf, collectd_conf(&collectd_dir)).unwrap();
    let collectd = spawn(Command::new("collectd").arg("-f").arg("-C").arg(&conf));

    wait_for("node exporter", Duration::from_secs(20), || async { (scrape(exporter_port).await > 0).then_some(()) })
        .await;
    let status = format!("http://127.0.0.1:{status_port}");
    wait_for("agent", Duration::from_secs(20), || {
        let s = status.clone();
        async move { nodekeeper_tests::health_ok(&s).await.then_some(()) }
    })
    .await;

    let mut samplers = vec![
        Sampler::new("nodekeeper-agent (all monitors on, default intervals; heartbeat 10 s)", agent.0.id()),
        Sampler::new("prometheus-node-exporter (scraped every 15 s)", exporter.0.id()),
        Sampler::new("collectd (default plugins, 10 s)", collectd.0.id()),
    ];
    eprintln!("warming up 20 s, then measuring {seconds} s");
    tokio::time::sleep(Duration::from_secs(20)).await;
    for s in &mut samplers {
        s.begin();
        s.sample();
    }
    let started = Instant::now();
    let mut sample = tokio::time::interval(Duration::from_secs(10));
    let mut scrape_tick = tokio::time::interval(Duration::from_secs(15));
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::select! {
            _ = sample.tick() => samplers.iter_mut().for_each(Sampler::sample),
            _ = scrape_tick.tick() => { scrape(exporter_port).await; }
        }
    }
    let window = started.elapsed();
    println!("| process | CPU (% of a core) | RSS avg | RSS max |");
    println!("|---|---|---|---|");
    for s in &samplers {
        println!("{}", s.row(window));
    }
    println!("\nwindow {:.0} s", window.as_secs_f64());
}
