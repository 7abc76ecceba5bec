//! Where state comes from. Today: the local YAML file (`source::file`), used by standalone
//! nodes, the demo and the end-to-end tests; the Kubernetes source will produce the same
//! `state::Snapshot`. A source publishes only whole, validated snapshots: a rejected change
//! leaves the last good one in force and is recorded in `SourceStatus`.

pub mod file;
pub mod node_pods;

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

/// What a source reports about itself, for `weft status` and metrics.
#[derive(Debug, Default)]
pub struct SourceStatus {
    generation: AtomicU64,
    rejected_total: AtomicU64,
    last_rejection: Mutex<Option<String>>,
}

/// A copy of `SourceStatus` for serialization.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatusView {
    /// Number of snapshots accepted so far (1 after start-up).
    pub generation: u64,
    /// Number of changes rejected since start-up.
    pub rejected_total: u64,
    /// The error of the most recent rejection, if the latest change was rejected.
    pub last_rejection: Option<String>,
}

impl SourceStatus {
    pub fn accepted(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        *self.lock() = None;
    }

    /// The file is valid again but equal to the state in force: clear the rejection.
    pub fn recovered(&self) {
        *self.lock() = None;
    }

    pub fn rejected(&self, error: &impl std::fmt::Display) {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        *self.lock() = Some(error.to_string());
    }

    pub fn view(&self) -> SourceStatusView {
        SourceStatusView {
            generation: self.generation.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
            last_rejection: self.lock().clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A poisoned lock only means a panic elsewhere while holding a String: still valid.
        self.last_rejection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
