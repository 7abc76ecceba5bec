//! Publishes the CA's trust bundle in a ConfigMap (Kubernetes mode), so agents and anything
//! else that verifies mesh certificates can mount it: key `ca.crt`, the roots as PEM.
//!
//! Input: the roots and the ConfigMap's name in the CA's namespace (and, for waypoints, in
//! the further namespaces `kubernetes.trustBundleNamespaces` names: one publisher each). Output: the ConfigMap,
//! created if missing and updated when its `ca.crt` differs from the CA's roots (a new root
//! after a restart, or a hand edit). Other keys and labels are left alone. Reconciled at
//! start, then every [`RESYNC`]; a failure is logged, counted and retried with backoff.
//! Updates carry the `resourceVersion` read, so a concurrent writer makes the update fail
//! (409) and the next round starts from what is there.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

use super::{Error, metrics::Metrics};

/// Keeps one ConfigMap's `ca.crt` equal to the CA's roots.
pub struct Publisher {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    bundle: String,
    metrics: Arc<Metrics>,
}

/// What one reconciliation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Created,
    Updated,
    Unchanged,
}

impl Publisher {
    /// `name` lives in the client's default namespace (in a pod: the pod's own).
    pub fn new(client: Client, name: &str, roots_pem: &[String], metrics: Arc<Metrics>) -> Self {
        let namespace = client.default_namespace().to_owned();
        Self::in_namespace(client, &namespace, name, roots_pem, metrics)
    }

    /// `name` in `namespace` (a waypoint's namespace).
    pub fn in_namespace(
        client: Client,
        namespace: &str,
        name: &str,
        roots_pem: &[String],
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            bundle: bundle_text(roots_pem),
            metrics,
        }
    }

    /// One round: read, then create or update if needed.
    pub async fn reconcile(&self) -> Result<Published, Error> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| self.error("get", source))?;
        let published = match current {
            None => {
                let config_map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "weft-ca".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(KEY.to_owned(), self.bundle.clone())])),
                    ..ConfigMap::default()
                };
                self.api
                    .create(&PostParams::default(), &config_map)
                    .await
                    .map_err(|source| self.error("create", source))?;
                Published::Created
            }
            Some(config_map)
                if config_map.data.as_ref().and_then(|d| d.get(KEY)) == Some(&self.bundle) =>
            {
                Published::Unchanged
            }
            Some(mut config_map) => {
                config_map
                    .data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(KEY.to_owned(), self.bundle.clone());
                self.api
                    .replace(&self.name, &PostParams::default(), &config_map)
                    .await
                    .map_err(|source| self.error("update", source))?;
                Published::Updated
            }
        };
        match published {
            Published::Created => self.metrics.bundle_published("created"),
            Published::Updated => self.metrics.bundle_published("updated"),
            Published::Unchanged => {}
        }
        if published != Published::Unchanged {
            info!(component = "ca", namespace = %self.namespace, config_map = %self.name,
                action = ?published, "trust bundle published");
        }
        Ok(published)
    }

    /// Reconciles forever (until the task is dropped).
    pub async fn run(self) {
        let mut backoff = RETRY_MIN;
        loop {
            match self.reconcile().await {
                Ok(_) => {
                    backoff = RETRY_MIN;
                    tokio::time::sleep(RESYNC).await;
                }
                Err(e) => {
                    self.metrics.bundle_published("failed");
                    warn!(component = "ca", error = %e, retry_in = ?backoff,
                        "cannot publish the trust bundle");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn error(&self, verb: &'static str, source: kube::Error) -> Error {
        Error::Kubernetes {
            what: format!("{verb} configmap {}/{}", self.namespace, self.name),
            source: Box::new(source),
        }
    }
}

/// The roots, one PEM block after another, with Unix line ends (readable in `kubectl get`).
fn bundle_text(roots_pem: &[String]) -> String {
    let mut text = String::new();
    for pem in roots_pem {
        text.push_str(&pem.trim_end().replace("\r\n", "\n"));
        text.push('\n');
    }
    text
}

/// The ConfigMap key, as in Kubernetes' own `kube-root-ca.crt`.
pub const KEY: &str = "ca.crt";
/// How often the ConfigMap is checked after a successful round.
pub const RESYNC: Duration = Duration::from_secs(60);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ca::kubernetes::tests::{FakeApi, FakeState};

    const ROOTS: [&str; 1] = ["-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"];

    fn publisher(api: &FakeApi, metrics: &Arc<Metrics>) -> Publisher {
        let roots: Vec<String> = ROOTS.iter().map(|r| (*r).to_owned()).collect();
        Publisher::new(
            api.client.clone(),
            "weft-trust-bundle",
            &roots,
            Arc::clone(metrics),
        )
    }

    fn stored(api: &FakeApi) -> serde_json::Value {
        api.state().config_maps["weft/weft-trust-bundle"].clone()
    }

    #[tokio::test]
    async fn config_map_is_created_then_updated_then_left_alone() {
        let api = FakeApi::start(FakeState::default());
        let metrics = Arc::new(Metrics::new());
        let publisher = publisher(&api, &metrics);

        assert_eq!(publisher.reconcile().await.unwrap(), Published::Created);
        let created = stored(&api);
        assert_eq!(created["data"][KEY], json!(ROOTS[0]));
        assert_eq!(
            created["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            json!("weft-ca")
        );

        // Nothing changed: no write.
        let writes = || api.calls().iter().filter(|c| !c.starts_with("GET")).count();
        assert_eq!(publisher.reconcile().await.unwrap(), Published::Unchanged);
        assert_eq!(writes(), 1);

        // A stale bundle (an old root, a hand edit) is replaced; other keys stay.
        {
            let mut state = api.state();
            let cm = state.config_maps.get_mut("weft/weft-trust-bundle").unwrap();
            cm["data"] = json!({KEY: "old root", "note": "kept"});
        }
        assert_eq!(publisher.reconcile().await.unwrap(), Published::Updated);
        let updated = stored(&api);
        assert_eq!(updated["data"][KEY], json!(ROOTS[0]));
        assert_eq!(updated["data"]["note"], json!("kept"));
        assert_ne!(
            updated["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert!(
            api.calls()
                .iter()
                .any(|c| c.starts_with("PUT /api/v1/namespaces/weft/configmaps/weft-trust-bundle")),
            "{:?}",
            api.calls()
        );
        let text = metrics.encode();
        assert!(text.contains(r#"result="created"} 1"#), "{text}");
        assert!(text.contains(r#"result="updated"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn api_refusal_is_an_error_naming_the_config_map() {
        let api = FakeApi::start(FakeState::failing(403));
        let metrics = Arc::new(Metrics::new());
        let err = publisher(&api, &metrics).reconcile().await.unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("get configmap weft/weft-trust-bundle") && message.contains("RBAC"),
            "{message}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn publishing_retries_until_the_api_answers() {
        let api = FakeApi::start(FakeState::failing(500));
        let metrics = Arc::new(Metrics::new());
        let task = tokio::spawn(publisher(&api, &metrics).run());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(api.state().config_maps.is_empty());
        assert!(metrics.encode().contains(r#"result="failed"} "#));
        api.state().failing = None;
        tokio::time::sleep(RETRY_MAX).await;
        assert_eq!(stored(&api)["data"][KEY], json!(ROOTS[0]));
        task.abort();
    }
}
