//! coordination.k8s.io/v1 Leases as the API server keeps them: create (409 AlreadyExists when
//! one of that name exists), get, and update (PUT) preconditioned on the resourceVersion the
//! writer read (409 Conflict when it is stale), which is what leader election relies on.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Failure, FakeKube, object, status};

impl FakeKube {
    /// The Lease `name` of namespace `ns`.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().leases.get(&(ns.to_owned(), name.to_owned())).cloned()
    }
}

fn parse(body: &Bytes) -> Result<Value, Failure> {
    let lease: Value =
        serde_json::from_slice(body).map_err(|e| Failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()))?;
    if lease.get("kind").is_some_and(|k| k != "Lease") {
        return Err(Failure(StatusCode::BAD_REQUEST, "BadRequest", format!("not a Lease: {lease}")));
    }
    Ok(lease)
}

pub(super) async fn get(
    State(k): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    h: HeaderMap,
) -> Response {
    k.log("GET", &uri, &h);
    match k.lease(&ns, &name) {
        Some(lease) => object(&lease),
        None => status(StatusCode::NOT_FOUND, "NotFound", format!("leases.coordination.k8s.io \"{name}\" not found")),
    }
}

pub(super) async fn create(
    State(k): State<FakeKube>,
    Path(ns): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("POST", &uri, &h);
    let mut lease = match parse(&body) {
        Ok(l) => l,
        Err(f) => return f.into_response(),
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value".into());
    };
    let mut inner = k.lock();
    let key = (ns.clone(), name.clone());
    if inner.leases.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    inner.resource_version += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(ns);
    lease["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    inner.leases.insert(key, lease.clone());
    (StatusCode::CREATED, [("content-type", "application/json")], lease.to_string()).into_response()
}

pub(super) async fn replace(
    State(k): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    k.log("PUT", &uri, &h);
    let mut lease = match parse(&body) {
        Ok(l) => l,
        Err(f) => return f.into_response(),
    };
    let mut inner = k.lock();
    let key = (ns.clone(), name.clone());
    let Some(current) = inner.leases.get(&key) else {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("leases.coordination.k8s.io \"{name}\" not found"));
    };
    // An update without a resourceVersion is unconditional, as the API server takes it.
    let given = lease["metadata"]["resourceVersion"].as_str().unwrap_or_default();
    if !given.is_empty() && given != current["metadata"]["resourceVersion"].as_str().unwrap_or_default() {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    inner.resource_version += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["name"] = json!(name);
    lease["metadata"]["namespace"] = json!(ns);
    lease["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    inner.leases.insert(key, lease.clone());
    object(&lease)
}
