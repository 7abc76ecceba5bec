//! The layer check of `cargo xtask lint`: reads every module of the agent crate with `syn`,
//! collects the modules each one names (`use` trees and paths in code, through `crate::`,
//! `super::`, `self::` or a child module's name) and fails when
//! - a top-level module names a module of its own layer or of a layer above it (DESIGN:
//!   "a module imports only from layers below it"), or
//! - files name each other in a circle. A child naming one of its ancestors (`super::Error`)
//!   is how a module and its files share their types and is not an edge.
//!
//! Test code (`tests.rs`, `tests/`, `#[cfg(test)]` items, `test_util`) may reach anywhere:
//! it is not part of the structure. Re-exports are not followed: a path is charged to the
//! deepest module it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::Path,
};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// The agent's top-level modules, lowest layer first. A module may name modules of the
/// layers before its own, never its own layer's other modules nor a later layer's.
/// docs/architecture.md explains each layer; keep the two together.
const LAYERS: &[&[&str]] = &[
    &["sync"],
    &["telemetry", "http", "readiness", "settings", "web_roots"],
    &["identity", "ebpf", "drain", "jwt", "dns"],
    &["state", "netns"],
    &["policy", "hbone", "handover"],
    &["proxy", "cni", "waypoint", "ca"],
    &["report"],
    &["enroll", "source"],
    &["admin", "status", "uninstall"],
    &["config"],
    &["app"],
    &["cli"],
];

/// Modules that are test scaffolding, outside the structure.
const TEST_ONLY: &[&str] = &["test_util"];

pub fn run(crate_src: &Path) -> Result<()> {
    let graph = Graph::read(crate_src)?;
    let problems = graph.problems();
    if problems.is_empty() {
        println!(
            "layers: ok ({} modules, {} edges, no upward imports, no circles)",
            graph.modules.len(),
            graph.edges.values().map(BTreeMap::len).sum::<usize>()
        );
        return Ok(());
    }
    for problem in &problems {
        eprintln!("layers: {problem}");
    }
    bail!("the layer check found {} problem(s)", problems.len())
}

/// A module path inside the crate, `["proxy", "outbound"]` for `proxy/outbound.rs`.
type ModPath = Vec<String>;

