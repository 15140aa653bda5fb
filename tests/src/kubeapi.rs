//! A fake Kubernetes API server: no real one can run on this machine, so this one speaks the REST
//! wire format the remediator uses, for nodes, pods and evictions: JSON objects with
//! resourceVersions, `Status` objects on errors, 404, 409 Conflict on a stale resourceVersion,
//! 415 for a patch content type it does not take, 429 from a PodDisruptionBudget on eviction, and
//! the three patch content types (merge, strategic merge with taints merged by key, JSON patch),
//! the nodes' status subresource (conditions merged by type, each with its field manager), and
//! core/v1 Events (created, and patched as recorders aggregate them), and coordination.k8s.io
//! Leases (`leases.rs`); with the RBAC rules the project ships enforced (`rbac.rs`: 403 for a
//! request they do not grant).
//! Tests seed it, make "another writer" change a node between the remediator's read and its
//! write, and read back what the remediator did.

mod leases;
pub mod rbac;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    resource_version: u64,
    /// Pods a PodDisruptionBudget protects: eviction answers 429.
    pdb_blocked: HashSet<(String, String)>,
    /// Node reads after which another writer changes the node (the next write conflicts).
    interfere: u32,
    /// Every request: "METHOD path content-type".
    requests: Vec<String>,
    /// When each node was first patched.
    first_patch: BTreeMap<String, std::time::Instant>,
    conflicts: u32,
    /// The field manager of each node condition's last write: (node, type) → manager.
    condition_managers: BTreeMap<(String, String), String>,
    /// Every write to a node's status: (node, the patch's conditions, when it arrived).
    status_writes: Vec<(String, Vec<Value>, std::time::Instant)>,
    /// core/v1 Events by (namespace, name).
    events: BTreeMap<(String, String), Value>,
    /// coordination.k8s.io/v1 Leases by (namespace, name).
    leases: BTreeMap<(String, String), Value>,
    /// The RBAC rules in force (the shipped ones), and those requests were granted by.
    rbac: std::collections::BTreeSet<rbac::Access>,
    rbac_used: std::collections::BTreeSet<rbac::Access>,
}

#[derive(Clone, Default)]
pub struct FakeKube(Arc<Mutex<Inner>>);

