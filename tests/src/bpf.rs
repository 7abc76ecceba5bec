//! The kernel's view of weft's eBPF state, through `bpftool` (JSON output): what is attached
//! to a cgroup, which sk_lookup links exist, what a pinned map holds. Independent of the
//! agent's own account of itself, which is the point.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::sys;

/// One program attached to a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupAttachment {
    pub prog_id: u64,
    /// Normalised: `connect4`, `connect6`, `sock_ops`, … (bpftool versions differ in naming).
    pub attach_type: String,
    pub name: String,
}

/// One sk_lookup link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkLookupLink {
    pub id: u64,
    pub prog_id: u64,
    /// Inode of the network namespace it is attached to (see `sys::netns_inode`).
    pub netns_ino: u64,
}

/// Programs attached directly to `cgroup` (`bpftool cgroup show <cgroup>`).
pub fn cgroup_attachments(cgroup: &Path) -> Result<Vec<CgroupAttachment>> {
    let v = bpftool(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    )?;
    Ok(entries(&v)
        .iter()
        .map(|e| CgroupAttachment {
            prog_id: e["id"].as_u64().unwrap_or_default(),
            attach_type: normalise_attach_type(e["attach_type"].as_str().unwrap_or_default()),
            name: e["name"].as_str().unwrap_or_default().to_string(),
        })
        .collect())
}

/// Every sk_lookup link of the system (`bpftool link list`).
pub fn sk_lookup_links() -> Result<Vec<SkLookupLink>> {
    let v = bpftool(Command::new("bpftool").args(["-j", "link", "list"]))?;
    Ok(entries(&v)
        .iter()
        .filter(|e| {
            normalise_attach_type(e["attach_type"].as_str().unwrap_or_default()) == "sk_lookup"
        })
        .map(|e| SkLookupLink {
            id: e["id"].as_u64().unwrap_or_default(),
            prog_id: e["prog_id"].as_u64().unwrap_or_default(),
            netns_ino: e["netns_ino"].as_u64().unwrap_or_default(),
        })
        .collect())
}

/// sk_lookup links attached to the network namespace at `netns`.
pub fn sk_lookup_links_in(netns: &Path) -> Result<Vec<SkLookupLink>> {
    let ino = sys::netns_inode(netns)?;
    Ok(sk_lookup_links()?
        .into_iter()
        .filter(|l| l.netns_ino == ino)
        .collect())
}

/// `bpftool map dump pinned <pin>` as JSON (entries with `key`/`value`, or `formatted`
/// when the map carries BTF).
pub fn map_dump(pin: &Path) -> Result<Vec<Value>> {
    map_dump_with(Command::new("bpftool"), pin)
}

/// [`map_dump`] by another bpftool: `bpftool` is the command that runs it (e.g. the image's,
/// through `buildah run … -- bpftool`).
pub fn map_dump_with(mut bpftool_cmd: Command, pin: &Path) -> Result<Vec<Value>> {
    let v = bpftool(bpftool_cmd.args(["-j", "map", "dump", "pinned"]).arg(pin))?;
    Ok(entries(&v))
}

/// A 4-byte-key, 4-byte-value hash map the test made and pinned in a directory of its own
/// under bpffs; dropping it removes the directory (and with the last pin, the map).
pub struct TestMap {
    dir: PathBuf,
    pin: PathBuf,
}

impl TestMap {
    /// `bpftool map create <bpffs>/<dir>/<name> type hash key 4 value 4 entries 8`.
    pub fn create(dir: &str, name: &str) -> Result<Self> {
        let dir = sys::bpffs_root()?.join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        // The guard exists before the map, so a failed create still removes the directory.
        let map = TestMap {
            pin: dir.join(name),
            dir,
        };
        sys::run(
            Command::new("bpftool")
                .args(["map", "create"])
                .arg(&map.pin)
                .args(["type", "hash", "key", "4", "value", "4", "entries", "8"])
                .args(["name", name]),
        )?;
        Ok(map)
    }

    /// Sets `key` to `value` (both little-endian u32, as bpftool's byte lists say).
    pub fn update(&self, key: u32, value: u32) -> Result<()> {
        let bytes = |v: u32| v.to_le_bytes().map(|b| b.to_string());
        sys::run(
            Command::new("bpftool")
                .args(["map", "update", "pinned"])
                .arg(&self.pin)
                .arg("key")
                .args(bytes(key))
                .arg("value")
                .args(bytes(value)),
        )?;
        Ok(())
    }

    pub fn pin(&self) -> &Path {
        &self.pin
    }
}

impl Drop for TestMap {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("weft-tests: cleanup: rm -r {}: {e}", self.dir.display());
        }
    }
}

/// The little-endian u32 in a `bpftool -j map dump` byte list (`["0x2a", "0x00", …]`).
pub fn le_u32(bytes: &Value) -> Option<u32> {
    let bytes: Vec<u8> = bytes
        .as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// `bpftool map dump pinned <pin>` as a person reads it.
pub fn map_dump_text(pin: &Path) -> Result<String> {
    sys::run(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(pin),
    )
}

fn bpftool(cmd: &mut Command) -> Result<Value> {
    let out = sys::run(cmd)?;
    if out.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&out).with_context(|| format!("bpftool output is not JSON: {out}"))
}

fn entries(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// Old bpftool says `connect4`, newer ones (libbpf names) `cgroup_inet4_connect`.
fn normalise_attach_type(t: &str) -> String {
    match t {
        "cgroup_inet4_connect" => "connect4",
        "cgroup_inet6_connect" => "connect6",
        "cgroup_sock_ops" => "sock_ops",
        other => other,
    }
    .to_string()
}
