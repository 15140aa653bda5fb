//! A throwaway PostgreSQL 15 cluster (Debian's `postgresql-15`): `initdb` in a temporary
//! directory, the server on a free loopback port with its socket in that directory, run as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root). Killed and removed on
//! drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// The server dies with the thread that started it.
    tied: bool,
    /// Settings of the server (`-c name=value`) besides the harness's own.
    settings: Vec<String>,
}

/// The name a standby connects with, which a primary started by `start_primary` waits for.
const STANDBY: &str = "standby1";

/// The uid and gid to run PostgreSQL as: ours, unless we are root.
fn owner() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres").ok().flatten().expect("the postgres user (postgresql-15)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// The cluster this test process's event centers share when `NODEKEEPER_TEST_STORE=postgres`
/// (the suite run against the PostgreSQL store): started on first use by a thread that lives as
/// long as the process, its server killed with the process (PR_SET_PDEATHSIG). A database of its
/// own for each center: the URL.
pub fn shared_database() -> Option<String> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static PORT: OnceLock<u16> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(1);
    if std::env::var("NODEKEEPER_TEST_STORE").as_deref() != Ok("postgres") {
        return None;
    }
    let port = *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let pg = rt.block_on(Postgres::start_tied());
            tx.send(pg.port).expect("send the port");
            // Holds the cluster for the life of the process.
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared PostgreSQL cluster")
    });
    let name = format!("center{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    run(
        command("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q", "-c"])
            .arg(format!("CREATE DATABASE {name}")),
        "psql",
    );
    Some(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}

/// Removes the clusters of test processes that are gone (a process's shared cluster outlives its
/// last test: nothing drops it).
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("nodekeeper-pg-").and_then(|r| r.split('-').next()) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A directory for a cluster, owned by the user the server runs as.
fn new_dir() -> tempfile::TempDir {
    let dir =
        tempfile::Builder::new().prefix(&format!("nodekeeper-pg-{}-", std::process::id())).tempdir().expect("temp dir");
    if let Some((uid, gid)) = owner() {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the cluster's directory");
    }
    dir
}

/// Runs a PostgreSQL tool to its end; panics with its stderr (`what` named) if it fails.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"))
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

fn command(name: &str) -> Command {
    let path = Path::new(BIN).join(name);
    assert!(path.exists(), "{} is missing: run scripts/install-test-deps.sh", path.display());
    let mut c = Command::new(path);
    if let Some((uid, gid)) = owner() {
        c.uid(uid).gid(gid);
    }
    c.stdin(Stdio::null());
    c
}

impl Postgres {
    /// A new cluster, running and accepting connections.
    pub async fn start() -> Postgres {
        Self::start_with(false, Vec::new()).await
    }

    /// A new cluster started with these server settings (`name=value`) besides the harness's.
    pub async fn start_configured(settings: &[&str]) -> Postgres {
        Self::start_with(false, settings.iter().map(|s| (*s).to_owned()).collect()).await
    }

    /// A new cluster whose commits wait for a synchronous standby (`standby` makes one): with
    /// `synchronous_commit = on`, a commit is acknowledged once the standby has flushed it.
    pub async fn start_primary() -> Postgres {
        Self::start_with(false, vec![format!("synchronous_standby_names={STANDBY}")]).await
    }

