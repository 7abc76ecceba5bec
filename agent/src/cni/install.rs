//! `weft cni install` / `uninstall`: puts the plugin into the node's CNI setup and takes it
//! out again. Input: the host's CNI bin and conf dirs (host mounts in the installer
//! container). Output: `<bin>/weft-cni` (this binary) and a `weft-cni` entry at the end of
//! the `plugins` of the primary CNI's conflist.
//!
//! The primary config is the file the runtime picks: the first by name among `*.conf`,
//! `*.conflist` and `*.json` (libcni's rule). A single-plugin `.conf` becomes a `.conflist`
//! holding it and weft (the `.conf` is removed, or the runtime would keep picking it).
//! [`ensure`] is idempotent, so the installer re-runs it periodically: when the primary CNI
//! rewrites its file, the entry goes back in. Files are replaced by rename, never edited in
//! place, so the runtime never reads half a config.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use super::PLUGIN_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot read the CNI conf dir {path}: {source} (is the host's /etc/cni/net.d mounted there?)"
    )]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no CNI config in {0} yet: the primary CNI has not written its config (weft chains after it)"
    )]
    NoPrimary(PathBuf),
    #[error("cannot read CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI config {path} is not valid JSON: {source} (left untouched)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("CNI config {path}: {reason} (left untouched)")]
    Shape { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The plugin entry's settings, as the runtime on the host sees the paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plugin {
    /// The agent's socket on the host.
    pub socket: PathBuf,
    /// The mesh-namespaces file on the host (default: next to the socket).
    pub mesh_namespaces_file: Option<PathBuf>,
}

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The entry was in place already.
    Unchanged(PathBuf),
    /// The entry was added (or updated, or moved to the end) in this conflist.
    Inserted(PathBuf),
    /// A single-plugin `.conf` became this `.conflist`, with the entry at its end.
    Converted { from: PathBuf, to: PathBuf },
}

/// Copies `binary` to `<bin_dir>/weft-cni` (by rename: a runtime exec'ing the old one is
/// unaffected).
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, Error> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    let write_err = |source| Error::Write {
        path: target.clone(),
        source,
    };
    fs::create_dir_all(bin_dir).map_err(write_err)?;
    fs::copy(binary, &tmp).map_err(write_err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(write_err)?;
    fs::rename(&tmp, &target).map_err(write_err)?;
    Ok(target)
}

/// Makes the primary CNI config end with the weft entry.
pub fn ensure(conf_dir: &Path, plugin: &Plugin) -> Result<Change, Error> {
    let primary = primary(conf_dir)?.ok_or_else(|| Error::NoPrimary(conf_dir.to_owned()))?;
    let mut doc = read(&primary)?;
    let obj = doc.as_object_mut().ok_or_else(|| Error::Shape {
        path: primary.clone(),
        reason: "not a JSON object".into(),
    })?;
    if obj.contains_key("plugins") {
        let plugins = plugins_of(obj, &primary)?;
        let entry = entry(plugin);
        let in_place =
            plugins.last() == Some(&entry) && plugins.iter().filter(|p| is_weft(p)).count() == 1;
        if in_place {
            return Ok(Change::Unchanged(primary));
        }
        plugins.retain(|p| !is_weft(p));
        plugins.push(entry);
        write(&primary, &doc)?;
        return Ok(Change::Inserted(primary));
    }
    // A single plugin's `.conf`: wrap it.
    if obj.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE) {
        return Err(Error::Shape {
            path: primary,
            reason: "the primary config is weft-cni itself: weft only chains after a primary CNI"
                .into(),
        });
    }
    let mut single = obj.clone();
    let version = single
        .remove("cniVersion")
        .unwrap_or(Value::String("0.3.1".into()));
    let name = single.remove("name").ok_or_else(|| Error::Shape {
        path: primary.clone(),
        reason: "no `name`".into(),
    })?;
    let list = serde_json::json!({
        "cniVersion": version,
        "name": name,
        "plugins": [Value::Object(single), entry(plugin)],
    });
    let to = primary.with_extension("conflist");
    write(&to, &list)?;
    if to != primary {
        fs::remove_file(&primary).map_err(|source| Error::Write {
            path: primary.clone(),
            source,
        })?;
    }
    Ok(Change::Converted { from: primary, to })
}

/// Removes the weft entry from every config in `conf_dir` and `<bin_dir>/weft-cni`.
/// Returns the configs it changed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    for path in conf_files(conf_dir)? {
        let mut doc = read(&path)?;
        let Some(obj) = doc.as_object_mut() else {
            continue;
        };
        if !obj.contains_key("plugins") {
            continue;
        }
        let plugins = plugins_of(obj, &path)?;
        let before = plugins.len();
        plugins.retain(|p| !is_weft(p));
        if plugins.len() != before {
            write(&path, &doc)?;
            changed.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Write {
                path: binary,
                source,
            });
        }
    }
    Ok(changed)
}

/// The config file the runtime uses: the first by name with a CNI config extension.
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(conf_files(conf_dir)?.into_iter().next())
}

fn conf_files(conf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = fs::read_dir(conf_dir).map_err(|source| Error::ReadDir {
        path: conf_dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["conf", "conflist", "json"].contains(&e))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn plugins_of<'a>(
    obj: &'a mut Map<String, Value>,
    path: &Path,
) -> Result<&'a mut Vec<Value>, Error> {
    obj.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Error::Shape {
            path: path.to_owned(),
            reason: "`plugins` is not a list".into(),
        })
}

fn is_weft(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn entry(plugin: &Plugin) -> Value {
    let mut entry = serde_json::json!({
        "type": PLUGIN_TYPE,
        "socket": plugin.socket,
    });
    if let Some(file) = &plugin.mesh_namespaces_file {
        entry["meshNamespacesFile"] = serde_json::json!(file);
    }
    entry
}

fn read(path: &Path) -> Result<Value, Error> {
    let text = fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Replaces `path` by rename; the temporary name has no CNI extension, so a runtime
/// listing the dir meanwhile never picks it.
fn write(path: &Path, doc: &Value) -> Result<(), Error> {
    let write_err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("conf");
    let tmp = path.with_file_name(format!(".{name}.weft-tmp"));
    let mut text = serde_json::to_vec_pretty(doc).map_err(|e| write_err(io::Error::other(e)))?;
    text.push(b'\n');
    fs::write(&tmp, text).map_err(write_err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests;
