//! A real browser for the dashboard's tests: Debian's chromium, headless, driven through its
//! chromedriver (WebDriver) with fantoccini; the page's console read through chromedriver's log
//! endpoint, and axe-core (installed from npm by scripts/install-test-deps.sh) run in the page for
//! an accessibility audit. Screenshots land in `target/dashboard-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use serde_json::{Value, json};

pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// chromedriver's `POST /session/{id}/se/log`: the browser's console since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({ "type": "browser" }).to_string()))
    }
}

/// Where axe-core's browser build is.
fn axe_path() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/nodekeeper-test-tools/axe/node_modules/axe-core/axe.min.js")
}

impl Browser {
    pub async fn start() -> Browser {
        let port = crate::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/install-test-deps.sh installs Debian's chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        nodekeeper_common::tls::install_default_provider();
        // chromedriver keeps connections open: a client with a timeout, not a read to the end.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("an HTTP client");
        crate::wait_for("chromedriver", Duration::from_secs(20), || async {
            let r = http.get(format!("{url}/status")).send().await.ok()?;
            r.text().await.ok().filter(|s| s.contains("\"ready\":true")).map(drop)
        })
        .await;
        let profile = tempfile::tempdir().expect("tempdir");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", format!("--user-data-dir={}", profile.path().display())],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps: serde_json::Map<String, Value> = caps.as_object().cloned().unwrap_or_default();
        let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a chromium session");
        Browser { client, driver, _profile: profile }
    }

    /// The console's errors since the last call (a failed request, an uncaught exception, a
    /// blocked script).
    pub async fn console_errors(&self) -> Vec<String> {
        let log = self.client.issue_cmd(BrowserLog).await.expect("the browser's console log");
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// axe-core's serious and critical violations on the page now: (rule, what it found).
    pub async fn accessibility_violations(&self) -> Vec<String> {
        let source = std::fs::read_to_string(axe_path()).unwrap_or_else(|e| {
            panic!("{}: {e} (scripts/install-test-deps.sh installs axe-core)", axe_path().display())
        });
        self.client.execute(&source, vec![]).await.expect("inject axe-core");
        let found = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];\
                 axe.run(document, { resultTypes: ['violations'] }).then(r => done(r.violations), e => done([{ id: 'axe-error', impact: 'critical', help: String(e), nodes: [] }]));",
                vec![],
            )
            .await
            .expect("run axe-core");
        found
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
            .map(|v| {
                let targets: Vec<String> =
                    v["nodes"].as_array().into_iter().flatten().take(3).map(|n| n["target"].to_string()).collect();
                format!("{}: {} ({})", v["id"], v["help"], targets.join(", "))
            })
            .collect()
    }

    /// Saves a screenshot of the page as `target/dashboard-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = crate::bin("nodekeeper").parent().expect("target dir").join("../dashboard-screenshots");
        std::fs::create_dir_all(&dir).expect("the screenshots' folder");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Ends the session (chromium with it) before chromedriver stops.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    /// The text of the first element matching `css`, if any.
    pub async fn text(&self, css: &str) -> Option<String> {
        let e = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
        e.text().await.ok()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