pub struct Server {
    pub url: String,
    pub kube: FakeKube,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pub kubeconfig: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An error the API server answers with a `Status` object.
struct Failure(StatusCode, &'static str, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        status(self.0, self.1, self.2)
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

fn object(v: &Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response()
}

impl FakeKube {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("fake kube lock")
    }

    pub fn add_node(&self, name: &str) {
        self.register_node(name, json!({}), &[]);
    }

    /// A node as a kubelet registers it: with its labels (`--node-labels` and the well-known
    /// ones) and `--register-with-taints` (keys, effect NoSchedule).
    pub fn register_node(&self, name: &str, labels: Value, taints: &[&str]) {
        let mut k = self.lock();
        k.resource_version += 1;
        let taints: Vec<Value> = taints.iter().map(|t| json!({ "key": t, "effect": "NoSchedule" })).collect();
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "resourceVersion": k.resource_version.to_string(), "labels": labels, "annotations": {} },
            "spec": { "taints": taints },
        });
        k.nodes.insert(name.to_owned(), node);
    }

    /// Someone changes the node's labels (`kubectl label`): `labels` replaces them.
    pub fn set_labels(&self, name: &str, labels: Value) {
        let mut k = self.lock();
        k.resource_version += 1;
        let rv = k.resource_version.to_string();
        let node = k.nodes.get_mut(name).expect("node");
        node["metadata"]["labels"] = labels;
        node["metadata"]["resourceVersion"] = json!(rv);
    }

    /// `kubectl delete node`.
    pub fn delete_node(&self, name: &str) {
        let mut k = self.lock();
        k.resource_version += 1;
        k.nodes.remove(name);
    }

    /// A pod on `node`; `owner`: the kind of its controller (e.g. "DaemonSet", "ReplicaSet").
    pub fn add_pod(&self, ns: &str, name: &str, node: &str, owner: Option<&str>) {
        let mut k = self.lock();
        k.resource_version += 1;
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "resourceVersion": k.resource_version.to_string() },
            "spec": { "nodeName": node, "containers": [{ "name": "main", "image": "app" }] },
            "status": { "phase": "Running" },
        });
        if let Some(kind) = owner {
            pod["metadata"]["ownerReferences"] =
                json!([{ "apiVersion": "apps/v1", "kind": kind, "name": "owner", "uid": "u-1", "controller": true }]);
        }
        k.pods.insert((ns.to_owned(), name.to_owned()), pod);
    }

    pub fn block_eviction(&self, ns: &str, name: &str, blocked: bool) {
        let key = (ns.to_owned(), name.to_owned());
        let mut k = self.lock();
        if blocked {
            k.pdb_blocked.insert(key);
        } else {
            k.pdb_blocked.remove(&key);
        }
    }

    /// After each of the next `n` node reads, another writer changes the node.
    pub fn interfere(&self, n: u32) {
        self.lock().interfere = n;
    }

    /// Someone else cordons the node (as `kubectl cordon` does).
    pub fn cordon(&self, name: &str) {
        let mut k = self.lock();
        k.resource_version += 1;
        let rv = k.resource_version.to_string();
        let node = k.nodes.get_mut(name).expect("node");
        node["spec"]["unschedulable"] = json!(true);
        node["metadata"]["resourceVersion"] = json!(rv);
    }

    /// Another writer (field manager `manager`) sets a condition on the node's status.
    pub fn set_condition(&self, node: &str, condition: Value, manager: &str) {
        let mut k = self.lock();
        let kind = condition["type"].as_str().expect("type").to_owned();
        k.condition_managers.insert((node.to_owned(), kind), manager.to_owned());
        let n = k.nodes.get_mut(node).expect("node");
        merge_conditions(n, &[condition]);
    }

    /// The node's conditions, by type.
    pub fn conditions(&self, node: &str) -> BTreeMap<String, Value> {
        let n = self.node(node);
        let list = n["status"]["conditions"].as_array().cloned().unwrap_or_default();
        list.into_iter().map(|c| (c["type"].as_str().unwrap_or_default().to_owned(), c)).collect()
    }

    /// The field manager that last wrote the node's condition `kind`.
    pub fn condition_manager(&self, node: &str, kind: &str) -> Option<String> {
        self.lock().condition_managers.get(&(node.to_owned(), kind.to_owned())).cloned()
    }

    /// The Events recorded, in the order of their names.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.values().cloned().collect()
    }

    /// Every write to a node's status so far: (node, the conditions it carried).
    pub fn status_writes(&self) -> Vec<(String, Vec<Value>)> {
        self.lock().status_writes.iter().map(|(n, c, _)| (n.clone(), c.clone())).collect()
    }

    /// How many writes to nodes' status arrived so far.
    pub fn status_write_count(&self) -> usize {
        self.lock().status_writes.len()
    }

    /// When the first write to `node`'s status setting condition `kind` to `status` arrived.
    pub fn status_write_time(&self, node: &str, kind: &str, status: &str) -> Option<std::time::Instant> {
        let inner = self.lock();
        let mut writes = inner.status_writes.iter().filter(|(n, _, _)| n == node);
        writes
            .find(|(_, conditions, _)| conditions.iter().any(|c| c["type"] == kind && c["status"] == status))
            .map(|(_, _, at)| *at)
    }

    pub fn node(&self, name: &str) -> Value {
        self.lock().nodes.get(name).cloned().expect("node")
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().pods.get(&(ns.to_owned(), name.to_owned())).cloned()
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// When `node` was first patched (the cordon request arrived).
    pub fn first_patch(&self, node: &str) -> Option<std::time::Instant> {
        self.lock().first_patch.get(node).copied()
    }

    /// 409s answered so far.
    pub fn conflicts(&self) -> u32 {
        self.lock().conflicts
    }

    fn log(&self, method: &str, uri: &Uri, headers: &HeaderMap) {
        let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("-");
        self.lock().requests.push(format!("{method} {} {ct}", uri.path()));
    }
}

