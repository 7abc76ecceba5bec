//! The SBOM of the release binary: CycloneDX 1.5 JSON built from `cargo metadata` (the
//! resolved dependency graph, for the host target) and Cargo.lock (the registry checksums).
//!
//! Which crates: everything the `weft` package reaches through normal and build dependency
//! edges; dev-dependencies never (they build tests, not the binary). A crate reached only
//! through build edges (build scripts, their dependencies) ran while the binary was built but
//! is not linked into it: it is listed with `scope: excluded` and the property
//! `cargo:dependency-kind = build`; so is a proc-macro crate (it runs in the compiler) and
//! what only it depends on. The exception is the eBPF object: `weft-ebpf` is a
//! build-dependency of `weft`, yet agent/build.rs embeds the object it compiles into the
//! binary, so it and its normal dependencies are `required` like linked crates.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The CycloneDX document for the package `root` (a workspace member) at `version`.
/// `metadata` is `cargo metadata --format-version 1 --filter-platform <target>` output,
/// `lock` the text of Cargo.lock, `target` the triple the metadata was filtered for.
pub fn cyclonedx(
    metadata: &Value,
    lock: &str,
    root: &str,
    version: &str,
    target: &str,
) -> Result<Value> {
    let packages = Packages::from_metadata(metadata)?;
    let root_id = packages.workspace_member(metadata, root)?;
    let graph = Graph::from_metadata(metadata)?;
    let checksums = lock_checksums(lock);

    let proc_macro = |id: &str| packages.get(id).is_some_and(|p| p.proc_macro);
    let mut linked = graph.reachable(&[root_id.as_str()], Edge::Normal, &proc_macro);
    let everything = graph.reachable(&[root_id.as_str()], Edge::NormalOrBuild, &|_| false);
    let embedded: Vec<&str> = everything
        .iter()
        .map(String::as_str)
        .filter(|id| {
            packages
                .get(id)
                .is_some_and(|p| EMBEDDED.contains(&p.name.as_str()))
        })
        .collect();
    linked.extend(graph.reachable(&embedded, Edge::Normal, &proc_macro));

    let mut components = Vec::new();
    for id in everything.iter().filter(|id| **id != root_id) {
        let package = packages
            .get(id)
            .with_context(|| format!("no package {id}"))?;
        let mut component = package.component(&checksums);
        let (scope, kind) = if linked.contains(id) {
            ("required", "normal")
        } else {
            ("excluded", "build")
        };
        component["scope"] = json!(scope);
        component["properties"] = json!([{ "name": "cargo:dependency-kind", "value": kind }]);
        components.push(component);
    }
    components.sort_by_key(|c| (c["name"].to_string(), c["version"].to_string()));

    let root_package = packages.get(&root_id).context("root package")?;
    let mut top = root_package.component(&checksums);
    // The release may be versioned apart from the crate (`cargo xtask release --version`).
    top["type"] = json!("application");
    top["version"] = json!(version);
    let root_ref = purl(&root_package.name, version);
    top["bom-ref"] = json!(root_ref);
    top["purl"] = json!(root_ref);

    let mut dependencies = Vec::new();
    for id in &everything {
        let reference = if *id == root_id {
            root_ref.clone()
        } else {
            packages.get(id).context("package")?.purl()
        };
        let mut depends_on: Vec<String> = graph
            .edges(id, Edge::NormalOrBuild)
            .filter_map(|dep| packages.get(dep).map(Package::purl))
            .collect();
        depends_on.sort();
        depends_on.dedup();
        dependencies.push(json!({ "ref": reference, "dependsOn": depends_on }));
    }
    dependencies.sort_by_key(|d| d["ref"].to_string());

    Ok(json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "tools": { "components": [{ "type": "application", "name": "cargo xtask release" }] },
            "component": top,
            "properties": [
                { "name": "weft:sbom:target", "value": target },
                { "name": "weft:sbom:included", "value": INCLUDED },
            ],
        },
        "components": components,
        "dependencies": dependencies,
    }))
}

