//! What the remediator does to Kubernetes: isolate a node (cordon and taint it, annotated with
//! the owner and the fault), label its pods to be migrated, evict them through the Eviction API,
//! and release the node. Node changes are merge patches carrying the resourceVersion they were
//! computed from: a 409 (someone else changed the node) is read again and retried.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;

pub const TAINT_KEY: &str = "nodekeeper.io/fault";
pub const MIGRATE_LABEL: &str = "nodekeeper.io/to-be-migrated";
pub const ISOLATED_BY: &str = "nodekeeper.io/isolated-by";
/// A label on the nodes we isolate, so that a restarted remediator finds them with a selector.
pub const ISOLATED_LABEL: &str = "nodekeeper.io/isolated";
pub const FAULT_ID: &str = "nodekeeper.io/fault-id";
/// Set when the node was already cordoned by someone else when we isolated it: release leaves it
/// cordoned.
pub const WAS_CORDONED: &str = "nodekeeper.io/was-cordoned";
/// On a node we cordoned for a rollout: the rollout's name.
pub const ROLLOUT_CORDON: &str = "nodekeeper.io/cordoned-for-rollout";
/// Set when the node was already cordoned when a rollout cordoned it: the uncordon leaves it so.
pub const ROLLOUT_WAS_CORDONED: &str = "nodekeeper.io/rollout-was-cordoned";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes: {0}")]
    Api(String),
    #[error("node {0} not found in Kubernetes")]
    NoNode(String),
    #[error("node {node} changed under us {attempts} times in a row (409 Conflict)")]
    Conflicts { node: String, attempts: u32 },
}

fn api_error(e: kube::Error) -> KubeError {
    match e {
        kube::Error::Api(s) => KubeError::Api(format!("{} {}: {}", s.code, s.reason, s.message)),
        other => KubeError::Api(other.to_string()),
    }
}

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[derive(Clone)]
pub struct Kube {
    nodes: Api<Node>,
    pods: Api<Pod>,
    client: kube::Client,
    evictions: kube::Client,
    /// Who we are, in the isolation annotation.
    owner: String,
}

/// What isolation found and did.
#[derive(Debug, PartialEq, Eq)]
pub struct Isolation {
    /// The node was cordoned by someone else before.
    pub was_cordoned: bool,
    /// Already isolated by us (nothing changed).
    pub already: bool,
}

/// What a release did.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Taint and annotations removed, node schedulable again.
    Uncordoned,
    /// Taint and annotations removed; left cordoned, as someone else had cordoned it.
    LeftCordoned,
    /// We had not isolated the node: nothing touched.
    NotOurs,
}