/// Is the node cordoned, and does it carry the taint `key`?
pub fn cordoned_and_tainted(node: &Value, key: &str) -> (bool, bool) {
    let cordoned = node["spec"]["unschedulable"] == json!(true);
    let tainted = node["spec"]["taints"].as_array().is_some_and(|t| t.iter().any(|t| t["key"] == key));
    (cordoned, tainted)
}

async fn get_node(State(k): State<FakeKube>, Path(name): Path<String>, uri: Uri, h: HeaderMap) -> Response {
    k.log("GET", &uri, &h);
    let mut inner = k.lock();
    let Some(node) = inner.nodes.get(&name).cloned() else {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("nodes \"{name}\" not found"));
    };
    if inner.interfere > 0 {
        // Another controller updates the node right after this read.
        inner.interfere -= 1;
        inner.resource_version += 1;
        let rv = inner.resource_version.to_string();
        let n = inner.nodes.get_mut(&name).expect("node");
        n["metadata"]["resourceVersion"] = json!(rv);
        n["metadata"]["annotations"]["other-controller/heartbeat"] = json!(rv);
    }
    object(&node)
}

/// Merges `conditions` into the node's `status.conditions` by `type` (their patch merge key), each
/// as a merge patch of the one it replaces: conditions of other types stay as they are.
fn merge_conditions(node: &mut Value, conditions: &[Value]) {
    let mut list = node["status"]["conditions"].as_array().cloned().unwrap_or_default();
    for c in conditions {
        match list.iter_mut().find(|o| o["type"] == c["type"]) {
            Some(old) => json_patch::merge(old, c),
            None => list.push(c.clone()),
        }
    }
    node["status"]["conditions"] = Value::Array(list);
}

/// Applies a patch of the request's content type to `obj`.
fn apply_patch(obj: &mut Value, content_type: &str, body: &[u8]) -> Result<(), Failure> {
    let bad = |e: String| Failure(StatusCode::BAD_REQUEST, "BadRequest", e);
    match content_type {
        "application/merge-patch+json" => {
            let p: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            json_patch::merge(obj, &p);
        }
        "application/strategic-merge-patch+json" => {
            let mut p: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            // Taints merge by their key; everything else as a merge patch.
            if let Some(new) = p["spec"].get("taints").and_then(Value::as_array).cloned() {
                let mut taints = obj["spec"]["taints"].as_array().cloned().unwrap_or_default();
                for t in new {
                    taints.retain(|o| o["key"] != t["key"]);
                    taints.push(t);
                }
                p["spec"]["taints"] = Value::Array(taints);
            }
            json_patch::merge(obj, &p);
        }
        "application/json-patch+json" => {
            let p: json_patch::Patch = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            json_patch::patch(obj, &p)
                .map_err(|e| Failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string()))?;
        }
        other => {
            return Err(Failure(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other})"
                ),
            ));
        }
    }
    Ok(())
}

fn content_type(h: &HeaderMap) -> String {
    h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").split(';').next().unwrap_or("").trim().to_owned()
}

/// Patches `obj` (None: not found) of `kind` (e.g. "nodes"): a resourceVersion in the patch is a
/// precondition (409 if stale).
fn patch_object(
    inner: &mut Inner,
    obj: Option<Value>,
    kind: &str,
    name: &str,
    h: &HeaderMap,
    body: &[u8],
) -> Result<Value, Failure> {
    let mut obj =
        obj.ok_or_else(|| Failure(StatusCode::NOT_FOUND, "NotFound", format!("{kind} \"{name}\" not found")))?;
    let wanted = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|p| p["metadata"]["resourceVersion"].as_str().map(str::to_owned));
    if let Some(rv) = wanted
        && obj["metadata"]["resourceVersion"].as_str() != Some(rv.as_str())
    {
        inner.conflicts += 1;
        return Err(Failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        ));
    }
    apply_patch(&mut obj, &content_type(h), body)?;
    inner.resource_version += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    Ok(obj)
}

