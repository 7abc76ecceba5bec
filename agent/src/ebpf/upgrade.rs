//! Upgrades of the pinned maps. aya re-adopts a pinned map without comparing it with the
//! object's definition, so a map pinned by an agent whose layout differs (an upgrade that
//! changed a key, a value or a capacity) would be misread. Such a map is never deleted
//! first: its pin is moved aside to `<MAP>-previous`, the new map is created and pinned
//! beside it, the entries steering depends on are migrated into it before any program of
//! this agent is attached, and the old pin goes only once the new programs run (their links
//! replace the old ones atomically, `links.rs`). Until then the previous agent's programs
//! keep running on the old map, so an enrolled pod's connect is steered at every moment.
//!
//! Fail closed: a pin whose layout cannot be read, or whose entries cannot be migrated,
//! stops the agent before it attaches anything; the previous attachments keep running. A
//! crash at any step leaves `<MAP>-previous`, which the next start migrates again.
//!
//! Only `PODS` carries entries across: an empty pod map would leave every enrolled pod
//! unsteered until the source is heard from (indefinitely with the API server down). The
//! config and exclusion maps start empty safely (they are written before the programs are
//! attached), and so do the stats (counters) and the registry maps (an empty
//! `REGISTRY_MODE` refuses nothing in eBPF; the proxy refuses until the reconcile loop
//! writes them). The maps the accept path reads never get here in a release: their layouts
//! are frozen (`tests.rs`), since both agents of a hand-over read them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use ebpf_common::{
    maps,
    netns::{NetnsCookie, POD_FLAG_REDIRECT_OUTBOUND, PodRecord},
};
use tracing::{info, warn};

use super::{
    Error,
    maps::{LAYOUTS, Layout, Maps},
    query,
};

/// A pin of an older layout, moved aside until the new programs run.
pub(crate) struct Previous {
    layout: &'static Layout,
    path: PathBuf,
}

/// Moves every pinned map whose layout differs from this agent's to `<MAP>-previous`, so
/// the loader creates the new map at `<MAP>`; returns every `-previous` pin (including
/// those a start that died half-way left).
pub(crate) fn set_aside(pin_root: &Path) -> Result<Vec<Previous>, Error> {
    let mut previous = Vec::new();
    for layout in LAYOUTS {
        let path = pin_root.join(layout.name);
        let aside = previous_path(&path);
        if path.exists() && !compatible(layout, &path)? {
            if aside.exists() {
                return Err(Error::Migrate {
                    map: layout.name,
                    detail: format!(
                        "{} and {} are both pinned with layouts other than this agent's (an \
                         upgrade over an unfinished one); the running programs use one of \
                         them, so neither is removed: finish or roll back the previous upgrade",
                        path.display(),
                        aside.display()
                    ),
                });
            }
            warn!(component = "ebpf", map = layout.name, path = %path.display(),
                "pinned map has another layout; migrating it to a new map beside it");
            fs::rename(&path, &aside).map_err(|source| Error::SetAside {
                path: path.clone(),
                source,
            })?;
        }
        if aside.exists() {
            previous.push(Previous {
                layout,
                path: aside,
            });
        }
    }
    Ok(previous)
}

/// Copies what steering needs from the maps set aside into the new ones. Call before
/// attaching: the new programs must never see an empty pod map in place of a full one.
pub(crate) fn migrate(previous: &[Previous], maps: &mut Maps) -> Result<(), Error> {
    for old in previous {
        if old.layout.name != maps::PODS {
            continue;
        }
        let pods = read_pods(&old.path).map_err(|detail| Error::Migrate {
            map: maps::PODS,
            detail,
        })?;
        let count = pods.len();
        for (cookie, record) in pods {
            maps.insert_pod(cookie, record)?;
        }
        info!(
            component = "ebpf",
            map = maps::PODS,
            pods = count,
            "migrated the enrolled pods into the new pod map"
        );
    }
    Ok(())
}

/// Removes the pins set aside, once this agent's programs run on the new maps.
pub(crate) fn finish(previous: Vec<Previous>) {
    for old in previous {
        match fs::remove_file(&old.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Harmless: the map is no longer used, only kept alive by its pin.
            Err(error) => warn!(component = "ebpf", path = %old.path.display(), %error,
                "cannot remove the pin of a migrated map; remove it by hand"),
        }
    }
}

/// Whether the map pinned at `path` has `layout`. A pin that cannot be read is an error,
/// never a reason to delete it: it may be the map every enrolled pod is steered by.
fn compatible(layout: &Layout, path: &Path) -> Result<bool, Error> {
    let inspect_error = |detail: String| Error::InspectPin {
        path: path.to_path_buf(),
        detail,
    };
    // The kernel answers an info query on a program or a link with that object's info,
    // which would read as a map of nonsense sizes.
    let fd = query::obj_get(path).map_err(|e| inspect_error(e.to_string()))?;
    match query::object_kind(std::os::fd::AsFd::as_fd(&fd)) {
        Ok(kind) if kind == "bpf-map" => {}
        Ok(kind) => return Err(inspect_error(format!("it is a {kind}, not a map"))),
        Err(e) => return Err(inspect_error(e.to_string())),
    }
    let info = MapInfo::from_pin(path).map_err(|e| inspect_error(super::chain(&e)))?;
    Ok((
        info.map_type().ok(),
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    ) == (
        Some(layout.map_type),
        layout.key_size,
        layout.value_size,
        layout.max_entries,
    ))
}

/// The enrolled pods of a pod map of another layout. Its key must still be the 8-byte netns
/// cookie; the record's first field is still the pod id when the old record has one. Every
/// pod in the map is enrolled, and every enrolled pod is steered, so the flags are this
/// agent's; the reconcile loop rewrites each record when it next enrolls the pod.
fn read_pods(path: &Path) -> Result<Vec<(NetnsCookie, PodRecord)>, String> {
    let info =
        MapInfo::from_pin(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key_size = info.key_size() as usize;
    if key_size != size_of::<NetnsCookie>() {
        return Err(format!(
            "{} has {key_size}-byte keys, not netns cookies: its pods cannot be carried over",
            path.display()
        ));
    }
    let fd = query::obj_get(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let entries = query::map_entries_raw(
        std::os::fd::AsFd::as_fd(&fd),
        key_size,
        info.value_size() as usize,
    )
    .map_err(|e| format!("cannot read the entries of {}: {e}", path.display()))?;
    Ok(entries
        .into_iter()
        .filter_map(|(key, value)| {
            let cookie = u64::from_ne_bytes(key.try_into().ok()?);
            let pod_id = value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_ne_bytes);
            Some((
                NetnsCookie(cookie),
                PodRecord {
                    pod_id,
                    flags: POD_FLAG_REDIRECT_OUTBOUND,
                },
            ))
        })
        .collect())
}

fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    // No dot: bpffs reserves names with one (see links::staging_path).
    name.push("-previous");
    path.with_file_name(name)
}
