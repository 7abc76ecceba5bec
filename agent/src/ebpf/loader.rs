//! Loading: checks the pin root is on bpffs, opens the cgroup root, re-adopts (or creates and
//! pins) every map under the pin root, and loads the programs into the kernel.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use super::{Error, log, programs};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SkLookup, SockOps},
};
use ebpf_common::maps;
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC};

/// The eBPF object built by `agent/build.rs` (empty when built with `AYA_BUILD_SKIP`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"));

/// Checks that the pin root is (or will be) on a bpffs and creates it with its `links/`
/// subdirectories.
pub(crate) fn prepare_pin_root(pin_root: &Path) -> Result<(), Error> {
    // Without bpffs the pins would land on whatever filesystem is there (or fail with an
    // obscure EPERM), and nothing would survive the agent.
    let existing = pin_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(existing).map_err(|source| Error::Statfs {
        path: existing.to_path_buf(),
        source,
    })?;
    if fs.filesystem_type() != BPF_FS_MAGIC {
        return Err(Error::NotBpffs {
            path: pin_root.to_path_buf(),
            mount: if existing == pin_root {
                pin_root.parent().unwrap_or(pin_root).to_path_buf()
            } else {
                existing.to_path_buf()
            },
        });
    }
    for dir in [
        pin_root.to_path_buf(),
        programs::links_dir(pin_root),
        programs::sk_lookup_dir(pin_root),
    ] {
        fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
    }
    Ok(())
}

/// Opens the cgroup v2 directory the cgroup programs attach to.
pub(crate) fn open_cgroup(path: &Path) -> Result<File, Error> {
    let cgroup = File::open(path).map_err(|source| Error::OpenCgroup {
        path: path.to_path_buf(),
        source,
    })?;
    match nix::sys::statfs::fstatfs(&cgroup) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(cgroup),
        Ok(_) => Err(Error::NotCgroup2 {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(Error::Statfs {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the embedded object with every map pinned at `<pin_root>/<MAP>` (re-adopting the
/// maps a previous agent pinned; `upgrade::set_aside` has moved those of another layout out
/// of the way) and loads every program into the kernel.
pub(crate) fn load(pin_root: &Path) -> Result<Ebpf, Error> {
    if OBJECT.is_empty() {
        return Err(Error::BugNoObject);
    }
    let pins: Vec<(&'static str, PathBuf)> = maps::ALL
        .iter()
        .map(|&name| (name, pin_root.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    // The log level is patched into the object: records below it are never written to the
    // ring buffer. It follows the agent's level at start-up (a later reload does not change it).
    let level = log::ebpf_level();
    loader.override_global(aya_log::LEVEL, &level, false);
    let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;

    for &name in maps::ALL {
        if ebpf.map(name).is_none() {
            return Err(Error::BugMissingMap(name));
        }
    }
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Removes every map pin under the pin root (for `Dataplane::uninstall`).
pub(crate) fn remove_map_pins(pin_root: &Path) -> Result<(), Error> {
    for name in maps::ALL {
        let path = pin_root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Unpin { path, source }),
        }
    }
    Ok(())
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), Error> {
    let load_error = |program| {
        move |source| Error::LoadProgram {
            program,
            source: Box::new(source),
        }
    };
    for name in [programs::CONNECT4, programs::CONNECT6] {
        program::<CgroupSockAddr>(ebpf, name)?
            .load()
            .map_err(load_error(name))?;
    }
    for name in [programs::SOCK_OPS, programs::HOST_SOCK_OPS] {
        program::<SockOps>(ebpf, name)?
            .load()
            .map_err(load_error(name))?;
    }
    program::<SkLookup>(ebpf, programs::SK_LOOKUP)?
        .load()
        .map_err(load_error(programs::SK_LOOKUP))?;
    Ok(())
}

/// A program of the object, by name and type.
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::BugMissingProgram(name))
}
