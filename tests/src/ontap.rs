//! A fake NetApp ONTAP REST API: no ONTAP can run here, so this one speaks the documented JSON of
//! the calls the storage syncer makes, for one SVM: igroups (`/api/protocols/san/igroups`, their
//! `initiators`) and export policies (`/api/protocols/nfs/export-policies`, the `clients` of their
//! rules), with `records`, `num_records`, paging through `_links.next` (a few records a page, so
//! the syncer must follow it), ONTAP's `{"error": {"message", "code"}}` bodies, 401 without the
//! right basic credentials, and 404 for what does not exist. Plain HTTP (ONTAP itself is HTTPS
//! only; the syncer's client takes either). Tests seed it, edit it by hand and read it back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::{Value, json};

/// Records per page.
const PAGE: usize = 3;
pub const SVM: &str = "svm1";
pub const USER: &str = "nodekeeper";
pub const PASSWORD: &str = "s3cret";

#[derive(Default)]
pub struct Inner {
    /// igroup name → (uuid, initiators).
    pub igroups: BTreeMap<String, (String, Vec<String>)>,
    /// export policy name → (id, rule index → client matches).
    pub policies: BTreeMap<String, (u64, BTreeMap<u32, Vec<String>>)>,
    /// Requests answered, by method and path (without the query).
    pub requests: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

pub struct Ontap {
    pub url: String,
    pub state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ontap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error": { "message": message, "code": code } }))).into_response()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":").replace("%2C", ",")))
        .collect()
}

/// A page of `records` from `start`, with a link to the next page.
fn page(uri: &Uri, records: Vec<Value>) -> Response {
    let q = query(uri);
    let start: usize = q.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
    let end = (start + PAGE).min(records.len());
    let mut body = json!({ "records": records[start.min(end)..end], "num_records": end - start.min(end) });
    if end < records.len() {
        let mut rest: Vec<String> =
            uri.query().unwrap_or("").split('&').filter(|kv| !kv.starts_with("start=")).map(str::to_owned).collect();
        rest.push(format!("start={end}"));
        body["_links"] = json!({ "next": { "href": format!("{}?{}", uri.path(), rest.join("&")) } });
    }
    axum::Json(body).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    use base64::Engine;
    let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str())
}

async fn guard(State(s): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    s.lock().unwrap().requests.push(format!("{} {}", req.method(), req.uri().path()));
    if !authorized(req.headers()) {
        return error(StatusCode::UNAUTHORIZED, "6691623", "User is not authorized.");
    }
    next.run(req).await
}

async fn list_igroups(State(s): State<Shared>, uri: Uri) -> Response {
    let q = query(&uri);
    if q.get("svm.name").map(String::as_str) != Some(SVM) {
        return page(&uri, vec![]);
    }
    let s = s.lock().unwrap();
    let records = s
        .igroups
        .iter()
        .filter(|(name, _)| q.get("name").is_none_or(|n| n == *name))
        .map(|(name, (uuid, inits))| {
            json!({ "uuid": uuid, "name": name, "svm": { "name": SVM },
                    "initiators": inits.iter().map(|i| json!({ "name": i })).collect::<Vec<_>>() })
        })
        .collect();
    page(&uri, records)
}

fn igroup_of<'a>(s: &'a mut Inner, uuid: &str) -> Option<&'a mut Vec<String>> {
    s.igroups.values_mut().find(|(u, _)| u == uuid).map(|(_, i)| i)
}

async fn add_initiator(State(s): State<Shared>, Path(uuid): Path<String>, body: axum::Json<Value>) -> Response {
    let mut s = s.lock().unwrap();
    let Some(inits) = igroup_of(&mut s, &uuid) else {
        return error(StatusCode::NOT_FOUND, "5374875", "The specified igroup does not exist.");
    };
    let Some(name) = body["name"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "2", "Missing value for required field \"name\".");
    };
    if inits.iter().any(|i| i == name) {
        return error(StatusCode::CONFLICT, "1254197", "The initiator is already in the initiator group.");
    }
    inits.push(name.to_owned());
    StatusCode::CREATED.into_response()
}

