//! What the elected status writer (`accepted`) writes, shared with the planner of
//! TrafficPolicies' ancestors (`ancestors`), which `accepted` calls: one object's status,
//! and the condition's names.

use serde_json::Value;

use super::Kind;

/// One object's status to write.
#[derive(Debug, PartialEq)]
pub(super) struct Write {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    /// The fields of `status` to set (a merge patch: others are left as they are).
    pub status: Value,
}

/// The condition type, and its reason when True.
pub(super) const ACCEPTED: &str = "Accepted";
/// The reason when False.
pub(super) const INVALID: &str = "Invalid";