/// A query parameter of the request.
fn query(uri: &Uri, key: &str) -> Option<String> {
    let url = reqwest::Url::parse(&format!("http://x/?{}", uri.query().unwrap_or(""))).ok()?;
    url.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

/// A list object (`NodeList`, `PodList`) of `items`.
fn list(kind: &str, items: Vec<Value>, resource_version: u64) -> Response {
    object(&json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": { "resourceVersion": resource_version.to_string() },
        "items": items,
    }))
}

async fn patch_node(
    State(k): State<FakeKube>,
    Path(name): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("PATCH", &uri, &h);
    k.lock().first_patch.entry(name.clone()).or_insert_with(std::time::Instant::now);
    patch_stored(&k, |i| &mut i.nodes, name.clone(), "nodes", &name, &h, &body)
}

/// The status subresource: only `status` changes; conditions merge by type (strategic merge), and
/// each is recorded with the request's field manager.
async fn patch_node_status(
    State(k): State<FakeKube>,
    Path(name): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("PATCH", &uri, &h);
    if content_type(&h) != "application/strategic-merge-patch+json" {
        let msg = format!("the fake takes node status as a strategic merge patch, got {}", content_type(&h));
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", msg);
    }
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let Some(manager) = query(&uri, "fieldManager") else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the fake expects a fieldManager".into());
    };
    let conditions = patch["status"]["conditions"].as_array().cloned().unwrap_or_default();
    for c in &conditions {
        for field in ["type", "status", "lastHeartbeatTime", "lastTransitionTime"] {
            if c[field].as_str().is_none_or(str::is_empty) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("condition without {field}: {c}"));
            }
        }
        if !matches!(c["status"].as_str(), Some("True" | "False" | "Unknown")) {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("condition status: {c}"));
        }
    }
    let mut inner = k.lock();
    let Some(mut node) = inner.nodes.get(&name).cloned() else {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("nodes \"{name}\" not found"));
    };
    merge_conditions(&mut node, &conditions);
    for c in &conditions {
        let kind = c["type"].as_str().unwrap_or_default().to_owned();
        inner.condition_managers.insert((name.clone(), kind), manager.clone());
    }
    inner.status_writes.push((name.clone(), conditions, std::time::Instant::now()));
    inner.resource_version += 1;
    node["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    inner.nodes.insert(name, node.clone());
    object(&node)
}

