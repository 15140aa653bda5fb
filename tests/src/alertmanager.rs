//! A real Alertmanager (`prometheus-alertmanager`, installed by scripts/install-test-deps.sh) on
//! a free port, without clustering, receiving into a receiver that sends nowhere. Tests post
//! alerts to it the way Prometheus does and read what fires through its v2 API.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

pub struct Alertmanager {
    pub url: String,
    child: Child,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    pub async fn start() -> Alertmanager {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: nowhere\nreceivers:\n  - name: nowhere\n").expect("write config");
        let port = crate::free_port();
        nodekeeper_common::tls::install_default_provider();
        let log = dir.path().join("alertmanager.log");
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the Alertmanager log"))
            .spawn()
            .expect("prometheus-alertmanager (scripts/install-test-deps.sh installs it)");
        let mut am =
            Alertmanager { url: format!("http://127.0.0.1:{port}"), child, http: reqwest::Client::new(), _dir: dir };
        let ready = format!("{}/-/ready", am.url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if am.http.get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            let exited = am.child.try_wait().expect("try_wait");
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("Alertmanager not ready (exit: {exited:?}); its log:\n{output}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        am
    }

    /// Posts one alert as Prometheus would; `resolved`: with its end now.
    pub async fn post(&self, labels: &[(&str, &str)], resolved: bool) {
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
        let mut alert = json!({ "labels": labels, "annotations": { "summary": "posted by a test" } });
        if resolved {
            alert["endsAt"] = Value::from(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        }
        let r = self.http.post(format!("{}/api/v2/alerts", self.url)).json(&json!([alert])).send().await.unwrap();
        assert!(r.status().is_success(), "Alertmanager answered {}", r.status());
    }

    /// The active alerts matching `matchers` (Alertmanager's syntax), as its API gives them.
    pub async fn active(&self, matchers: &[&str]) -> Vec<Value> {
        let filters: Vec<(&str, &str)> = matchers.iter().map(|m| ("filter", *m)).collect();
        let mut url = reqwest::Url::parse(&format!("{}/api/v2/alerts?active=true", self.url)).unwrap();
        url.query_pairs_mut().extend_pairs(filters);
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.kill();
    }
}