/// Checksums of Cargo.lock by (name, version, source): registry crates have one.
pub fn lock_checksums(lock: &str) -> BTreeMap<(String, String, String), String> {
    let mut checksums = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in block.lines() {
            // Only `key = "string"` lines; `dependencies = [` and its items are not needed.
            if let Some((key, value)) = line.split_once(" = ")
                && let Some(value) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
            {
                fields.insert(key.trim(), value);
            }
        }
        if let (Some(name), Some(version), Some(source), Some(checksum)) = (
            fields.get("name"),
            fields.get("version"),
            fields.get("source"),
            fields.get("checksum"),
        ) {
            checksums.insert(
                (name.to_string(), version.to_string(), source.to_string()),
                checksum.to_string(),
            );
        }
    }
    checksums
}

struct Package {
    name: String,
    version: String,
    license: Option<String>,
    source: Option<String>,
    proc_macro: bool,
}

impl Package {
    fn purl(&self) -> String {
        purl(&self.name, &self.version)
    }

    fn component(&self, checksums: &BTreeMap<(String, String, String), String>) -> Value {
        let purl = self.purl();
        let mut component = json!({
            "type": "library",
            "bom-ref": purl,
            "name": self.name,
            "version": self.version,
            "purl": purl,
        });
        if let Some(license) = &self.license {
            component["licenses"] = json!([{ "expression": license }]);
        }
        let checksum = self
            .source
            .as_ref()
            .and_then(|s| checksums.get(&(self.name.clone(), self.version.clone(), s.clone())));
        if let Some(sha256) = checksum {
            component["hashes"] = json!([{ "alg": "SHA-256", "content": sha256 }]);
        }
        component
    }
}

struct Packages(BTreeMap<String, Package>);

impl Packages {
    fn from_metadata(metadata: &Value) -> Result<Packages> {
        let list = metadata["packages"]
            .as_array()
            .context("cargo metadata has no packages")?;
        let mut packages = BTreeMap::new();
        for p in list {
            let field = |key: &str| p[key].as_str().map(str::to_string);
            let id = field("id").context("package without id")?;
            let package = Package {
                name: field("name").with_context(|| format!("{id}: no name"))?,
                version: field("version").with_context(|| format!("{id}: no version"))?,
                license: field("license"),
                source: field("source"),
                proc_macro: p["targets"].as_array().into_iter().flatten().any(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "proc-macro"))
                }),
            };
            packages.insert(id, package);
        }
        Ok(Packages(packages))
    }

    fn get(&self, id: &str) -> Option<&Package> {
        self.0.get(id)
    }

    fn workspace_member(&self, metadata: &Value, name: &str) -> Result<String> {
        let members = metadata["workspace_members"]
            .as_array()
            .context("cargo metadata has no workspace_members")?;
        for id in members.iter().filter_map(Value::as_str) {
            if self.get(id).is_some_and(|p| p.name == name) {
                return Ok(id.to_string());
            }
        }
        bail!("no workspace member named {name}")
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Edge {
    Normal,
    NormalOrBuild,
}

/// The resolved graph: package id → its dependencies.
struct Graph(BTreeMap<String, Vec<Dep>>);

struct Dep {
    id: String,
    /// The edge's kinds (one per way it is declared): None is normal, else "build" or "dev".
    kinds: Vec<Option<String>>,
}

impl Graph {
    fn from_metadata(metadata: &Value) -> Result<Graph> {
        let nodes = metadata["resolve"]["nodes"]
            .as_array()
            .context("cargo metadata has no resolve graph (was it run with --no-deps?)")?;
        let mut graph = BTreeMap::new();
        for node in nodes {
            let id = node["id"].as_str().context("resolve node without id")?;
            let mut deps = Vec::new();
            for dep in node["deps"].as_array().into_iter().flatten() {
                let pkg = dep["pkg"].as_str().context("resolve dep without pkg")?;
                let kinds = dep["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| k["kind"].as_str().map(str::to_string))
                    .collect();
                deps.push(Dep {
                    id: pkg.to_string(),
                    kinds,
                });
            }
            graph.insert(id.to_string(), deps);
        }
        Ok(Graph(graph))
    }

    fn edges<'a>(&'a self, id: &str, edge: Edge) -> impl Iterator<Item = &'a String> {
        self.0
            .get(id)
            .into_iter()
            .flatten()
            .filter(move |dep| {
                dep.kinds.iter().any(|kind| match kind.as_deref() {
                    None => true,
                    Some("build") => edge == Edge::NormalOrBuild,
                    // "dev": tests and benches only, never in the binary.
                    Some(_) => false,
                })
            })
            .map(|dep| &dep.id)
    }

    /// `from` and every package reachable from it through `edge` edges, leaving out the
    /// packages `skip` names (and what is reachable only through them).
    fn reachable(
        &self,
        from: &[&str],
        edge: Edge,
        skip: &dyn Fn(&str) -> bool,
    ) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = from.iter().map(|s| s.to_string()).collect();
        while let Some(id) = todo.pop() {
            if !skip(&id) && seen.insert(id.clone()) {
                todo.extend(self.edges(&id, edge).cloned());
            }
        }
        seen
    }
}