/// Creates an Event: the fields the event recorders set must be there.
async fn create_event(
    State(k): State<FakeKube>,
    Path(ns): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("POST", &uri, &h);
    let mut event: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    for field in
        ["/metadata/name", "/involvedObject/kind", "/involvedObject/name", "/reason", "/type", "/source/component"]
    {
        if event.pointer(field).and_then(Value::as_str).is_none_or(str::is_empty) {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("Event without {field}: {event}"));
        }
    }
    let name = event["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let mut inner = k.lock();
    if inner.events.contains_key(&(ns.clone(), name.clone())) {
        return status(StatusCode::CONFLICT, "AlreadyExists", format!("events \"{name}\" already exists"));
    }
    inner.resource_version += 1;
    event["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    event["metadata"]["namespace"] = json!(ns);
    inner.events.insert((ns, name), event.clone());
    (StatusCode::CREATED, [("content-type", "application/json")], event.to_string()).into_response()
}

async fn patch_event(
    State(k): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("PATCH", &uri, &h);
    patch_stored(&k, |i| &mut i.events, (ns, name.clone()), "events", &name, &h, &body)
}

/// Patches the object `key` of the map `objects` picks (of `kind`, e.g. "pods") and answers
/// with it, or with the failure.
fn patch_stored<K: Ord>(
    k: &FakeKube,
    objects: fn(&mut Inner) -> &mut BTreeMap<K, Value>,
    key: K,
    kind: &str,
    name: &str,
    h: &HeaderMap,
    body: &[u8],
) -> Response {
    let mut inner = k.lock();
    let obj = objects(&mut inner).get(&key).cloned();
    match patch_object(&mut inner, obj, kind, name, h, body) {
        Ok(obj) => {
            objects(&mut inner).insert(key, obj.clone());
            object(&obj)
        }
        Err(f) => f.into_response(),
    }
}

async fn list_nodes(State(k): State<FakeKube>, uri: Uri, h: HeaderMap) -> Response {
    k.log("GET", &uri, &h);
    // Equality selectors only ("k=v,k2=v2"), as the remediator uses.
    let selector: Vec<(String, String)> = query(&uri, "labelSelector")
        .map(|v| v.split(',').filter_map(|kv| kv.split_once('=')).map(|(a, b)| (a.to_owned(), b.to_owned())).collect())
        .unwrap_or_default();
    // Pages: `limit` items after the `continue` token (here the last name of the previous page).
    let limit = query(&uri, "limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let after = query(&uri, "continue").unwrap_or_default();
    let inner = k.lock();
    let mut items: Vec<Value> = inner
        .nodes
        .iter()
        .filter(|(name, _)| after.is_empty() || name.as_str() > after.as_str())
        .map(|(_, n)| n)
        .filter(|n| selector.iter().all(|(key, v)| n["metadata"]["labels"][key] == v.as_str()))
        .take(limit.saturating_add(1))
        .cloned()
        .collect();
    let more = items.len() > limit;
    items.truncate(limit);
    let mut response = json!({
        "apiVersion": "v1", "kind": "NodeList",
        "metadata": { "resourceVersion": inner.resource_version.to_string() },
        "items": items,
    });
    if more {
        let last = response["items"][limit - 1]["metadata"]["name"].clone();
        response["metadata"]["continue"] = last;
    }
    object(&response)
}

async fn list_pods(State(k): State<FakeKube>, uri: Uri, h: HeaderMap) -> Response {
    k.log("GET", &uri, &h);
    let on_node = query(&uri, "fieldSelector").and_then(|v| v.strip_prefix("spec.nodeName=").map(str::to_owned));
    let inner = k.lock();
    let items = inner
        .pods
        .values()
        .filter(|p| on_node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n))
        .cloned()
        .collect();
    list("PodList", items, inner.resource_version)
}

async fn patch_pod(
    State(k): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("PATCH", &uri, &h);
    patch_stored(&k, |i| &mut i.pods, (ns, name.clone()), "pods", &name, &h, &body)
}

async fn evict_pod(
    State(k): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("POST", &uri, &h);
    let eviction: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    // The server defaults the kind of a subresource's body; a given one must be right.
    let kind_ok = eviction.get("kind").is_none_or(|k| k == "Eviction");
    if !kind_ok || eviction["metadata"]["name"] != name.as_str() {
        return status(StatusCode::BAD_REQUEST, "BadRequest", format!("not an Eviction of pod {name}: {eviction}"));
    }
    let mut inner = k.lock();
    let key = (ns, name.clone());
    if !inner.pods.contains_key(&key) {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("pods \"{name}\" not found"));
    }
    if inner.pdb_blocked.contains(&key) {
        return status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Cannot evict pod as it would violate the pod's disruption budget.".into(),
        );
    }
    inner.pods.remove(&key);
    let ok = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 });
    (StatusCode::CREATED, [("content-type", "application/json")], ok.to_string()).into_response()
}

impl Server {
    pub async fn start() -> Server {
        let kube = FakeKube::default();
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/rbac.yaml");
        kube.lock().rbac = rbac::load(&rules);
        let app = Router::new()
            .route("/api/v1/nodes", get(list_nodes))
            .route("/api/v1/nodes/{name}", get(get_node).patch(patch_node))
            .route("/api/v1/nodes/{name}/status", axum::routing::patch(patch_node_status))
            .route("/api/v1/pods", get(list_pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}", axum::routing::patch(patch_pod))
            .route("/api/v1/namespaces/{ns}/pods/{name}/eviction", post(evict_pod))
            .route("/api/v1/namespaces/{ns}/events", post(create_event))
            .route("/api/v1/namespaces/{ns}/events/{name}", axum::routing::patch(patch_event))
            .route("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", post(leases::create))
            .route("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}", get(leases::get).put(leases::replace))
            .layer(axum::middleware::from_fn_with_state(kube.clone(), rbac::enforce))
            .with_state(kube.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: remediator\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: remediator\ncurrent-context: fake\n"
        );
        std::fs::write(&kubeconfig, config).expect("write kubeconfig");
        Server { url, kube, task, _dir: dir, kubeconfig }
    }
}
