//! What a weft test learns from where it runs, shared by the agent's unit tests, the
//! end-to-end harness and `cargo xtask test` (the agent must not depend on the harness, nor
//! the harness on the agent):
//!
//! - [`skip`]: a test that cannot run here says so, is counted as skipped by
//!   `cargo xtask test`, and fails in CI ([`skip_optional`]: not in CI, for what no setup
//!   step can install);
//! - [`patience`]: one scale for every deadline of every test, `WEFT_TEST_PATIENCE_MS`;
//! - [`previous`]: the previous release's agent, for the upgrade test across builds.

pub mod patience;
pub mod previous;
pub mod skip;

pub use patience::{patience, scaled};
pub use previous::previous_release;
pub use skip::{LOG_ENV, Skip, parse, read, skip, skip_optional};
