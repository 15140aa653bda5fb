//! NetApp ONTAP's REST API (9.6 and later): iSCSI initiator names as the initiators of an igroup,
//! NFS client addresses as the client matches of one rule of an export policy. Basic
//! authentication over HTTPS, the password read from a file.
//!
//! - igroup: `GET /api/protocols/san/igroups?svm.name=S&name=G&fields=uuid,initiators`, then
//!   `POST /api/protocols/san/igroups/{uuid}/initiators {"name"}` and
//!   `DELETE /api/protocols/san/igroups/{uuid}/initiators/{name}`;
//! - export rule: `GET /api/protocols/nfs/export-policies?svm.name=S&name=P&fields=id`, then
//!   `GET|POST /api/protocols/nfs/export-policies/{id}/rules/{index}/clients` (`{"match"}`) and
//!   `DELETE .../clients/{match}`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

/// What a target's list is on ONTAP.
pub enum Object {
    Igroup(String),
    ExportRule { policy: String, index: u32 },
}

pub struct Ontap {
    pub base: reqwest::Url,
    pub svm: String,
    pub object: Object,
    pub username: String,
    pub password_file: PathBuf,
    pub http: reqwest::Client,
}

#[derive(Deserialize)]
struct Records<T> {
    #[serde(default = "Vec::new")]
    records: Vec<T>,
    #[serde(default, rename = "_links")]
    links: Option<Links>,
}

#[derive(Deserialize)]
struct Links {
    next: Option<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: String,
}

#[derive(Deserialize)]
struct Igroup {
    uuid: String,
    #[serde(default)]
    initiators: Vec<Initiator>,
}

#[derive(Deserialize)]
struct Initiator {
    name: String,
}

#[derive(Deserialize)]
struct Policy {
    id: u64,
}

#[derive(Deserialize)]
struct Client {
    #[serde(rename = "match")]
    matches: String,
}

impl Ontap {
    /// An HTTPS client that trusts `ca` (a PEM file) or the system's roots.
    pub fn client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        b.build().map_err(|e| e.to_string())
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().push("api");
            for s in segments {
                p.push(s);
            }
        }
        u
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let password = std::fs::read_to_string(&self.password_file)
            .map_err(|e| format!("ONTAP password file {}: {e}", self.password_file.display()))?;
        let r = req
            .basic_auth(&self.username, Some(password.trim_end_matches(['\r', '\n'])))
            .send()
            .await
            .map_err(|e| format!("ONTAP {}: {e}", self.base))?;
        Ok(r)
    }

    /// A GET of every page of a collection.
    async fn get_all<T: serde::de::DeserializeOwned>(&self, mut url: reqwest::Url) -> Result<Vec<T>, String> {
        let mut out = Vec::new();
        loop {
            let r = self.send(self.http.get(url.clone())).await?;
            let page: Records<T> = ok(r).await?.json().await.map_err(|e| format!("ONTAP's answer to {url}: {e}"))?;
            out.extend(page.records);
            match page.links.and_then(|l| l.next) {
                Some(next) => url = self.base.join(&next.href).map_err(|e| format!("ONTAP's next link: {e}"))?,
                None => return Ok(out),
            }
        }
    }

    async fn igroup(&self, name: &str) -> Result<Igroup, String> {
        let mut url = self.url(&["protocols", "san", "igroups"]);
        url.query_pairs_mut()
            .append_pair("svm.name", &self.svm)
            .append_pair("name", name)
            .append_pair("fields", "uuid,initiators");
        let mut found: Vec<Igroup> = self.get_all(url).await?;
        found.pop().ok_or_else(|| format!("ONTAP has no igroup {name} in SVM {}", self.svm))
    }

    async fn clients_url(&self, policy: &str, index: u32) -> Result<reqwest::Url, String> {
        let mut url = self.url(&["protocols", "nfs", "export-policies"]);
        url.query_pairs_mut()
            .append_pair("svm.name", &self.svm)
            .append_pair("name", policy)
            .append_pair("fields", "id");
        let found: Vec<Policy> = self.get_all(url).await?;
        let id = found.first().ok_or_else(|| format!("ONTAP has no export policy {policy} in SVM {}", self.svm))?.id;
        Ok(self.url(&["protocols", "nfs", "export-policies", &id.to_string(), "rules", &index.to_string(), "clients"]))
    }

    pub async fn list(&self) -> Result<BTreeSet<String>, String> {
        match &self.object {
            Object::Igroup(name) => Ok(self.igroup(name).await?.initiators.into_iter().map(|i| i.name).collect()),
            Object::ExportRule { policy, index } => {
                let url = self.clients_url(policy, *index).await?;
                let clients: Vec<Client> = self.get_all(url).await?;
                Ok(clients.into_iter().map(|c| c.matches).collect())
            }
        }
    }

    /// Adds and removes entries one by one: the outcome of each, additions first. What is there
    /// already, or gone already, is no error.
    pub async fn apply(&self, add: &[String], remove: &[String]) -> Vec<Result<(), String>> {
        let collection = match &self.object {
            Object::Igroup(name) => {
                self.igroup(name).await.map(|g| self.url(&["protocols", "san", "igroups", &g.uuid, "initiators"]))
            }
            Object::ExportRule { policy, index } => self.clients_url(policy, *index).await,
        };
        let collection = match collection {
            Ok(c) => c,
            Err(e) => return vec![Err(e); add.len() + remove.len()],
        };
        let field = match self.object {
            Object::Igroup(_) => "name",
            Object::ExportRule { .. } => "match",
        };
        let mut out = Vec::with_capacity(add.len() + remove.len());
        for e in add {
            let r = self.send(self.http.post(collection.clone()).json(&json!({ field: e }))).await;
            out.push(match r {
                Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => Ok(()),
                Ok(r) => match ok(r).await {
                    Err(e) if e.contains("already") => Ok(()),
                    other => other.map(drop),
                },
                Err(e) => Err(e),
            });
        }
        for e in remove {
            let mut url = collection.clone();
            if let Ok(mut p) = url.path_segments_mut() {
                p.push(e);
            }
            let r = self.send(self.http.delete(url)).await;
            out.push(match r {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Ok(()),
                Ok(r) => ok(r).await.map(drop),
                Err(e) => Err(e),
            });
        }
        out
    }
}

/// A 2xx answer, or ONTAP's error message (`{"error": {"message", "code"}}`).
async fn ok(r: reqwest::Response) -> Result<reqwest::Response, String> {
    if r.status().is_success() {
        return Ok(r);
    }
    let status = r.status();
    let url = r.url().clone();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or("no error message");
    Err(format!("ONTAP answered {status} to {url}: {message}"))
}