async fn remove_initiator(State(s): State<Shared>, Path((uuid, name)): Path<(String, String)>) -> Response {
    let mut s = s.lock().unwrap();
    let Some(inits) = igroup_of(&mut s, &uuid) else {
        return error(StatusCode::NOT_FOUND, "5374875", "The specified igroup does not exist.");
    };
    let before = inits.len();
    inits.retain(|i| *i != name);
    if inits.len() == before {
        return error(StatusCode::NOT_FOUND, "4", "entry doesn't exist");
    }
    StatusCode::OK.into_response()
}

async fn list_policies(State(s): State<Shared>, uri: Uri) -> Response {
    let q = query(&uri);
    if q.get("svm.name").map(String::as_str) != Some(SVM) {
        return page(&uri, vec![]);
    }
    let s = s.lock().unwrap();
    let records = s
        .policies
        .iter()
        .filter(|(name, _)| q.get("name").is_none_or(|n| n == *name))
        .map(|(name, (id, _))| json!({ "id": id, "name": name, "svm": { "name": SVM } }))
        .collect();
    page(&uri, records)
}

fn rule_of(s: &mut Inner, id: u64, index: u32) -> Option<&mut Vec<String>> {
    s.policies.values_mut().find(|(i, _)| *i == id).and_then(|(_, rules)| rules.get_mut(&index))
}

async fn list_clients(State(s): State<Shared>, Path((id, index)): Path<(u64, u32)>, uri: Uri) -> Response {
    let mut s = s.lock().unwrap();
    let Some(clients) = rule_of(&mut s, id, index) else {
        return error(StatusCode::NOT_FOUND, "1703954", "The specified export rule does not exist.");
    };
    let records = clients.iter().map(|c| json!({ "match": c })).collect();
    page(&uri, records)
}

async fn add_client(State(s): State<Shared>, Path((id, index)): Path<(u64, u32)>, body: axum::Json<Value>) -> Response {
    let mut s = s.lock().unwrap();
    let Some(clients) = rule_of(&mut s, id, index) else {
        return error(StatusCode::NOT_FOUND, "1703954", "The specified export rule does not exist.");
    };
    let Some(m) = body["match"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "2", "Missing value for required field \"match\".");
    };
    if !clients.iter().any(|c| c == m) {
        clients.push(m.to_owned());
    }
    StatusCode::CREATED.into_response()
}

async fn remove_client(State(s): State<Shared>, Path((id, index, m)): Path<(u64, u32, String)>) -> Response {
    let mut s = s.lock().unwrap();
    let Some(clients) = rule_of(&mut s, id, index) else {
        return error(StatusCode::NOT_FOUND, "1703954", "The specified export rule does not exist.");
    };
    let before = clients.len();
    clients.retain(|c| *c != m);
    if clients.len() == before {
        return error(StatusCode::NOT_FOUND, "4", "entry doesn't exist");
    }
    StatusCode::OK.into_response()
}

impl Ontap {
    /// Serves an SVM with igroup `igroup` (initiators `initiators`) and export policy `policy`
    /// with an empty rule 1.
    pub async fn start(igroup: &str, initiators: &[&str], policy: &str) -> Ontap {
        let state = Shared::default();
        {
            let mut s = state.lock().unwrap();
            let uuid = "2a4b6c8d-0000-4000-8000-0000000000aa".to_owned();
            s.igroups.insert(igroup.to_owned(), (uuid, initiators.iter().map(|i| (*i).to_owned()).collect()));
            s.policies.insert(policy.to_owned(), (8589934594, BTreeMap::from([(1, Vec::new())])));
        }
        let app = Router::new()
            .route("/api/protocols/san/igroups", get(list_igroups))
            .route("/api/protocols/san/igroups/{uuid}/initiators", axum::routing::post(add_initiator))
            .route("/api/protocols/san/igroups/{uuid}/initiators/{name}", delete(remove_initiator))
            .route("/api/protocols/nfs/export-policies", get(list_policies))
            .route("/api/protocols/nfs/export-policies/{id}/rules/{index}/clients", get(list_clients).post(add_client))
            .route("/api/protocols/nfs/export-policies/{id}/rules/{index}/clients/{match}", delete(remove_client))
            .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ontap { url, state, task }
    }

    pub fn initiators(&self, igroup: &str) -> Vec<String> {
        let mut v = self.state.lock().unwrap().igroups[igroup].1.clone();
        v.sort();
        v
    }

    pub fn clients(&self, policy: &str) -> Vec<String> {
        let mut v = self.state.lock().unwrap().policies[policy].1[&1].clone();
        v.sort();
        v
    }
}
