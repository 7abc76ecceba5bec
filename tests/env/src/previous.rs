//! The previous release's agent, for the upgrade test across builds. `cargo xtask test`
//! builds it from the repository's history and names it in [`BIN_ENV`], or says in
//! [`MISSING_ENV`] why it could not (a shallow clone has no history to build it from).

use std::path::PathBuf;

use crate::skip::{skip, skip_optional};

/// The variable naming the previous release's agent binary.
pub const BIN_ENV: &str = "WEFT_PREVIOUS_BIN";
/// The variable saying why there is no previous release to test against.
pub const MISSING_ENV: &str = "WEFT_PREVIOUS_MISSING";

/// The previous release's agent, or `None` after recording `test` as skipped: counted as a
/// skip in CI too when the history lacks the release (nothing a setup step can install),
/// a failure in CI when nobody built it.
pub fn previous_release(test: &str) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(BIN_ENV) {
        return Some(bin.into());
    }
    match std::env::var(MISSING_ENV) {
        Ok(why) => skip_optional(test, &why),
        Err(_) => skip(
            test,
            &format!("{BIN_ENV} is not set: `cargo xtask test` builds the previous release"),
        ),
    }
    None
}