impl Kube {
    /// The client, for the other writers of this process (node conditions).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// From `kubeconfig`, or else the in-cluster config or the default kubeconfig.
    pub async fn connect(kubeconfig: Option<&Path>, owner: &str) -> Result<Kube, KubeError> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Api(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| KubeError::Api(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| KubeError::Api(format!("Kubernetes config: {e}")))?,
        };
        // Evictions get no client-side retry: a 429 from a PodDisruptionBudget is an answer (the
        // pod waits for the next try), not a transient failure to retry for minutes.
        let mut no_retry = config.clone();
        no_retry.default_retry = false;
        let client = kube::Client::try_from(config).map_err(api_error)?;
        let evictions = kube::Client::try_from(no_retry).map_err(api_error)?;
        Ok(Kube {
            nodes: Api::all(client.clone()),
            pods: Api::all(client.clone()),
            client,
            evictions,
            owner: owner.to_owned(),
        })
    }

    async fn node(&self, name: &str) -> Result<Node, KubeError> {
        self.nodes.get_opt(name).await.map_err(api_error)?.ok_or_else(|| KubeError::NoNode(name.to_owned()))
    }

    /// Applies `change` (computing a merge patch from the node as read) until it lands without a
    /// conflict; None from `change`: nothing to do.
    async fn patch_node<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&Node) -> Option<(serde_json::Value, T)>,
    ) -> Result<Option<T>, KubeError> {
        const ATTEMPTS: u32 = 5;
        for _ in 0..ATTEMPTS {
            let node = self.node(name).await?;
            let Some((mut patch, out)) = change(&node) else { return Ok(None) };
            patch["metadata"]["resourceVersion"] = json!(node.metadata.resource_version);
            match self.nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(Some(out)),
                Err(e) if is_conflict(&e) => {
                    tracing::debug!(node = name, "node changed under us; reading it again");
                }
                Err(e) => return Err(api_error(e)),
            }
        }
        Err(KubeError::Conflicts { node: name.to_owned(), attempts: ATTEMPTS })
    }

    /// Cordons the node and taints it `nodekeeper.io/fault:NoSchedule`, annotated with the owner
    /// and the fault.
    pub async fn isolate(&self, name: &str, fault_id: u64) -> Result<Isolation, KubeError> {
        let owner = self.owner.clone();
        let done = self
            .patch_node(name, |node| {
                let annotations = node.metadata.annotations.clone().unwrap_or_default();
                if annotations.get(ISOLATED_BY) == Some(&owner) && has_taint(node) {
                    return None;
                }
                let spec = node.spec.clone().unwrap_or_default();
                let was_cordoned = annotations.get(WAS_CORDONED).map(|v| v == "true").unwrap_or(false)
                    || (spec.unschedulable == Some(true) && !annotations.contains_key(ISOLATED_BY));
                let mut taints = spec.taints.unwrap_or_default();
                if !taints.iter().any(|t| t.key == TAINT_KEY) {
                    taints.push(Taint {
                        key: TAINT_KEY.into(),
                        value: Some(fault_id.to_string()),
                        effect: "NoSchedule".into(),
                        time_added: None,
                    });
                }
                let patch = json!({
                    "metadata": {
                        "labels": { ISOLATED_LABEL: "true" },
                        "annotations": {
                            ISOLATED_BY: owner,
                            FAULT_ID: fault_id.to_string(),
                            WAS_CORDONED: was_cordoned.to_string(),
                        },
                    },
                    "spec": { "unschedulable": true, "taints": taints },
                });
                Some((patch, was_cordoned))
            })
            .await?;
        Ok(match done {
            Some(was_cordoned) => Isolation { was_cordoned, already: false },
            None => Isolation { was_cordoned: false, already: true },
        })
    }

    /// The nodes we hold isolated, with the fault each was isolated for.
    pub async fn isolated_nodes(&self) -> Result<Vec<(String, u64)>, KubeError> {
        let list = self
            .nodes
            .list(&ListParams::default().labels(&format!("{ISOLATED_LABEL}=true")))
            .await
            .map_err(api_error)?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| {
                let a = n.metadata.annotations.as_ref()?;
                if a.get(ISOLATED_BY) != Some(&self.owner) {
                    return None;
                }
                Some((n.metadata.name.clone()?, a.get(FAULT_ID)?.parse().ok()?))
            })
            .collect())
    }

    /// Whether we hold the node isolated.
    pub async fn isolated_by_us(&self, name: &str) -> Result<bool, KubeError> {
        let node = self.node(name).await?;
        Ok(node.metadata.annotations.as_ref().and_then(|a| a.get(ISOLATED_BY)) == Some(&self.owner))
    }

    /// Removes our taint and annotations; uncordons unless someone else had cordoned the node.
    pub async fn release(&self, name: &str) -> Result<Released, KubeError> {
        let owner = self.owner.clone();
        let done = self
            .patch_node(name, |node| {
                let annotations = node.metadata.annotations.clone().unwrap_or_default();
                if annotations.get(ISOLATED_BY) != Some(&owner) {
                    return None;
                }
                let was_cordoned = annotations.get(WAS_CORDONED).is_some_and(|v| v == "true");
                let taints: Vec<Taint> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.key != TAINT_KEY)
                    .collect();
                let mut spec = json!({ "taints": taints });
                if !was_cordoned {
                    spec["unschedulable"] = json!(null);
                }
                let patch = json!({
                    "metadata": {
                        "labels": { ISOLATED_LABEL: null },
                        "annotations": { ISOLATED_BY: null, FAULT_ID: null, WAS_CORDONED: null },
                    },
                    "spec": spec,
                });
                Some((patch, if was_cordoned { Released::LeftCordoned } else { Released::Uncordoned }))
            })
            .await?;
        Ok(done.unwrap_or(Released::NotOurs))
    }

    /// Cordons the node for a rollout, annotated with the rollout and whether it was cordoned
    /// already (by someone else). Returns that.
    pub async fn cordon_for_rollout(&self, name: &str, rollout: &str) -> Result<bool, KubeError> {
        let done = self
            .patch_node(name, |node| {
                let annotations = node.metadata.annotations.clone().unwrap_or_default();
                if annotations.get(ROLLOUT_CORDON).is_some_and(|r| r == rollout) {
                    return None;
                }
                let was_cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
                let patch = json!({
                    "metadata": { "annotations": { ROLLOUT_CORDON: rollout, ROLLOUT_WAS_CORDONED: was_cordoned.to_string() } },
                    "spec": { "unschedulable": true },
                });
                Some((patch, was_cordoned))
            })
            .await?;
        match done {
            Some(was) => Ok(was),
            // Cordoned by this rollout already (a retry): what we noted then.
            None => Ok(self
                .node(name)
                .await?
                .metadata
                .annotations
                .and_then(|a| a.get(ROLLOUT_WAS_CORDONED).cloned())
                .is_some_and(|v| v == "true")),
        }
    }

    /// Undoes `cordon_for_rollout`: uncordons unless the node was cordoned before it or is held
    /// isolated now; removes the annotations.
    pub async fn uncordon_after_rollout(&self, name: &str) -> Result<Released, KubeError> {
        let done = self
            .patch_node(name, |node| {
                let annotations = node.metadata.annotations.clone().unwrap_or_default();
                annotations.get(ROLLOUT_CORDON)?;
                let keep = annotations.get(ROLLOUT_WAS_CORDONED).is_some_and(|v| v == "true")
                    || annotations.contains_key(ISOLATED_BY);
                let mut patch =
                    json!({ "metadata": { "annotations": { ROLLOUT_CORDON: null, ROLLOUT_WAS_CORDONED: null } } });
                if !keep {
                    patch["spec"] = json!({ "unschedulable": null });
                }
                Some((patch, if keep { Released::LeftCordoned } else { Released::Uncordoned }))
            })
            .await?;
        Ok(done.unwrap_or(Released::NotOurs))
    }

    /// Every Node, listed in pages of 500.
    pub async fn all_nodes(&self) -> Result<Vec<Node>, KubeError> {
        let mut out = Vec::new();
        let mut params = ListParams::default().limit(500);
        loop {
            let page = self.nodes.list(&params).await.map_err(api_error)?;
            out.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    /// Removes the taint `key` from the node; false when it had none.
    pub async fn remove_taint(&self, name: &str, key: &str) -> Result<bool, KubeError> {
        let done = self
            .patch_node(name, |node| {
                let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
                if !taints.iter().any(|t| t.key == key) {
                    return None;
                }
                let kept: Vec<Taint> = taints.into_iter().filter(|t| t.key != key).collect();
                Some((json!({ "spec": { "taints": kept } }), ()))
            })
            .await?;
        Ok(done.is_some())
    }

    /// The node's pods that migrate: not DaemonSet pods, not mirror (static) pods, not finished.
    async fn movable_pods(&self, node: &str) -> Result<Vec<Pod>, KubeError> {
        let list =
            self.pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}"))).await.map_err(api_error)?;
        Ok(list.items.into_iter().filter(movable).collect())
    }

    /// Labels the node's movable pods `nodekeeper.io/to-be-migrated=true` with the fault id;
    /// returns how many were labelled now.
    pub async fn label_pods(&self, node: &str, fault_id: u64) -> Result<usize, KubeError> {
        let mut labelled = 0;
        for pod in self.movable_pods(node).await? {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if labels.get(MIGRATE_LABEL).is_some_and(|v| v == "true") {
                continue;
            }
            let (ns, name) =
                (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
            let patch = json!({ "metadata": {
                "labels": { MIGRATE_LABEL: "true" },
                "annotations": { FAULT_ID: fault_id.to_string() },
            }});
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => labelled += 1,
                // Gone meanwhile: nothing to migrate.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_error(e)),
            }
        }
        Ok(labelled)
    }

    /// Asks the Eviction API to evict every movable pod; a PodDisruptionBudget that does not allow
    /// it now answers 429, and that pod is left for the next try. Returns (evicted, held back).
    pub async fn evict(&self, node: &str) -> Result<(usize, usize), KubeError> {
        let (mut evicted, mut held) = (0, 0);
        for pod in self.movable_pods(node).await? {
            let (ns, name) =
                (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
            let api: Api<Pod> = Api::namespaced(self.evictions.clone(), &ns);
            match api.evict(&name, &EvictParams::default()).await {
                Ok(_) => evicted += 1,
                Err(kube::Error::Api(s)) if s.code == 429 => held += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_error(e)),
            }
        }
        Ok((evicted, held))
    }

    /// Movable pods still on the node.
    pub async fn pods_left(&self, node: &str) -> Result<usize, KubeError> {
        Ok(self.movable_pods(node).await?.len())
    }
}

fn has_taint(node: &Node) -> bool {
    tainted(node, TAINT_KEY)
}

/// The node carries a taint of this key.
pub fn tainted(node: &Node, key: &str) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == key))
}

fn movable(pod: &Pod) -> bool {
    let annotations: BTreeMap<String, String> = pod.metadata.annotations.clone().unwrap_or_default();
    let mirror = annotations.contains_key("kubernetes.io/config.mirror");
    let daemon = pod.metadata.owner_references.as_ref().is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
    let finished =
        pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    !mirror && !daemon && !finished
}
