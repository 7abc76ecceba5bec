//! Readiness: the agent is ready when no condition is pending. Conditions are named
//! ("ebpf", "enroll", ...) and carry the reason they are pending, so `/healthz/ready` and
//! the logs say what is still missing, not just "not ready".

use std::{collections::BTreeMap, sync::Arc};

use tracing::{info, warn};

use crate::sync::{Mutex, MutexGuard};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    pending: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Ready {
    /// Marks `condition` pending for `reason` (logged when it changes).
    pub fn block(&self, condition: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        let mut pending = self.lock();
        if pending.get(condition) != Some(&reason) {
            warn!(component = "readiness", condition, reason = %reason, "not ready");
            pending.insert(condition, reason);
        }
    }

    /// Marks `condition` satisfied.
    pub fn unblock(&self, condition: &'static str) {
        let mut pending = self.lock();
        if pending.remove(condition).is_some() && pending.is_empty() {
            info!(component = "readiness", "ready");
        }
    }

    /// Sets `condition` from a result.
    pub fn set<E: std::fmt::Display>(&self, condition: &'static str, result: Result<(), E>) {
        match result {
            Ok(()) => self.unblock(condition),
            Err(e) => self.block(condition, e.to_string()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    /// Pending conditions and why.
    pub fn pending(&self) -> BTreeMap<&'static str, String> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.pending.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_clears() {
        let ready = Ready::default();
        ready.block("ebpf", "loading");
        ready.block("enroll", "first reconcile");
        ready.unblock("ebpf");
        assert!(!ready.is_ready());
        assert_eq!(ready.pending()["enroll"], "first reconcile");
        ready.set::<String>("enroll", Ok(()));
        assert!(ready.is_ready());
    }
}
