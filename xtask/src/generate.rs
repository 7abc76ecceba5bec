//! `cargo xtask gen`: regenerates the files derived from Rust types: the CRDs of the Helm
//! chart (`deploy/helm/weft/crds/`, from `agent/src/source/kube/crd.rs`). It runs the
//! agent crate's `gen-crds` example, so xtask itself never links the agent. CI fails while
//! the committed files are stale: the agent's unit test
//! `generated_crds_in_the_chart_are_current` generates and compares.

use anyhow::Result;

use crate::cargo::{self, cargo};

pub fn run() -> Result<()> {
    let dir = cargo::root().join(CRD_DIR);
    cargo::run(
        cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "weft",
                "--example",
                "gen-crds",
                "--",
            ])
            .arg(&dir),
    )
}

/// Where the chart's CRDs live (`weft::source::kube::crd::CHART_CRD_DIR`).
const CRD_DIR: &str = "deploy/helm/weft/crds";