struct Graph {
    modules: BTreeSet<ModPath>,
    /// Modules declared `#[cfg(test)] mod name;`, with everything below them.
    test_only: BTreeSet<ModPath>,
    /// Module → the modules it names, each with the first path that named it.
    edges: BTreeMap<ModPath, BTreeMap<ModPath, String>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Upward {
        from: String,
        to: String,
        via: String,
    },
    Unlayered {
        module: String,
    },
    Circle {
        files: Vec<String>,
        members: Vec<String>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Upward { from, to, via } => write!(
                f,
                "`{from}` names `{to}` ({via}), which is not in a lower layer; move the shared \
                 piece down or invert the dependency"
            ),
            Problem::Unlayered { module } => write!(
                f,
                "top-level module `{module}` has no layer; add it to LAYERS in xtask/src/layers.rs"
            ),
            Problem::Circle { files, members } => {
                write!(f, "import circle: {} → {}", files.join(" → "), files[0])?;
                if members.len() > files.len() {
                    write!(f, " (one of the circles among {})", members.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

impl Graph {
    fn read(crate_src: &Path) -> Result<Graph> {
        let mut files = Vec::new();
        collect_files(crate_src, crate_src, &mut files)?;
        let mut parsed = Vec::new();
        for (module, path) in files {
            let source = fs::read_to_string(&path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            let file = syn::parse_file(&source)
                .with_context(|| format!("failed to parse {}", path.display()))?;
            parsed.push((module, file));
        }
        let mut graph = Graph {
            modules: parsed.iter().map(|(module, _)| module.clone()).collect(),
            test_only: BTreeSet::new(),
            edges: BTreeMap::new(),
        };
        for (module, file) in &parsed {
            graph.note_test_only_children(module, file);
        }
        for (module, file) in &parsed {
            graph.add_file(module, file);
        }
        Ok(graph)
    }

    fn note_test_only_children(&mut self, module: &ModPath, file: &syn::File) {
        for item in &file.items {
            if let syn::Item::Mod(declared) = item
                && is_cfg_test(&declared.attrs)
            {
                let mut child = module.clone();
                child.push(declared.ident.to_string());
                self.test_only.insert(child);
            }
        }
    }

    /// Records what one file names, ignoring its test items.
    fn add_file(&mut self, module: &ModPath, file: &syn::File) {
        if self.is_test_module(module) {
            return;
        }
        let mut names = Names::default();
        for item in &file.items {
            if !is_cfg_test(item_attrs(item)) {
                names.visit_item(item);
            }
        }
        for path in names.paths {
            let Some(target) = self.resolve(module, &path) else {
                continue;
            };
            if target.is_empty() || target == *module || module.starts_with(&target) {
                continue;
            }
            self.edges
                .entry(module.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| path.join("::"));
        }
    }

    /// The deepest module of this crate that `path`, written in `module`, names; `None` for
    /// paths into other crates and local names.
    fn resolve(&self, module: &ModPath, path: &[String]) -> Option<ModPath> {
        let (mut base, rest) = match path.first().map(String::as_str)? {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (module.clone(), &path[1..]),
            "super" => {
                let mut base = module.clone();
                let mut rest = path;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                (base, rest)
            }
            first => {
                // A child module named without `self::`.
                let mut child = module.clone();
                child.push(first.to_owned());
                if !self.modules.contains(&child) {
                    return None;
                }
                (module.clone(), path)
            }
        };
        for segment in rest {
            base.push(segment.clone());
            if !self.modules.contains(&base) {
                base.pop();
                break;
            }
        }
        Some(base)
    }

    fn is_test_module(&self, module: &[String]) -> bool {
        module
            .first()
            .is_some_and(|top| TEST_ONLY.contains(&top.as_str()))
            || module.iter().any(|segment| segment == "tests")
            || (1..=module.len()).any(|n| self.test_only.contains(&module[..n]))
    }

    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let tops: BTreeSet<&str> = self
            .modules
            .iter()
            .filter(|m| m.len() == 1 && !self.is_test_module(m))
            .map(|m| m[0].as_str())
            .collect();
        for top in &tops {
            if layer(top).is_none() {
                problems.push(Problem::Unlayered {
                    module: (*top).to_owned(),
                });
            }
        }
        for (from, targets) in &self.edges {
            for (to, via) in targets {
                if from[0] == to[0] || self.is_test_module(to) {
                    continue;
                }
                let (Some(from_layer), Some(to_layer)) = (layer(&from[0]), layer(&to[0])) else {
                    continue;
                };
                if to_layer >= from_layer {
                    problems.push(Problem::Upward {
                        from: from.join("::"),
                        to: to.join("::"),
                        via: via.clone(),
                    });
                }
            }
        }
        for (circle, members) in self.circles() {
            let names = |modules: Vec<ModPath>| modules.iter().map(|m| m.join("::")).collect();
            problems.push(Problem::Circle {
                files: names(circle),
                members: names(members),
            });
        }
        problems
    }

    /// Each set of modules that reach each other (a strongly connected component, Tarjan),
    /// as one real circle through its smallest member (the shortest, found breadth-first)
    /// and all its members.
    fn circles(&self) -> Vec<(Vec<ModPath>, Vec<ModPath>)> {
        let nodes: Vec<&ModPath> = self.modules.iter().collect();
        let index_of: BTreeMap<&ModPath, usize> =
            nodes.iter().enumerate().map(|(i, m)| (*m, i)).collect();
        let successors: Vec<Vec<usize>> = nodes
            .iter()
            .map(|m| {
                self.edges
                    .get(*m)
                    .map(|t| t.keys().filter_map(|t| index_of.get(t).copied()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let mut circles: Vec<_> = strongly_connected(&successors)
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|component| {
                let members: BTreeSet<usize> = component.into_iter().collect();
                let circle = shortest_circle(&successors, &members);
                let name = |i: usize| nodes[i].clone();
                (
                    circle.into_iter().map(name).collect(),
                    members.into_iter().map(name).collect(),
                )
            })
            .collect();
        circles.sort();
        circles
    }
}

/// The shortest circle through the smallest member of a strongly connected component.
fn shortest_circle(successors: &[Vec<usize>], members: &BTreeSet<usize>) -> Vec<usize> {
    let start = *members.first().expect("a component has members");
    let mut came_from: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &next in &successors[node] {
            if next == start {
                // Walk back from `node` to `start`, then read the walk forwards.
                let mut circle = vec![node];
                let mut at = node;
                while at != start {
                    at = came_from[&at];
                    circle.push(at);
                }
                circle.reverse();
                return circle;
            }
            if members.contains(&next) && !came_from.contains_key(&next) {
                came_from.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    unreachable!("every member of a strongly connected component lies on a circle")
}

fn layer(top: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// Every `.rs` file below `dir` with its module path (`lib.rs` is the crate root; `main.rs`
/// is a separate binary crate and not read).
fn collect_files(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(ModPath, std::path::PathBuf)>,
) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, files)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(root).expect("walked below the root");
        let mut module: ModPath = relative
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match module.last().map(String::as_str) {
            Some("main") if module.len() == 1 => continue,
            Some("lib") if module.len() == 1 => module.clear(),
            Some("mod") => {
                module.pop();
            }
            _ => {}
        }
        files.push((module, path));
    }
    Ok(())
}

/// The paths a file names: every `use` tree expanded, every path in code and macro calls.
#[derive(Default)]
struct Names {
    paths: Vec<Vec<String>>,
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if is_cfg_test(item_attrs(item)) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        expand_use(&item.tree, &mut Vec::new(), &mut self.paths);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.paths
            .push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, path);
    }
}

fn expand_use(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            expand_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push(with(prefix, &n.ident)),
        syn::UseTree::Rename(r) => out.push(with(prefix, &r.ident)),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for tree in &g.items {
                expand_use(tree, prefix, out);
            }
        }
    }
}

fn with(prefix: &[String], ident: &syn::Ident) -> Vec<String> {
    let mut path = prefix.to_vec();
    // `use crate::proxy::{self, Error}`: `self` names the prefix itself.
    if ident != "self" {
        path.push(ident.to_string());
    }
    path
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// `#[cfg(test)]`, also inside `any(…)`: the item exists only for tests.
fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg") && {
            let tokens = attr
                .meta
                .require_list()
                .map(|l| l.tokens.to_string())
                .unwrap_or_default();
            tokens == "test" || (tokens.starts_with("any") && tokens.contains("test"))
        }
    })
}

/// Tarjan's strongly connected components over `successors` (iterative, no recursion).
fn strongly_connected(successors: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = successors.len();
    let (mut index, mut low, mut on_stack) = (vec![UNSEEN; n], vec![0; n], vec![false; n]);
    let (mut stack, mut components, mut next_index) = (Vec::new(), Vec::new(), 0);
    for start in 0..n {
        if index[start] != UNSEEN {
            continue;
        }
        // (node, position in its successor list)
        let mut work = vec![(start, 0)];
        while let Some(&mut (node, ref mut position)) = work.last_mut() {
            if *position == 0 && index[node] == UNSEEN {
                index[node] = next_index;
                low[node] = next_index;
                next_index += 1;
                stack.push(node);
                on_stack[node] = true;
            }
            if let Some(&next) = successors[node].get(*position) {
                *position += 1;
                if index[next] == UNSEEN {
                    work.push((next, 0));
                } else if on_stack[next] {
                    low[node] = low[node].min(index[next]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[node]);
            }
            if low[node] == index[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                components.push(component);
            }
        }
    }
    components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let module = |name: &str| -> ModPath {
            if name.is_empty() {
                Vec::new()
            } else {
                name.split("::").map(str::to_owned).collect()
            }
        };
        let mut graph = Graph {
            modules: files.iter().map(|(name, _)| module(name)).collect(),
            test_only: BTreeSet::new(),
            edges: BTreeMap::new(),
        };
        let parsed: Vec<_> = files
            .iter()
            .map(|(name, source)| {
                (
                    module(name),
                    syn::parse_file(source).expect("test source parses"),
                )
            })
            .collect();
        for (module, file) in &parsed {
            graph.note_test_only_children(module, file);
        }
        for (module, file) in &parsed {
            graph.add_file(module, file);
        }
        graph
    }

    #[test]
    fn an_import_from_a_higher_layer_is_reported() {
        let g = graph(&[
            ("", "mod proxy; mod state;"),
            ("state", "use crate::proxy::Proxy;"),
            ("proxy", "pub struct Proxy;"),
        ]);
        assert_eq!(
            g.problems(),
            vec![Problem::Upward {
                from: "state".into(),
                to: "proxy".into(),
                via: "crate::proxy::Proxy".into()
            }]
        );
    }

    #[test]
    fn siblings_of_one_layer_may_not_name_each_other() {
        let g = graph(&[
            ("", ""),
            ("waypoint", ""),
            ("proxy", ""),
            ("proxy::copy", ""),
            ("waypoint::server", "fn f() { crate::proxy::copy::run(); }"),
        ]);
        assert_eq!(
            g.problems(),
            vec![Problem::Upward {
                from: "waypoint::server".into(),
                to: "proxy::copy".into(),
                via: "crate::proxy::copy::run".into()
            }]
        );
    }

    #[test]
    fn downward_imports_and_a_child_naming_its_parent_pass() {
        let g = graph(&[
            ("", ""),
            ("state", ""),
            (
                "proxy",
                "mod outbound; use crate::state::Snapshot; fn f() { outbound::run() }",
            ),
            (
                "proxy::outbound",
                "use super::Error; use super::super::state;",
            ),
        ]);
        assert_eq!(g.problems(), vec![]);
        assert_eq!(g.edges.values().map(BTreeMap::len).sum::<usize>(), 3);
    }

    #[test]
    fn a_circle_between_sibling_files_is_reported_in_edge_order() {
        let g = graph(&[
            ("", ""),
            ("waypoint", ""),
            ("waypoint::server", "use super::request::forward;"),
            ("waypoint::request", "use super::observe::Observe;"),
            ("waypoint::observe", "use crate::waypoint::server::Inner;"),
        ]);
        assert_eq!(
            g.problems(),
            vec![Problem::Circle {
                files: vec![
                    "waypoint::observe".into(),
                    "waypoint::server".into(),
                    "waypoint::request".into()
                ],
                members: vec![
                    "waypoint::observe".into(),
                    "waypoint::request".into(),
                    "waypoint::server".into()
                ]
            }]
        );
    }

    #[test]
    fn test_items_and_test_files_are_not_structure() {
        let g = graph(&[
            ("", ""),
            ("app", ""),
            (
                "state",
                "#[cfg(test)] mod tests { use crate::app; } #[cfg(test)] use crate::app::X;",
            ),
            ("state::tests", "use crate::app::Y;"),
            ("policy", "#[cfg(test)]\nmod fixtures;"),
            ("policy::fixtures", "use crate::app::Z;"),
        ]);
        assert_eq!(g.problems(), vec![]);
    }

    #[test]
    fn a_top_level_module_without_a_layer_is_reported() {
        let g = graph(&[("", ""), ("gateway", "")]);
        assert_eq!(
            g.problems(),
            vec![Problem::Unlayered {
                module: "gateway".into()
            }]
        );
    }
}
