//! Attachments, all as pinned bpf links: `<pin_root>/links/{connect4,connect6,sock_ops}` on
//! the cgroup root, `<pin_root>/links/host_sock_ops` on the host's cgroup, and `<pin_root>/links/sk_lookup/<netns cookie>` per enrolled netns.
//!
//! Replacing a link left by a previous agent is crash-safe and leaves no duplicate: the new
//! link is attached (multi-attach, so both briefly run; the programs are idempotent), pinned
//! at `<path>-staging`, renamed over `<path>` (atomic on bpffs), and the old one is then detached
//! with `BPF_LINK_DETACH`, which works whoever still holds it. An agent that dies at any step
//! leaves at least one attachment (fail closed); a leftover staging pin is detached at the next
//! replacement.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use ebpf_common::netns::NetnsCookie;
use tracing::{debug, warn};

use super::{
    Config, Error, loader,
    programs::{CONNECT4, CONNECT6, HOST_SOCK_OPS, SK_LOOKUP, SOCK_OPS, links_dir, sk_lookup_dir},
    query::{self, QueryScope},
};

/// Kernel ids of this agent's programs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProgramIds {
    pub(crate) connect4: u32,
    pub(crate) connect6: u32,
    pub(crate) sock_ops: u32,
    pub(crate) sk_lookup: u32,
    pub(crate) host_sock_ops: u32,
}

