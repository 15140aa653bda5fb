//! The dashboard's overview of a 10,000-node cluster in a real browser (headless chromium through
//! chromedriver): content visible after navigation (first contentful paint) and the bytes
//! transferred, over 5 navigations; then 20 open overview pages following a stream of 1,000
//! events/s (app.js's requests: `/live` and a refetch of the main part once a second), and the
//! center's CPU for it. Side by side in the same run: the center with the same
//! stream and no page open, and with 20 plain subscribers (`nodekeeper events watch`) instead.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench dashboard      # NODEKEEPER_BENCH_NODES=1000 for a quick run
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_bench::proc_usage;
use nodekeeper_proto::v1::{Report, ReportRequest, report_service_client::ReportServiceClient};
use nodekeeper_tests::browser::Browser;
use nodekeeper_tests::simnode::Sim;
use nodekeeper_tests::{EventCenter, KillOnDrop, bin, condition_report, free_port, hello, observation, wait_for};

fn nodes() -> usize {
    std::env::var("NODEKEEPER_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}
const TABS: usize = 20;
const RATE: u64 = 1_000;
const WINDOW: Duration = Duration::from_secs(20);

fn cpu(pid: u32) -> f64 {
    proc_usage(pid).map(|u| u.cpu.as_secs_f64()).unwrap_or(0.0)
}

/// Reports `RATE` temporary observations a second (batches of 100) until `until`.
async fn stream(url: String, until: Instant) {
    let mut client = ReportServiceClient::connect(url).await.expect("connect");
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        let reports = (0..RATE / 10)
            .map(|i| {
                seq += 1;
                Report {
                    report_id: format!("r{seq}"),
                    cluster: "c1".into(),
                    node: format!("n{:05}", i),
                    observation: Some(observation(seq)),
                }
            })
            .collect();
        client.report(ReportRequest { producer: "bench".into(), reports }).await.expect("report");
    }
}

/// One open overview page as app.js keeps it: `/live` followed, the main part fetched again at
/// most once a second while events arrive.
async fn open_page(http: reqwest::Client, url: String, stop: tokio_util::sync::CancellationToken) {
    let Ok(mut live) = http.get(format!("{url}live?all=1")).send().await else { return };
    let mut last = Instant::now();
    let mut pending = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            chunk = live.chunk() => match chunk {
                Ok(Some(_)) => pending = true,
                _ => return,
            },
            _ = tokio::time::sleep(Duration::from_millis(100)), if pending => {}
        }
        if pending && last.elapsed() >= Duration::from_secs(1) {
            pending = false;
            last = Instant::now();
            if let Ok(r) = http.get(format!("{url}?fragment=1")).header("accept-encoding", "gzip").send().await {
                let _ = r.bytes().await;
            }
        }
    }
}

/// The center's CPU (cores) while the stream runs for `WINDOW`.
async fn measure(center: &EventCenter) -> f64 {
    let pid = center.pid().expect("the center runs");
    let from = (Instant::now(), cpu(pid));
    stream(center.url(), Instant::now() + WINDOW).await;
    (cpu(pid) - from.1) / from.0.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let n = nodes();
    let center = EventCenter::start("").await;
    let sim = Sim::new(center.url(), Duration::from_secs(10));
    for i in 0..n {
        tokio::spawn(sim.clone().run(hello("c1", &format!("n{i:05}"), "b1")));
    }
    wait_for("every node connected", Duration::from_secs(300), || async {
        (sim.connected.load(std::sync::atomic::Ordering::Relaxed) >= n).then_some(())
    })
    .await;
    // Some colour on the map: 100 nodes with an open fault.
    let reports = (0..100)
        .map(|i| {
            let node = format!("n{:05}", i * (n / 100));
            condition_report(&format!("f{i}"), "c1", &node, "KernelDeadlock", true, Default::default())
        })
        .collect();
    ReportServiceClient::connect(center.url())
        .await
        .unwrap()
        .report(ReportRequest { producer: "bench".into(), reports })
        .await
        .unwrap();

    let port = free_port();
    let dash = KillOnDrop(
        Command::new(bin("nodekeeper"))
            .args(["--server", &center.url(), "dashboard", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("nodekeeper dashboard"),
    );
    let url = format!("http://127.0.0.1:{port}/");
    wait_for("the dashboard", Duration::from_secs(20), || async {
        nodekeeper_tests::try_http_get(&format!("{url}assets/app.css")).await.ok().map(drop)
    })
    .await;

    // Navigation: first contentful paint and bytes transferred (document and assets).
    let b = Browser::start().await;
    let mut paints = Vec::new();
    let mut bytes = 0.0;
    let mut raw = 0.0;
    for _ in 0..5 {
        b.client.goto("about:blank").await.unwrap();
        let t0 = Instant::now();
        b.client.goto(&url).await.unwrap();
        let loaded = t0.elapsed();
        let m = b
            .client
            .execute(
                "const n = performance.getEntriesByType('navigation')[0];\
                 const p = performance.getEntriesByName('first-contentful-paint')[0];\
                 const r = performance.getEntriesByType('resource');\
                 return [p ? p.startTime : -1, n.transferSize + r.reduce((s, x) => s + x.transferSize, 0), n.decodedBodySize];",
                vec![],
            )
            .await
            .unwrap();
        paints.push((m[0].as_f64().unwrap_or(-1.0), loaded));
        bytes = m[1].as_f64().unwrap_or(0.0);
        raw = m[2].as_f64().unwrap_or(0.0);
    }
    let cells = b.client.execute("return document.querySelectorAll('.map a').length", vec![]).await.unwrap();

    // The center under the stream: no page open, 20 overview pages, 20 plain subscribers.
    b.close().await;
    println!();

    // The center under the stream: no page open, 20 open pages, 20 plain subscribers. The open
    // pages are what app.js does, at the HTTP level (twenty chromium tabs of a 10,000-node page
    // re-rendering every second do not fit this 2-core machine beside the center): each follows
    // /live and fetches the page's main part once a second while events arrive.
    let idle = measure(&center).await;
    let stop = tokio_util::sync::CancellationToken::new();
    nodekeeper_common::tls::install_default_provider();
    let http = reqwest::Client::new();
    for _ in 0..TABS {
        tokio::spawn(open_page(http.clone(), url.clone(), stop.clone()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pages = measure(&center).await;
    stop.cancel();
    drop(dash);
    let watchers: Vec<KillOnDrop> = (0..TABS)
        .map(|_| {
            KillOnDrop(
                Command::new(bin("nodekeeper"))
                    .args(["--server", &center.url(), "events", "watch", "-o", "json"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let watched = measure(&center).await;
    drop(watchers);

    println!();
    println!("dashboard overview, {n} nodes (cells on the page: {cells})");
    for (i, (fcp, loaded)) in paints.iter().enumerate() {
        println!(
            "  navigation {}: first contentful paint {fcp:.0} ms, loaded {:.0} ms",
            i + 1,
            loaded.as_secs_f64() * 1000.0
        );
    }
    println!("  transferred {:.0} KB (the document {:.0} KB before compression)", bytes / 1024.0, raw / 1024.0);
    println!("  center CPU with {RATE} events/s for {}s:", WINDOW.as_secs());
    println!("    no page open: {idle:.3} cores");
    println!(
        "    {TABS} overview pages open (one dashboard, app.js's requests): {pages:.3} cores (+{:.3})",
        pages - idle
    );
    println!("    {TABS} `nodekeeper events watch` instead: {watched:.3} cores (+{:.3})", watched - idle);
}
