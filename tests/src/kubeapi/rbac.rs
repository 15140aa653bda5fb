//! RBAC as the API server enforces it, with the rules the project ships
//! (`packaging/kubernetes/rbac.yaml`): every request is mapped to its API group, resource
//! (with subresource), verb and namespace; one that no ClusterRole rule, nor a Role rule of its
//! namespace, grants is answered 403 Forbidden. What was granted is recorded, so a test can show
//! that every rule was needed.

use std::collections::BTreeSet;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use yaml_rust2::{Yaml, YamlLoader};

use super::{FakeKube, status};

/// What a request does: (namespace or "" for a cluster-wide rule, API group, resource, verb).
pub type Access = (String, String, String, String);

/// The rules of the ClusterRoles (namespace "") and Roles (their namespace) in the file, one
/// entry per group, resource and verb.
pub fn load(path: &Path) -> BTreeSet<Access> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for doc in &docs {
        let namespace = match doc["kind"].as_str() {
            Some("ClusterRole") => String::new(),
            Some("Role") => doc["metadata"]["namespace"].as_str().expect("a Role's namespace").to_owned(),
            _ => continue,
        };
        for rule in doc["rules"].as_vec().into_iter().flatten() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.insert((namespace.clone(), group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    out
}

/// The access a request needs, from its method and path as the API server reads them.
pub fn access(method: &Method, path: &str, query: Option<&str>) -> Access {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => ("?", &[][..]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => ("?".to_owned(), false),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match (method.as_str(), named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "?",
    };
    (namespace.to_owned(), group.to_owned(), resource, verb.to_owned())
}

/// The middleware: 403 unless a rule grants the request.
pub(super) async fn enforce(State(k): State<FakeKube>, request: Request, next: Next) -> Response {
    let (namespace, group, resource, verb) = access(request.method(), request.uri().path(), request.uri().query());
    let cluster_wide = (String::new(), group.clone(), resource.clone(), verb.clone());
    let namespaced = (namespace.clone(), group.clone(), resource.clone(), verb.clone());
    let grant = {
        let mut inner = k.lock();
        let grant = [cluster_wide, namespaced].into_iter().find(|a| inner.rbac.contains(a));
        if let Some(g) = &grant {
            inner.rbac_used.insert(g.clone());
        }
        grant
    };
    if grant.is_none() {
        let what = if group.is_empty() { resource.clone() } else { format!("{resource}.{group}") };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{namespace}\"")
        };
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"system:serviceaccount:nodekeeper:nodekeeper-remediator\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
            ),
        );
    }
    next.run(request).await
}

impl FakeKube {
    /// The rules requests were granted by so far.
    pub fn rbac_used(&self) -> BTreeSet<Access> {
        self.lock().rbac_used.clone()
    }

    /// The rules in force.
    pub fn rbac_rules(&self) -> BTreeSet<Access> {
        self.lock().rbac.clone()
    }
}