impl ProgramIds {
    pub(crate) fn by_name(&self) -> [(&'static str, u32); 5] {
        [
            (CONNECT4, self.connect4),
            (CONNECT6, self.connect6),
            (SOCK_OPS, self.sock_ops),
            (SK_LOOKUP, self.sk_lookup),
            (HOST_SOCK_OPS, self.host_sock_ops),
        ]
    }

    /// The cgroup programs with their attach types.
    pub(crate) fn cgroup(&self) -> [(&'static str, u32, u32); 3] {
        [
            (CONNECT4, self.connect4, query::BPF_CGROUP_INET4_CONNECT),
            (CONNECT6, self.connect6, query::BPF_CGROUP_INET6_CONNECT),
            (SOCK_OPS, self.sock_ops, query::BPF_CGROUP_SOCK_OPS),
        ]
    }
}

/// Attaches connect4, connect6 and sock_ops to the cgroup root, and host_sock_ops to the
/// host's cgroup, as bpf links, which always multi-attach (a CNI's programs there keep
/// running), each replacing the link a previous agent pinned.
pub(crate) fn attach_cgroup_programs(
    ebpf: &mut Ebpf,
    cgroup: &File,
    host_cgroup: &File,
    config: &Config,
) -> Result<ProgramIds, Error> {
    let target = config.cgroup_root.display().to_string();
    let attach_error = |program| {
        let target = target.clone();
        move |source| Error::Attach {
            program,
            target,
            source: Box::new(source),
        }
    };
    let dir = links_dir(&config.pin_root);

    let mut ids = [0_u32; 2];
    for (name, id) in [CONNECT4, CONNECT6].into_iter().zip(&mut ids) {
        let program = loader::program::<CgroupSockAddr>(ebpf, name)?;
        *id = program_id(name, program.info())?;
        let link_id = program
            .attach(cgroup, LINK_ATTACH_MODE)
            .map_err(attach_error(name))?;
        let link = program.take_link(link_id).map_err(attach_error(name))?;
        let link = FdLink::try_from(link).map_err(|_| Error::NoBpfLink { program: name })?;
        replace_pinned(name, link, &dir.join(name))?;
    }

    let sock_ops = attach_sock_ops(ebpf, SOCK_OPS, cgroup, &config.cgroup_root, &dir)?;
    let host_sock_ops =
        attach_sock_ops(ebpf, HOST_SOCK_OPS, host_cgroup, &config.host_cgroup, &dir)?;

    let sk_lookup = program_id(
        SK_LOOKUP,
        loader::program::<SkLookup>(ebpf, SK_LOOKUP)?.info(),
    )?;
    Ok(ProgramIds {
        connect4: ids[0],
        connect6: ids[1],
        sock_ops,
        sk_lookup,
        host_sock_ops,
    })
}

/// Attaches the sock_ops program `name` to `cgroup` as a pinned link (replacing a previous
/// agent's); returns the program's id.
fn attach_sock_ops(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    path: &Path,
    dir: &Path,
) -> Result<u32, Error> {
    let attach_error = |source| Error::Attach {
        program: name,
        target: path.display().to_string(),
        source: Box::new(source),
    };
    let program = loader::program::<SockOps>(ebpf, name)?;
    let id = program_id(name, program.info())?;
    let link_id = program
        .attach(cgroup, LINK_ATTACH_MODE)
        .map_err(attach_error)?;
    let link = program.take_link(link_id).map_err(attach_error)?;
    let link = FdLink::try_from(link).map_err(|_| Error::NoBpfLink { program: name })?;
    replace_pinned(name, link, &dir.join(name))?;
    Ok(id)
}

/// Attaches sk_lookup to a pod's netns, replacing the link pinned for that netns cookie.
pub(crate) fn attach_sk_lookup(
    ebpf: &mut Ebpf,
    pin_root: &Path,
    cookie: NetnsCookie,
    netns: BorrowedFd<'_>,
) -> Result<(), Error> {
    let attach_error = |source| Error::Attach {
        program: SK_LOOKUP,
        target: format!("netns {}", cookie.0),
        source: Box::new(source),
    };
    let program = loader::program::<SkLookup>(ebpf, SK_LOOKUP)?;
    let link_id = program.attach(netns).map_err(attach_error)?;
    let link: FdLink = program.take_link(link_id).map_err(attach_error)?.into();
    replace_pinned(SK_LOOKUP, link, &sk_lookup_pin(pin_root, cookie))
}

/// Detaches and unpins a netns's sk_lookup link; a no-op if there is none.
pub(crate) fn detach_sk_lookup(pin_root: &Path, cookie: NetnsCookie) -> Result<(), Error> {
    detach_pinned(&sk_lookup_pin(pin_root, cookie)).map(drop)
}

/// Netns cookies with a pinned sk_lookup link.
pub(crate) fn pinned_sk_lookup(pin_root: &Path) -> Result<Vec<NetnsCookie>, Error> {
    let dir = sk_lookup_dir(pin_root);
    let list_error = |source| Error::ListPins {
        path: dir.clone(),
        source,
    };
    let mut cookies = Vec::new();
    for entry in fs::read_dir(&dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        // `<cookie>-staging` pins are half-done replacements, not enrollments.
        if let Some(cookie) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            cookies.push(NetnsCookie(cookie));
        }
    }
    cookies.sort_unstable();
    Ok(cookies)
}

/// Checks that each cgroup program of this agent is in the cgroup's effective set.
pub(crate) fn verify_attached(
    cgroup: BorrowedFd<'_>,
    cgroup_path: &Path,
    ids: &ProgramIds,
) -> Result<(), Error> {
    for (program, id, attach_type) in ids.cgroup() {
        let effective =
            query::prog_ids(cgroup, attach_type, QueryScope::Effective).map_err(|source| {
                Error::QueryCgroup {
                    cgroup: cgroup_path.to_path_buf(),
                    source,
                }
            })?;
        if !effective.contains(&id) {
            return Err(Error::NotAttached {
                program,
                id,
                cgroup: cgroup_path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Checks that host_sock_ops is in the host cgroup's effective set.
pub(crate) fn verify_host_attached(
    cgroup: BorrowedFd<'_>,
    cgroup_path: &Path,
    ids: &ProgramIds,
) -> Result<(), Error> {
    let effective = query::prog_ids(cgroup, query::BPF_CGROUP_SOCK_OPS, QueryScope::Effective)
        .map_err(|source| Error::QueryCgroup {
            cgroup: cgroup_path.to_path_buf(),
            source,
        })?;
    if !effective.contains(&ids.host_sock_ops) {
        return Err(Error::NotAttached {
            program: HOST_SOCK_OPS,
            id: ids.host_sock_ops,
            cgroup: cgroup_path.to_path_buf(),
        });
    }
    Ok(())
}

/// Programs attached to the cgroup itself (ours and anyone else's), by attach type name.
pub(crate) fn cgroup_attached(
    cgroup: BorrowedFd<'_>,
    cgroup_path: &Path,
) -> Result<Vec<(&'static str, Vec<u32>)>, Error> {
    [
        ("connect4", query::BPF_CGROUP_INET4_CONNECT),
        ("connect6", query::BPF_CGROUP_INET6_CONNECT),
        ("sock_ops", query::BPF_CGROUP_SOCK_OPS),
    ]
    .into_iter()
    .map(|(name, attach_type)| {
        query::prog_ids(cgroup, attach_type, QueryScope::Attached)
            .map(|ids| (name, ids))
            .map_err(|source| Error::QueryCgroup {
                cgroup: cgroup_path.to_path_buf(),
                source,
            })
    })
    .collect()
}

/// Detaches and unpins every link under the pin root.
pub(crate) fn remove_all(pin_root: &Path) -> Result<(), Error> {
    let dir = sk_lookup_dir(pin_root);
    for dir in [sk_lookup_dir(pin_root), links_dir(pin_root)] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::ListPins { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| Error::ListPins {
                path: dir.clone(),
                source,
            })?;
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                detach_pinned(&entry.path())?;
            }
        }
    }
    for dir in [dir, links_dir(pin_root)] {
        if let Err(source) = fs::remove_dir(&dir)
            && source.kind() != io::ErrorKind::NotFound
        {
            return Err(Error::Unpin { path: dir, source });
        }
    }
    Ok(())
}

/// Pins `link` at `path`, replacing (and detaching) whatever link was pinned there.
fn replace_pinned(program: &'static str, link: FdLink, path: &Path) -> Result<(), Error> {
    let pin_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::PinLink {
            program,
            path,
            source,
        }
    };
    let staging = staging_path(path);
    // A crash between pinning and renaming left this: it is attached, and would be a duplicate.
    detach_pinned(&staging)?;
    // Open the old link before the rename takes its name away.
    let old = match query::obj_get(path) {
        Ok(fd) => Some(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(pin_error(path)(source)),
    };
    let pinned = link
        .pin(&staging)
        .map_err(|e| pin_error(&staging)(io::Error::other(e)))?;
    // Our fd goes; the pin now holds the link.
    drop(pinned);
    if let Err(source) = fs::rename(&staging, path) {
        // Leave no half-done replacement behind: the old link still runs.
        let _detached = detach_pinned(&staging);
        return Err(pin_error(path)(source));
    }
    if let Some(old) = old {
        match query::link_detach(old.as_fd()) {
            Ok(()) => debug!(component = "ebpf", program, path = %path.display(),
                "replaced the link of a previous agent"),
            // ENOLINK: already detached (its cgroup or netns is gone).
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(error) => warn!(component = "ebpf", program, path = %path.display(), %error,
                "cannot detach the previous agent's link; it stays attached until it is closed"),
        }
    }
    Ok(())
}

/// Detaches the link pinned at `path` and removes the pin. `Ok(false)` if there was none.
fn detach_pinned(path: &Path) -> Result<bool, Error> {
    let unpin_error = |source| Error::Unpin {
        path: path.to_path_buf(),
        source,
    };
    let fd = match query::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(unpin_error(source)),
    };
    match query::link_detach(fd.as_fd()) {
        // ENOLINK: already detached, e.g. its netns is gone.
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(source) => return Err(unpin_error(source)),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(unpin_error(source)),
    }
}

/// aya passes the mode as `link_create.flags`. A cgroup *link* always attaches with multi-attach
/// semantics (it coexists with a CNI's programs) and the kernel rejects `BPF_F_ALLOW_MULTI`
/// there with EINVAL (`cgroup_bpf_link_attach`,
/// https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/cgroup.c), so "Single" (flags 0)
/// is what multi-attach through a link is spelled as.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn sk_lookup_pin(pin_root: &Path, cookie: NetnsCookie) -> PathBuf {
    sk_lookup_dir(pin_root).join(cookie.0.to_string())
}

fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    // Not ".new": bpffs refuses names with a dot (EPERM, reserved; `bpf_lookup`,
    // https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/inode.c).
    name.push("-staging");
    path.with_file_name(name)
}

fn program_id(
    program: &'static str,
    info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
) -> Result<u32, Error> {
    info.map(|info| info.id())
        .map_err(|source| Error::ProgramInfo {
            program,
            source: Box::new(source),
        })
}
