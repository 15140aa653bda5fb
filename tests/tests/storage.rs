//! nodekeeper-storage end to end with real parts: a real agent on a test host (its own network
//! namespace), the event center, and real storage targets on the hub's address: tgt (an iSCSI
//! target) reached with libiscsi's `iscsi-inq`, nfs-ganesha (NFSv4) reached with libnfs's
//! `nfs-ls`, both run from the host's namespace. Access follows the node through registration,
//! reinstallation, hand edits on the target and decommissioning; a broken feed is held back by
//! the guard and alerted until a person lets it through.

use std::time::Duration;

use nodekeeper_proto::v1::{
    DecommissionNodeRequest, Event, GetNodeRequest, Inventory, Liveness, NetworkInterface,
    fleet_service_client::FleetServiceClient,
};
use nodekeeper_tests::netns::Net;
use nodekeeper_tests::storage::{Ganesha, Syncer, Tgt};
use nodekeeper_tests::{Agent, AgentConn, AgentSpec, EventCenter, FixtureHost, cli, hello, stored_events, wait_for};
use tonic::transport::Channel;

const CENTER: &str = "[nodes]\ncheck_interval = \"50ms\"\n";
/// Drift is repaired within a pass: one a second here.
const RESYNC: &str = "resync_interval = \"1s\"\n";
const X: &str = "iqn.2026-12.io.example:node-a-first";
const Y: &str = "iqn.2026-12.io.example:node-a-reinstalled";
const INTRUDER: &str = "iqn.2026-12.io.example:intruder";

/// A test host's etc with an initiator name, for the agent's inventory.
fn write_initiator(etc: &std::path::Path, name: &str) {
    std::fs::create_dir_all(etc.join("iscsi")).unwrap();
    std::fs::write(etc.join("iscsi/initiatorname.iscsi"), format!("## set at install\nInitiatorName={name}\n"))
        .unwrap();
}

/// The events of `node` of type `kind`, once there are at least `n` (a change is recorded just
/// after it is made).
async fn storage_events(ch: &Channel, node: &str, kind: &str, n: usize) -> Vec<Event> {
    wait_for(&format!("{n} {kind} events"), Duration::from_secs(10), || async {
        Some(stored_events(ch.clone(), node, kind).await).filter(|e| e.len() >= n)
    })
    .await
}

