//! Where state comes from: the local YAML file (`source::file`), used by standalone nodes,
//! the demo and the end-to-end tests, or the Kubernetes API (`source::kube`); both produce
//! the same `state::Snapshot` and share the policy syntax and its validation
//! (`source::syntax`). A source publishes only whole, validated snapshots: a rejected change
//! is recorded in `SourceStatus` (the file source keeps the last good file, the Kubernetes
//! source the last good version of the rejected object).
//!
//! Between a source and its readers the agent runs two stages: `resolve` fills in the
//! addresses of external services' DNS hosts, then `node` joins the node's own pods.

pub mod external;
pub mod file;
pub mod gateway;
pub mod kube;
pub mod node;
pub mod resolve;
pub mod syntax;
pub mod traffic;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::sync::{Mutex, MutexGuard};

/// Which source the agent runs with (`--source`, `WEFT_SOURCE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The local config file (`--config`), polled for changes.
    #[default]
    File,
    /// The Kubernetes API (in-cluster service account or KUBECONFIG).
    Kubernetes,
}

/// What a source reports about itself, for `weft status` and metrics.
#[derive(Debug, Default)]
pub struct SourceStatus {
    kind: Kind,
    generation: AtomicU64,
    rejected_total: AtomicU64,
    last_rejection: Mutex<Option<String>>,
    restart_pending: Mutex<Vec<String>>,
}

/// A copy of `SourceStatus` for serialization.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatusView {
    /// Which source this is.
    pub source: Kind,
    /// Number of snapshots accepted so far (1 after start-up).
    pub generation: u64,
    /// Number of changes rejected since start-up.
    pub rejected_total: u64,
    /// The error of the most recent rejection, if the latest change was rejected.
    pub last_rejection: Option<String>,
    /// Fields of the `agent:` section changed since start-up: read, not applied; they take
    /// effect at the next restart.
    pub restart_pending: Vec<String>,
}

impl SourceStatus {
    /// The status of a source of `kind`, before its first snapshot.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    pub fn accepted(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        *self.lock() = None;
    }

    /// The file is valid again but equal to the state in force: clear the rejection.
    pub fn recovered(&self) {
        *self.lock() = None;
    }

    /// A change (a file, or one object) was rejected.
    pub fn rejected(&self, error: &impl std::fmt::Display) {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        *self.lock() = Some(error.to_string());
    }

    /// The `agent:` fields that differ from those the agent started with (none: in force).
    pub fn set_restart_pending(&self, fields: Vec<String>) {
        *self.restart_pending.lock() = fields;
    }

    pub fn view(&self) -> SourceStatusView {
        SourceStatusView {
            source: self.kind,
            generation: self.generation.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
            last_rejection: self.lock().clone(),
            restart_pending: self.restart_pending.lock().clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<String>> {
        self.last_rejection.lock()
    }
}

impl Kind {
    /// The `source` label of `config_rejected_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Kubernetes => "kubernetes",
        }
    }
}