    /// A synchronous streaming standby of this cluster: `pg_basebackup` of it, replicating from
    /// it, running on a port of its own.
    pub async fn standby(&self) -> Postgres {
        let dir = new_dir();
        let data = dir.path().join("data");
        run(
            command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-D"])
                .arg(&data)
                .args(["-R", "-X", "stream", "--no-sync"]),
            "pg_basebackup",
        );
        // Named, so that the primary's synchronous_standby_names waits for it.
        let conninfo = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={STANDBY}'\n",
            self.port
        );
        let auto = data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).expect("postgresql.auto.conf");
        conf.push_str(&conninfo);
        std::fs::write(&auto, conf).expect("write postgresql.auto.conf");
        let mut standby = Postgres { dir, port: free_port(), child: None, tied: false, settings: Vec::new() };
        standby.spawn().await;
        standby
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it is done).
    pub fn promote(&self) {
        run(command("pg_ctl").args(["promote", "-w", "-D"]).arg(self.data()), "pg_ctl promote");
    }

    /// A new cluster whose server dies with the thread that starts it.
    async fn start_tied() -> Postgres {
        Self::start_with(true, Vec::new()).await
    }

    /// A new cluster that takes TCP connections over TLS only: `cert` and `key` (PEM) its server
    /// certificate, `ca` the CA its clients' certificates must chain to, `hba` the `hostssl` lines
    /// of its pg_hba.conf. The harness's own connections use the local socket (trusted).
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path, hba: &str) -> Postgres {
        let mut pg = Self::init(
            false,
            vec![
                "ssl=on".into(),
                "ssl_cert_file=server.pem".into(),
                "ssl_key_file=server-key.pem".into(),
                "ssl_ca_file=ca.pem".into(),
            ],
        );
        let data = pg.data();
        for (from, to) in [(cert, "server.pem"), (key, "server-key.pem"), (ca, "ca.pem")] {
            std::fs::copy(from, data.join(to)).expect("copy a TLS file into the cluster");
            std::fs::set_permissions(data.join(to), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = owner() {
                std::os::unix::fs::chown(data.join(to), Some(uid), Some(gid)).expect("chown a TLS file");
            }
        }
        let rules = format!("local all all trust\nhostnossl all all 0.0.0.0/0 reject\n{hba}\n");
        std::fs::write(data.join("pg_hba.conf"), rules).expect("write pg_hba.conf");
        pg.spawn().await;
        pg
    }

    async fn start_with(tied: bool, settings: Vec<String>) -> Postgres {
        let mut pg = Self::init(tied, settings);
        pg.spawn().await;
        pg
    }

    /// A new cluster, not started yet.
    fn init(tied: bool, settings: Vec<String>) -> Postgres {
        if tied {
            remove_orphans();
        }
        let dir = new_dir();
        let data = dir.path().join("data");
        run(
            command("initdb").args(["-D"]).arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
                "--no-sync",
            ]),
            "initdb",
        );
        Postgres { dir, port: free_port(), child: None, tied, settings }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server on the cluster's port (again, after `kill9`).
    pub async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log file");
        if let Some((uid, gid)) = owner() {
            std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(uid), Some(gid)).unwrap();
        }
        let mut postgres = command("postgres");
        if self.tied {
            // util-linux's setpriv sets the parent-death signal, then becomes the server.
            let program = postgres.get_program().to_owned();
            postgres = Command::new("setpriv");
            postgres.args(["--pdeathsig", "KILL", "--"]).arg(program).stdin(Stdio::null());
            if let Some((uid, gid)) = owner() {
                postgres.uid(uid).gid(gid);
            }
        }
        let child = postgres
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let local = self.local();
        wait_for("postgres accepting connections", Duration::from_secs(30), || {
            let local = local.clone();
            async move { local.connect(tokio_postgres::NoTls).await.ok().map(drop) }
        })
        .await;
    }

    /// The harness's connection to database `postgres`: the superuser, through the local socket.
    fn local(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(self.dir.path()).port(self.port).user("postgres").dbname("postgres");
        c
    }

    /// Runs `sql` (one statement, or several that may share a transaction) as the superuser; the
    /// rows of its answer, as text.
    pub async fn sql(&self, sql: &str) -> Vec<Vec<String>> {
        let (client, conn) = self.local().connect(tokio_postgres::NoTls).await.expect("connect to the cluster");
        tokio::spawn(conn);
        let mut rows = Vec::new();
        let answer = client.simple_query(sql).await.unwrap_or_else(|e| {
            panic!("{sql}: {}", e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()))
        });
        for m in answer {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                rows.push((0..r.len()).map(|i| r.get(i).unwrap_or_default().to_owned()).collect());
            }
        }
        rows
    }

    /// A libpq-style URL of a database of this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database; its URL.
    pub async fn create_database(&self, name: &str) -> String {
        self.sql(&format!("CREATE DATABASE \"{name}\"")).await;
        self.url(name)
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill9();
    }
}