fn purl(name: &str, version: &str) -> String {
    format!("pkg:cargo/{name}@{version}")
}

/// Build-dependencies whose output is embedded in the binary (agent/build.rs).
const EMBEDDED: &[&str] = &["weft-ebpf"];
const INCLUDED: &str = "normal and build dependencies of weft for this target; crates that \
    only run while it is built (build-dependencies, proc-macros and what only they need) have \
    scope excluded and cargo:dependency-kind build, except weft-ebpf and its dependencies, \
    embedded as the eBPF object; dev-dependencies are not included";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_normal_and_build_edges_of_weft_only() {
        let sbom = cyclonedx(
            &fixture(),
            LOCK,
            "weft",
            "1.2.3",
            "x86_64-unknown-linux-gnu",
        )
        .unwrap();
        let names: Vec<&str> = sbom["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        // proptest: weft's dev-dependency; clap: another workspace member's dependency;
        // cc-helper: a dev-dependency of a build-dependency.
        assert_eq!(
            names,
            [
                "aya-ebpf",
                "cc",
                "libc",
                "serde",
                "serde_derive",
                "syn",
                "weft-ebpf"
            ]
        );
        assert_eq!(sbom["specVersion"], "1.5");
        assert_eq!(sbom["metadata"]["component"]["name"], "weft");
        assert_eq!(sbom["metadata"]["component"]["version"], "1.2.3");
        assert_eq!(
            sbom["metadata"]["component"]["purl"],
            "pkg:cargo/weft@1.2.3"
        );
    }

    #[test]
    fn build_only_crates_are_marked_and_the_ebpf_object_is_not() {
        let sbom = cyclonedx(&fixture(), LOCK, "weft", "0.1.0", "x").unwrap();
        let scope = |name: &str| {
            let c = sbom["components"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap();
            (
                c["scope"].as_str().unwrap().to_string(),
                c["properties"][0]["value"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(scope("cc"), ("excluded".into(), "build".into()));
        assert_eq!(scope("serde_derive"), ("excluded".into(), "build".into()));
        assert_eq!(scope("syn"), ("excluded".into(), "build".into()));
        assert_eq!(scope("serde"), ("required".into(), "normal".into()));
        assert_eq!(scope("weft-ebpf"), ("required".into(), "normal".into()));
        assert_eq!(scope("aya-ebpf"), ("required".into(), "normal".into()));
    }

    #[test]
    fn registry_crates_carry_license_purl_and_lock_checksum() {
        let sbom = cyclonedx(&fixture(), LOCK, "weft", "0.1.0", "x").unwrap();
        let serde = sbom["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "serde")
            .unwrap();
        assert_eq!(serde["purl"], "pkg:cargo/serde@1.0.200");
        assert_eq!(serde["licenses"][0]["expression"], "MIT OR Apache-2.0");
        assert_eq!(serde["hashes"][0]["alg"], "SHA-256");
        assert_eq!(serde["hashes"][0]["content"], "aa".repeat(32));
        // A path crate has no checksum.
        let ebpf = sbom["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "weft-ebpf")
            .unwrap();
        assert!(ebpf.get("hashes").is_none());
    }

    #[test]
    fn dependencies_list_each_crates_edges() {
        let sbom = cyclonedx(&fixture(), LOCK, "weft", "0.1.0", "x").unwrap();
        let weft = sbom["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["ref"] == "pkg:cargo/weft@0.1.0")
            .unwrap();
        assert_eq!(
            weft["dependsOn"],
            json!([
                "pkg:cargo/cc@1.1.0",
                "pkg:cargo/serde@1.0.200",
                "pkg:cargo/weft-ebpf@0.1.0"
            ])
        );
    }

    #[test]
    fn lock_checksums_skip_path_packages() {
        let sums = lock_checksums(LOCK);
        assert_eq!(sums.len(), 4);
        assert_eq!(
            sums[&("libc".into(), "0.2.150".into(), REGISTRY.into())],
            "dd".repeat(32)
        );
    }

    const REGISTRY: &str = "registry+https://github.com/rust-lang/crates.io-index";

    fn id(name: &str, version: &str) -> String {
        match name {
            "weft" | "weft-ebpf" | "xtask" => format!("path+file:///w/{name}#{name}@{version}"),
            _ => format!("{REGISTRY}#{name}@{version}"),
        }
    }

    /// weft → serde (normal), cc (build), weft-ebpf (build), proptest (dev);
    /// weft-ebpf → aya-ebpf → libc; cc → cc-helper (dev); xtask → clap;
    /// serde → serde_derive (a proc-macro) → syn.
    fn fixture() -> Value {
        let crates = [
            ("weft", "0.1.0", None),
            ("weft-ebpf", "0.1.0", None),
            ("xtask", "0.1.0", None),
            ("serde", "1.0.200", Some("MIT OR Apache-2.0")),
            ("cc", "1.1.0", Some("MIT OR Apache-2.0")),
            ("proptest", "1.5.0", Some("MIT OR Apache-2.0")),
            ("aya-ebpf", "0.2.1", Some("MIT OR Apache-2.0")),
            ("libc", "0.2.150", Some("MIT OR Apache-2.0")),
            ("cc-helper", "0.1.0", Some("MIT")),
            ("clap", "4.5.0", Some("MIT OR Apache-2.0")),
            ("serde_derive", "1.0.200", Some("MIT OR Apache-2.0")),
            ("syn", "2.0.0", Some("MIT OR Apache-2.0")),
        ];
        let packages: Vec<Value> = crates
            .iter()
            .map(|(name, version, license)| {
                let source = (!matches!(*name, "weft" | "weft-ebpf" | "xtask")).then_some(REGISTRY);
                let kind = if *name == "serde_derive" {
                    "proc-macro"
                } else {
                    "lib"
                };
                json!({ "id": id(name, version), "name": name, "version": version,
                        "license": license, "source": source,
                        "targets": [{ "kind": [kind] }] })
            })
            .collect();
        let dep = |name: &str, version: &str, kind: Option<&str>| {
            json!({ "name": name, "pkg": id(name, version),
                    "dep_kinds": [{ "kind": kind, "target": null }] })
        };
        let node = |name: &str, version: &str, deps: Vec<Value>| json!({ "id": id(name, version), "deps": deps });
        json!({
            "packages": packages,
            "workspace_members": [id("weft", "0.1.0"), id("weft-ebpf", "0.1.0"), id("xtask", "0.1.0")],
            "resolve": { "root": null, "nodes": [
                node("weft", "0.1.0", vec![
                    dep("serde", "1.0.200", None),
                    dep("cc", "1.1.0", Some("build")),
                    dep("weft-ebpf", "0.1.0", Some("build")),
                    dep("proptest", "1.5.0", Some("dev")),
                ]),
                node("weft-ebpf", "0.1.0", vec![dep("aya-ebpf", "0.2.1", None)]),
                node("aya-ebpf", "0.2.1", vec![dep("libc", "0.2.150", None)]),
                node("cc", "1.1.0", vec![dep("cc-helper", "0.1.0", Some("dev"))]),
                node("xtask", "0.1.0", vec![dep("clap", "4.5.0", None)]),
                node("serde", "1.0.200", vec![dep("serde_derive", "1.0.200", None)]),
                node("serde_derive", "1.0.200", vec![dep("syn", "2.0.0", None)]),
                node("syn", "2.0.0", vec![]),
                node("proptest", "1.5.0", vec![]),
                node("libc", "0.2.150", vec![]),
                node("cc-helper", "0.1.0", vec![]),
                node("clap", "4.5.0", vec![]),
            ]},
        })
    }

    const LOCK: &str = r#"# This file is automatically @generated by Cargo.
version = 4

[[package]]
name = "aya-ebpf"
version = "0.2.1"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
dependencies = [
 "libc",
]

[[package]]
name = "cc"
version = "1.1.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"

[[package]]
name = "libc"
version = "0.2.150"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"

[[package]]
name = "serde"
version = "1.0.200"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

[[package]]
name = "weft-ebpf"
version = "0.1.0"
dependencies = [
 "aya-ebpf",
]
"#;
}