async fn all_storage_events(ch: &Channel) -> usize {
    use nodekeeper_proto::v1::{EventFilter, ListEventsRequest, event_service_client::EventServiceClient};
    let types = ["StorageAclEntryAdded", "StorageAclEntryRemoved", "StorageAclGuardHeld"];
    EventServiceClient::new(ch.clone())
        .list_events(ListEventsRequest {
            filter: Some(EventFilter { types: types.map(str::to_owned).to_vec(), ..Default::default() }),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .len()
}

/// Waits until the syncer has made `n` more passes over `target`.
async fn passes(syncer: &Syncer, target: &str, n: u32) {
    let count = || async {
        let text = nodekeeper_tests::try_http_get(&syncer.metrics).await.ok()?;
        nodekeeper_tests::metric_where(&text, "nodekeeper_storage_passes_total", &format!("target=\"{target}\""))
    };
    let start = count().await.unwrap_or(0.0);
    wait_for("the syncer's passes", Duration::from_secs(15), || async {
        count().await.filter(|c| *c >= start + f64::from(n)).map(drop)
    })
    .await;
}

/// Waits for `cond` (checked every 100 ms) within `secs`.
async fn until(what: &str, secs: u64, cond: impl Fn() -> bool) {
    wait_for(what, Duration::from_secs(secs), || std::future::ready(cond().then_some(()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_access_follows_a_node_through_registration_reinstall_hand_edits_and_decommission() {
    let net = Net::new(1);
    let mut center = EventCenter::new(CENTER);
    center.listen_everywhere();
    center.spawn().await;
    let from_host = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let ch = center.channel().await;
    let tgt = Tgt::start(net.hub_ip()).await;
    let (ns, ip) = (net.host_ns(0), net.host_ip(0));

    // Nobody is allowed before the syncer knows a node.
    // Not about the guard (the NFS test is): every removal allowed.
    let target = format!(
        "[[target]]\nname = \"vol1\"\nclients = \"initiators\"\ngrace = \"4s\"\nmax_remove_share = 1.0\n{}",
        tgt.backend_toml()
    );
    let mut syncer = Syncer::start(&center.url(), RESYNC, &target);
    assert!(!tgt.inquiry_succeeds(&ns, X), "an initiator of no node got in");

    // The node registers with initiator name X: X gets in.
    let host = FixtureHost::new();
    let etc = tempfile::tempdir().unwrap();
    write_initiator(etc.path(), X);
    let extra = format!("inventory_interval = \"200ms\"\n{}etc = \"{}\"\n", host.paths(), etc.path().display());
    let spec = AgentSpec { extra: &extra, netns: Some((&ns, ip)), ..AgentSpec::new("node-a", &from_host) };
    let mut agent = Agent::start(spec).await;
    until("X let in after the node registered", 15, || tgt.inquiry_succeeds(&ns, X)).await;
    let added = storage_events(&ch, "node-a", "StorageAclEntryAdded", 1).await;
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0].attributes["entry"], X);
    assert_eq!(added[0].attributes["target"], "vol1");
    assert!(added[0].attributes["why"].contains("node node-a registered"), "{:?}", added[0].attributes);
    assert_eq!(added[0].origin.as_ref().unwrap().producer, "storage-c1");

    // Reinstalled: a new boot and a new initiator name. Y gets in at once; X keeps access for its
    // grace (pods may still be leaving the old installation), then loses it.
    agent.kill9();
    write_initiator(etc.path(), Y);
    host.boot("0f2b6a3c-1d4e-4f50-8a9b-00000000000b");
    agent.spawn().await;
    until("Y let in after the reinstall", 15, || tgt.inquiry_succeeds(&ns, Y)).await;
    assert!(tgt.inquiry_succeeds(&ns, X), "X lost its access before its grace ended");
    assert_eq!(tgt.acl(), [X, Y]);
    until("X removed after its grace", 20, || !tgt.inquiry_succeeds(&ns, X)).await;
    let removed = storage_events(&ch, "node-a", "StorageAclEntryRemoved", 1).await;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].attributes["entry"], X);
    assert!(removed[0].attributes["why"].contains("has not had it for 4s"), "{:?}", removed[0].attributes);

    // Hand edits on the target are repaired within a pass (resync every second).
    tgt.edit("unbind", Y);
    tgt.edit("bind", INTRUDER);
    until("the target's ACL repaired", 10, || tgt.acl() == [Y]).await;
    assert!(!tgt.inquiry_succeeds(&ns, INTRUDER));
    let intruder_removed = storage_events(&ch, "", "StorageAclEntryRemoved", 1).await;
    assert!(
        intruder_removed.iter().any(|e| e.attributes["entry"] == INTRUDER
            && e.attributes["why"].contains("no node of the cluster has it")),
        "{intruder_removed:?}"
    );

    // A restart changes nothing that is right, and resumes its durable consumer.
    let before = all_storage_events(&ch).await;
    assert!(syncer.stop().success());
    syncer.spawn();
    let metrics = syncer.metrics.clone();
    wait_for("the restarted syncer's first pass", Duration::from_secs(15), || {
        let m = metrics.clone();
        async move {
            let text = nodekeeper_tests::try_http_get(&m).await.ok()?;
            (nodekeeper_tests::metric_where(&text, "nodekeeper_storage_entries", "target=\"vol1\"")? == 1.0)
                .then_some(())
        }
    })
    .await;
    assert_eq!(all_storage_events(&ch).await, before, "a restart changed what was right");
    assert_eq!(tgt.acl(), [Y]);
    let (code, out, _) = cli(&center.url(), &["consumers", "list", "-o", "json"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("storage-c1"), "{out}");

    // A node whose heartbeat is lost keeps its access; a decommissioned one loses it after the
    // grace.
    agent.kill9();
    wait_for("node-a lost", Duration::from_secs(15), || {
        let ch = ch.clone();
        async move {
            let n = FleetServiceClient::new(ch)
                .get_node(GetNodeRequest { cluster: "c1".into(), node: "node-a".into() })
                .await
                .ok()?
                .into_inner();
            (n.liveness() == Liveness::Lost).then_some(())
        }
    })
    .await;
    passes(&syncer, "vol1", 2).await;
    assert_eq!(tgt.acl(), [Y], "a lost node lost its access");
    let url = center.url();
    wait_for("node-a decommissioned", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let (code, _, _) =
                cli(&url, &["nodes", "delete", "--cluster", "c1", "--node", "node-a", "--reason", "RMA 4711"]).await;
            (code == 0).then_some(())
        }
    })
    .await;
    assert!(tgt.inquiry_succeeds(&ns, Y), "Y lost its access before its grace ended");
    until("Y removed after the node was decommissioned", 20, || tgt.acl().is_empty()).await;
    assert!(!tgt.inquiry_succeeds(&ns, Y));
    let removed = storage_events(&ch, "node-a", "StorageAclEntryRemoved", 2).await;
    assert!(removed.iter().any(|e| e.attributes["entry"] == Y), "{removed:?}");
}

/// Simulated node `sim-<i>` of cluster c1 with one address: registered, then its stream closed.
async fn register(url: &str, i: u32, addr: &str) {
    let node = &format!("sim-{i}");
    let mut h = hello("c1", node, &format!("00000000-0000-4000-8000-{i:012x}"));
    h.inventory = Some(Inventory {
        hostname: node.into(),
        iscsi_initiator_name: format!("iqn.2026-12.io.example:sim-{i}"),
        interfaces: vec![NetworkInterface {
            name: "eth0".into(),
            addresses: vec![format!("{addr}/24")],
            ..Default::default()
        }],
        ..Default::default()
    });
    drop(AgentConn::connect(url, h).await.expect("register"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_clients_follow_the_fleet_and_a_feed_that_would_remove_most_is_held_until_forced() {
    let net = Net::new(1);
    let mut center = EventCenter::new(CENTER);
    center.listen_everywhere();
    center.spawn().await;
    let from_host = format!("http://{}:{}", net.hub_ip(), center.addr.port());
    let ch = center.channel().await;
    let ganesha = Ganesha::start(net.hub_ip()).await;
    let am = nodekeeper_tests::alertmanager::Alertmanager::start().await;
    let (ns, ip) = (net.host_ns(0), net.host_ip(0));
    assert!(!ganesha.listing_succeeds(&ns), "the export is open before any node registered");

    let subnet = ip.to_string().rsplit_once('.').unwrap().0.to_owned();
    let target = format!(
        "[[target]]\nname = \"vol\"\nclients = \"addresses\"\nnetworks = [\"{subnet}.0/24\"]\ngrace = \"2s\"\n{}",
        ganesha.backend_toml()
    );
    let syncer = Syncer::start(&center.url(), &format!("{RESYNC}alertmanager = \"{}\"\n", am.url), &target);
    // The real node (its address is the namespace's) and four simulated ones.
    let host = FixtureHost::new();
    let extra = host.paths();
    let spec = AgentSpec { netns: Some((&ns, ip)), extra: &extra, ..AgentSpec::new("node-a", &from_host) };
    let agent = Agent::start(spec).await;
    for i in 1..=4 {
        register(&center.url(), i, &format!("{subnet}.{}", 100 + i)).await;
    }
    until("the host lists the export after its node registered", 20, || ganesha.listing_succeeds(&ns)).await;
    let clients = || nodekeeper_storage_list(&ganesha);
    until("every node a client", 10, || clients().len() == 5).await;
    assert!(clients().contains(&ip.to_string()));

    // A hand edit between the markers is undone.
    let text = std::fs::read_to_string(&ganesha.config).unwrap();
    std::fs::write(&ganesha.config, text.replace(&format!("{ip}, "), "10.99.0.1, ")).unwrap();
    until("the export's clients repaired", 10, || clients().contains(&ip.to_string()) && clients().len() == 5).await;

    // A broken feed: four of five nodes gone at once. The guard holds, alerts, waits.
    for i in 1..=4 {
        FleetServiceClient::new(ch.clone())
            .decommission_node(DecommissionNodeRequest {
                cluster: "c1".into(),
                node: format!("sim-{i}"),
                reason: "a broken feed".into(),
            })
            .await
            .unwrap();
    }
    let held = storage_events(&ch, "", "StorageAclGuardHeld", 1).await.remove(0);
    // Four of the five nodes (and the hand-edited entry removed before, within the window): more
    // than half. Decommissions seen a pass apart may let up to the share go first.
    assert!(held.message.contains("would remove") && held.message.contains("more than the"), "{}", held.message);
    wait_for("the guard's alert firing", Duration::from_secs(10), || async {
        let a = am.active(&["alertname=\"NodekeeperStorageAclGuard\"", "storage_target=\"vol\""]).await;
        (!a.is_empty()).then_some(())
    })
    .await;
    passes(&syncer, "vol", 2).await;
    assert!(
        clients().len() >= 3 && clients().contains(&ip.to_string()),
        "the guard let removals through: {:?}",
        clients()
    );
    assert!(ganesha.listing_succeeds(&ns));

    // A person lets it through once.
    let (code, out, err) =
        cli(&center.url(), &["storage", "force", "--cluster", "c1", "--target", "vol", "--reason", "sims retired"])
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("let through once"), "{out}");
    until("the four removed", 15, || clients() == [ip.to_string()]).await;
    assert!(ganesha.listing_succeeds(&ns), "the live node lost access: {}", ganesha.log());
    let forced = storage_events(&ch, "", "StorageAclForced", 1).await;
    assert_eq!(forced.len(), 1);
    wait_for("the guard's alert resolved", Duration::from_secs(10), || async {
        let a = am.active(&["alertname=\"NodekeeperStorageAclGuard\""]).await;
        a.is_empty().then_some(())
    })
    .await;

    // The host is reinstalled and comes back with a new address (and a new boot, and an agent
    // with no state): the new address is let in, the old one removed after its grace.
    drop(agent);
    let new_ip = format!("{subnet}.60");
    let ip_cmd = |args: &[&str]| {
        let mut c = std::process::Command::new("ip");
        c.args(["-n", &ns]).args(args);
        assert!(nodekeeper_tests::storage::succeeds(c), "ip {args:?}");
    };
    ip_cmd(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
    ip_cmd(&["addr", "add", &format!("{new_ip}/24"), "dev", "eth0"]);
    host.boot("0f2b6a3c-1d4e-4f50-8a9b-00000000000c");
    let spec = AgentSpec {
        netns: Some((&ns, new_ip.parse().unwrap())),
        extra: &extra,
        ..AgentSpec::new("node-a", &from_host)
    };
    let _agent = Agent::start(spec).await;
    until("the new address a client", 30, || clients().contains(&new_ip)).await;
    until("the old address removed after its grace", 15, || clients() == [new_ip.clone()]).await;
    until("the host lists the export from its new address", 10, || ganesha.listing_succeeds(&ns)).await;
    let removed = storage_events(&ch, "node-a", "StorageAclEntryRemoved", 1).await;
    assert_eq!(removed[0].attributes["entry"], ip.to_string());
}

fn nodekeeper_storage_list(g: &Ganesha) -> Vec<String> {
    let text = std::fs::read_to_string(&g.config).unwrap();
    let block = text.split("# BEGIN nodekeeper-storage vol").nth(1).unwrap().split("# END").next().unwrap();
    let mut out: Vec<String> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Clients = "))
        .flat_map(|v| v.trim_end_matches(';').split(", ").map(str::to_owned).collect::<Vec<_>>())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_actions_are_validated_all_or_none_and_idempotent() {
    use nodekeeper_proto::v1::{
        Observation, RecordActionsRequest, RecordedAction, report_service_client::ReportServiceClient,
    };
    let center = EventCenter::start(CENTER).await;
    let ch = center.channel().await;
    let mut client = ReportServiceClient::new(ch.clone());
    let action = |id: &str, t: &str| RecordedAction {
        action_id: id.into(),
        cluster: "c1".into(),
        node: String::new(),
        action: Some(Observation { r#type: t.into(), message: "m".into(), ..Default::default() }),
    };
    let req = |actions: Vec<RecordedAction>| RecordActionsRequest { producer: "storage-c1".into(), actions };
    let first = client.record_actions(req(vec![action("a-1", "StorageAclEntryAdded")])).await.unwrap().into_inner();
    let again = client
        .record_actions(req(vec![action("a-1", "StorageAclEntryAdded"), action("a-2", "StorageAclEntryAdded")]))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.results[0].duplicate && again.results[0].duplicate && !again.results[1].duplicate);
    assert_eq!(first.results[0].cursor, again.results[0].cursor);
    let bad = |f: fn(&mut RecordedAction)| {
        let mut a = action("x", "StorageAclEntryAdded");
        f(&mut a);
        // A good action before the bad one: neither is stored.
        req(vec![action("good", "StorageAclEntryAdded"), a])
    };
    for (r, needle) in [
        (bad(|a| a.action_id = "has space".into()), "action 1: invalid report id"),
        (bad(|a| a.cluster = "C_1".into()), "action 1: invalid cluster"),
        (bad(|a| a.node = "-bad".into()), "action 1: invalid node"),
        (bad(|a| a.action = None), "action 1 is empty"),
        (bad(|a| a.action.as_mut().unwrap().r#type = "not a type".into()), "action 1"),
        (bad(|a| a.action.as_mut().unwrap().condition = Some(Default::default())), "sets a condition"),
    ] {
        let s = client.record_actions(r).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(needle), "{needle}: {}", s.message());
    }
    let stored = stored_events(ch, "", "StorageAclEntryAdded").await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.iter().all(|e| e.origin.as_ref().unwrap().report_id != "good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ontap_igroup_and_export_rule_follow_the_fleet_through_its_rest_api() {
    use nodekeeper_tests::ontap::{self, Ontap};
    let center = EventCenter::start(CENTER).await;
    let ch = center.channel().await;
    let stale = "iqn.2026-12.io.example:retired-long-ago";
    let fake = Ontap::start("k8s-c1", &[stale], "k8s-c1-nfs").await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("ontap.password");
    std::fs::write(&password, format!("{}\n", ontap::PASSWORD)).unwrap();
    let common = format!(
        "url = \"{}\", svm = \"{}\", username = \"{}\", password_file = \"{}\"",
        fake.url,
        ontap::SVM,
        ontap::USER,
        password.display()
    );
    let targets = format!(
        "[[target]]\nname = \"igroup\"\nclients = \"initiators\"\ngrace = \"1s\"\nmax_remove_share = 1.0\n\
         backend = {{ kind = \"ontap\", igroup = \"k8s-c1\", {common} }}\n\
         [[target]]\nname = \"exports\"\nclients = \"addresses\"\ngrace = \"1s\"\nmax_remove_share = 1.0\n\
         backend = {{ kind = \"ontap\", export_policy = \"k8s-c1-nfs\", {common} }}\n"
    );
    let syncer = Syncer::start(&center.url(), RESYNC, &targets);
    // Seven nodes: more than two pages of the fake's records.
    for i in 1..=7 {
        register(&center.url(), i, &format!("10.1.0.{i}")).await;
    }
    let iqns =
        |r: std::ops::RangeInclusive<u32>| r.map(|i| format!("iqn.2026-12.io.example:sim-{i}")).collect::<Vec<_>>();
    let addrs = |r: std::ops::RangeInclusive<u32>| {
        let mut v: Vec<String> = r.map(|i| format!("10.1.0.{i}")).collect();
        v.sort();
        v
    };
    until("the igroup holds the fleet's initiators", 15, || fake.initiators("k8s-c1") == iqns(1..=7)).await;
    until("the export rule holds the fleet's addresses", 15, || fake.clients("k8s-c1-nfs") == addrs(1..=7)).await;
    let removed = storage_events(&ch, "", "StorageAclEntryRemoved", 1).await;
    assert_eq!(removed[0].attributes["entry"], stale);

    // Decommissioned: out of both after the grace.
    FleetServiceClient::new(ch.clone())
        .decommission_node(DecommissionNodeRequest { cluster: "c1".into(), node: "sim-7".into(), reason: "t".into() })
        .await
        .unwrap();
    until("sim-7 out of the igroup", 15, || fake.initiators("k8s-c1") == iqns(1..=6)).await;
    until("sim-7 out of the export rule", 15, || fake.clients("k8s-c1-nfs") == addrs(1..=6)).await;

    // A wrong password: passes fail (counted, logged), nothing changes; the right one again: on.
    std::fs::write(&password, "wrong\n").unwrap();
    let errors = || async {
        let text = nodekeeper_tests::try_http_get(&syncer.metrics).await.ok()?;
        nodekeeper_tests::metric_where(&text, "nodekeeper_storage_errors_total", "target=\"igroup\"")
    };
    wait_for("a failed pass counted", Duration::from_secs(10), || async { errors().await.filter(|e| *e >= 1.0) }).await;
    fake.state.lock().unwrap().igroups.get_mut("k8s-c1").unwrap().1.retain(|i| !i.ends_with("sim-1"));
    let failed = errors().await.unwrap();
    wait_for("another failed pass", Duration::from_secs(10), || async { errors().await.filter(|e| *e > failed) }).await;
    assert!(!fake.initiators("k8s-c1").contains(&iqns(1..=1)[0]));
    std::fs::write(&password, ontap::PASSWORD).unwrap();
    until("the hand edit repaired", 15, || fake.initiators("k8s-c1") == iqns(1..=6)).await;
    assert!(fake.state.lock().unwrap().requests.iter().any(|r| r.contains("/rules/1/clients")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_records_its_plan_once_and_changes_nothing_then_a_command_backend_applies_it() {
    let center = EventCenter::start(CENTER).await;
    let ch = center.channel().await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("clients");
    std::fs::write(&list, "10.2.0.99\n").unwrap();
    let l = list.display().to_string();
    // The operator's own scripts (shell ones here): the entry arrives as one argument, $0.
    let target = format!(
        "[[target]]\nname = \"filer\"\nclients = \"addresses\"\nmax_remove_share = 1.0\n\
         backend = {{ kind = \"command\", list = [\"cat\", \"{l}\"], \
         add = [\"sh\", \"-c\", \"printf '%s\\\\n' \\\"$0\\\" >> {l}\", \"{{entry}}\"], \
         remove = [\"sh\", \"-c\", \"grep -vx \\\"$0\\\" {l} > {l}.new; mv {l}.new {l}\", \"{{entry}}\"] }}\n"
    );
    for i in 1..=3 {
        register(&center.url(), i, &format!("10.1.0.{i}")).await;
    }
    let dry = Syncer::start(&center.url(), &format!("{RESYNC}dry_run = true\n"), &target);
    let all = |ch: Channel| async move {
        let mut v = Vec::new();
        for kind in ["StorageAclEntryAdded", "StorageAclEntryRemoved"] {
            for node in ["", "sim-1", "sim-2", "sim-3"] {
                v.extend(stored_events(ch.clone(), node, kind).await);
            }
        }
        v
    };
    let c = ch.clone();
    let planned = wait_for("the dry run's plan recorded", Duration::from_secs(10), || {
        let c = c.clone();
        async move { Some(all(c).await).filter(|v| v.len() == 4) }
    })
    .await;
    assert!(planned.iter().all(|e| e.attributes["dry_run"] == "true"), "{planned:?}");
    passes(&dry, "filer", 3).await;
    assert_eq!(all(ch.clone()).await.len(), 4, "a repeated plan was recorded again");
    assert_eq!(std::fs::read_to_string(&list).unwrap(), "10.2.0.99\n", "a dry run changed the list");
    drop(dry);

    let _real = Syncer::start(&center.url(), RESYNC, &target);
    let sorted = || {
        let mut v: Vec<String> = std::fs::read_to_string(&list).unwrap().lines().map(str::to_owned).collect();
        v.sort();
        v
    };
    until("the list applied by the commands", 10, || sorted() == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]).await;
}
