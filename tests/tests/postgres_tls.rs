//! Replicas reach PostgreSQL over TLS: a real PostgreSQL 15 that refuses connections without it,
//! its certificate made with `nodekeeper certs`; a center process that stores and reads back through
//! it; the server's certificate and host name verified; a client certificate for a server that
//! authenticates by certificate; misplaced TLS settings rejected with the file and the key.

use std::time::Duration;

use nodekeeper_eventcenter::store::postgres::{PgOptions, PgStore, PgTls};
use nodekeeper_proto::v1::{EventFilter, ReportRequest, report_service_client::ReportServiceClient};
use nodekeeper_tests::pki::certs;
use nodekeeper_tests::postgres::Postgres;
use nodekeeper_tests::{EventCenter, bin, condition_report, events_where};

/// A CA, the database server's certificate (for 127.0.0.1 only) and a client certificate whose
/// common name is a database role.
async fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["init"]).await;
    certs(d, &["issue", "--kind", "server", "--name", "postgres", "--san", "127.0.0.1"]).await;
    certs(d, &["issue", "--kind", "admin", "--name", "replica-by-cert"]).await;
    dir
}

/// SCRAM passwords for `nodekeeper`, certificates for `replica-by-cert`, over TLS only.
async fn database(pki: &std::path::Path) -> Postgres {
    let hba = "hostssl all nodekeeper 127.0.0.1/32 scram-sha-256\nhostssl all replica-by-cert 127.0.0.1/32 cert";
    let pg =
        Postgres::start_tls(&pki.join("postgres.pem"), &pki.join("postgres-key.pem"), &pki.join("ca.pem"), hba).await;
    pg.sql("CREATE ROLE nodekeeper LOGIN PASSWORD 'correct horse'; CREATE ROLE \"replica-by-cert\" LOGIN").await;
    // CREATE DATABASE runs outside a transaction: one each.
    pg.sql("CREATE DATABASE nodekeeper OWNER nodekeeper").await;
    pg.sql("CREATE DATABASE bycert OWNER \"replica-by-cert\"").await;
    pg
}

fn opened(r: Result<PgStore, nodekeeper_eventcenter::store::StoreError>) -> String {
    match r {
        Ok(_) => "opened".into(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_stores_through_verified_tls_and_nothing_else_gets_in() {
    let pki = pki().await;
    let pg = database(pki.path()).await;
    let port = pg.port;
    let ca = pki.path().join("ca.pem");
    let url = format!("postgres://nodekeeper:correct%20horse@127.0.0.1:{port}/nodekeeper?sslmode=require");

    // A center process with the CA: it serves, stores a report and answers it back.
    let config = format!("[store]\npostgres_url = \"{url}\"\npostgres_ca = \"{}\"\n", ca.display());
    let center = EventCenter::start(&config).await;
    let ch = center.channel().await;
    ReportServiceClient::new(ch.clone())
        .report(ReportRequest {
            producer: "detector-tls".into(),
            reports: vec![condition_report(
                "tls-1",
                "c1",
                "node-a",
                "KernelDeadlock",
                true,
                nodekeeper_proto::v1::RecommendedAction::None,
            )],
        })
        .await
        .unwrap();
    let stored = events_where(ch, EventFilter { types: vec!["KernelDeadlock".into()], ..Default::default() }).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    // Every connection of the center is encrypted (the server refuses any other, and says so).
    let sessions = pg
        .sql("SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'nodekeeper'")
        .await;
    assert!(!sessions.is_empty() && sessions.iter().all(|r| r[0] == "true"), "{sessions:?}");
    drop(center);

    // Without the CA (the system's trust store only): the server's certificate is not trusted.
    let no_ca = PgOptions::default();
    let err = opened(PgStore::open(&url, no_ca).await);
    assert!(err.contains("certificate") && err.contains("UnknownIssuer"), "{err}");
    // The certificate is for 127.0.0.1, not for "localhost": the host name is verified too.
    let tls = PgTls { ca: Some(ca.clone()), client: None };
    let by_name = url.replace("127.0.0.1", "localhost");
    let err = opened(PgStore::open(&by_name, PgOptions { tls: tls.clone(), ..Default::default() }).await);
    assert!(err.contains("certificate not valid for name \"localhost\""), "{err}");
    // Plaintext is refused by the server.
    let plain = url.replace("sslmode=require", "sslmode=disable");
    let err = opened(PgStore::open(&plain, PgOptions { tls: tls.clone(), ..Default::default() }).await);
    assert!(err.contains("no encryption"), "{err}");
    // A wrong password stays wrong over TLS.
    let wrong = url.replace("correct%20horse", "battery");
    let err = opened(PgStore::open(&wrong, PgOptions { tls, ..Default::default() }).await);
    assert!(err.contains("password authentication failed"), "{err}");

    // A server that authenticates replicas by certificate: the client certificate's common name
    // is the role.
    let by_cert = format!("postgres://replica-by-cert@127.0.0.1:{port}/bycert?sslmode=require");
    let client = (pki.path().join("replica-by-cert.pem"), pki.path().join("replica-by-cert-key.pem"));
    let with_cert = PgTls { ca: Some(ca.clone()), client: Some(client) };
    let store = PgStore::open(&by_cert, PgOptions { tls: with_cert, ..Default::default() }).await;
    assert_eq!(opened(store), "opened", "{}", pg.log());
    let without = PgTls { ca: Some(ca), client: None };
    let err = opened(PgStore::open(&by_cert, PgOptions { tls: without, ..Default::default() }).await);
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_postgres_tls_settings_name_the_file_and_the_key_and_exit_78() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[store]\npostgres_ca = \"/etc/ca.pem\"\n", "store.postgres_ca"),
        ("[store]\npostgres_url = \"postgres://db/x\"\npostgres_cert = \"/etc/c.pem\"\n", "store.postgres_cert"),
        ("[store]\npostgres_url = \"postgres://db/x?sslmode=always\"\n", "store.postgres_url"),
    ] {
        let path = tmp.path().join("eventcenter.toml");
        std::fs::write(&path, format!("insecure = true\n{text}")).unwrap();
        let run = tokio::process::Command::new(bin("nodekeeper-eventcenter")).arg("--config").arg(&path).output();
        let out = tokio::time::timeout(Duration::from_secs(30), run).await.expect("exits at once").unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()), "names the file: {stderr}");
        assert!(stderr.contains(key), "names the key {key}: {stderr}");
    }
    // Where a certificate file cannot be read, the center says which when it opens the store.
    let err = opened(
        PgStore::open(
            "postgres://db.invalid/x",
            PgOptions { tls: PgTls { ca: Some(tmp.path().join("missing.pem")), client: None }, ..Default::default() },
        )
        .await,
    );
    assert!(err.contains("missing.pem"), "{err}");
}
