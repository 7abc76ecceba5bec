//! Writes weft's CustomResourceDefinitions (from `weft::source::kube::crd`) into the directory
//! given as the only argument. Run by `cargo xtask gen`; the agent's unit test
//! `generated_crds_in_the_chart_are_current` fails while the committed files differ.

use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: gen-crds <directory>")?
        .into();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, yaml) in weft::source::kube::crd::files() {
        let path = dir.join(name);
        std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
