//! The few `bpf(2)` commands aya 0.14 does not expose: effective-program queries
//! (`BPF_PROG_QUERY` + `BPF_F_QUERY_EFFECTIVE`), forced link detach (`BPF_LINK_DETACH`),
//! opening a pinned object as a plain fd (`BPF_OBJ_GET`) and the atomic read-and-delete the
//! proxy's accept path needs (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`), an update through a
//! shared map fd (`BPF_MAP_UPDATE_ELEM`), and reading a map of unknown types as raw bytes
//! (an upgrade's migration). Each is one small
//! `#[repr(C)]` attribute struct, laid out as the matching member of `union bpf_attr`
//! (https://github.com/torvalds/linux/blob/v6.18/include/uapi/linux/bpf.h); the kernel
//! accepts an attribute shorter than its own union as long as it is a prefix.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `enum bpf_attach_type` values weft attaches to cgroups.
pub(crate) const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub(crate) const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub(crate) const BPF_CGROUP_SOCK_OPS: u32 = 3;
#[cfg(test)]
pub(crate) const BPF_SK_LOOKUP: u32 = 36;

#[cfg(test)]
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
#[cfg(test)]
const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_int = 21;
const BPF_LINK_DETACH: libc::c_int = 34;
const BPF_F_QUERY_EFFECTIVE: u32 = 1 << 0;

/// Which programs a query returns.
pub(crate) enum QueryScope {
    /// Attached to the target itself (what `bpftool cgroup show` lists).
    Attached,
    /// Run for sockets of a cgroup: its own plus those inherited from ancestors.
    Effective,
}

/// Ids of the programs attached to (or effective for) a cgroup or a netns (`target`) at
/// `attach_type`.
pub(crate) fn prog_ids(
    target: BorrowedFd<'_>,
    attach_type: u32,
    scope: QueryScope,
) -> io::Result<Vec<u32>> {
    let mut capacity = 64_usize;
    loop {
        let mut ids = vec![0_u32; capacity];
        let mut attr = ProgQueryAttr {
            target_fd: target.as_raw_fd() as u32,
            attach_type,
            query_flags: match scope {
                QueryScope::Attached => 0,
                QueryScope::Effective => BPF_F_QUERY_EFFECTIVE,
            },
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: capacity as u32,
            ..ProgQueryAttr::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_QUERY attribute whose `prog_ids` points at
        // `prog_cnt` writable u32s that outlive the call.
        match unsafe { bpf(BPF_PROG_QUERY, &mut attr) } {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel wrote the real count back.
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => {
                capacity = (attr.prog_cnt as usize).max(capacity * 2);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Opens a pinned bpf object (map, program or link) as a plain fd.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    // SAFETY: `attr.pathname` points at a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// What kind of bpf object an fd is (`bpf-map`, `bpf-prog`, `bpf_link`: the name of its
/// anonymous inode).
pub(crate) fn object_kind(object: BorrowedFd<'_>) -> io::Result<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", object.as_raw_fd()))?;
    let target = target.to_string_lossy();
    Ok(target
        .strip_prefix("anon_inode:")
        .unwrap_or(&target)
        .to_owned())
}

/// Detaches a link from its target now, whoever else holds it open or pinned
/// (https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/syscall.c, `link_detach`).
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is a valid BPF_LINK_DETACH attribute.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Reads and deletes `key` in one step; `Ok(None)` if it is absent. Falls back to lookup +
/// delete on kernels without lookup-and-delete for hash maps (before 5.14).
pub(crate) fn map_take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `key` and `value` point at a key and a value of the map's sizes (the callers'
    // types are the map's key/value types), both outliving the call.
    let result = unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) };
    let result = match result {
        Err(error) if matches!(error.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
            // SAFETY: as above.
            unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }.and_then(|_| {
                // SAFETY: as above; the value pointer is not read by DELETE.
                match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
                    // Another task took it between our lookup and delete: it is theirs.
                    Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Err(error),
                    other => other,
                }
            })
        }
        other => other,
    };
    match result {
        // SAFETY: the kernel filled all `size_of::<V>()` bytes, and `V: Pod` is valid for
        // any bit pattern.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Writes `key` → `value` (`BPF_ANY`) through a shared map fd: aya's typed `insert` needs
/// the map handle exclusively, and the proxy's upstream path shares it across tasks.
pub(crate) fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags: 0,
    };
    // SAFETY: `key` and `value` point at a key and a value of the map's sizes (the callers'
    // types are the map's key/value types), both outliving the call; UPDATE only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Every entry of a map as raw bytes, whatever its key and value types: how an upgrade reads
/// a map pinned by an agent whose layout differs (`key_size` and `value_size` are the pinned
/// map's, from its `bpf_map_info`). Not for per-CPU maps, whose values are per-CPU arrays.
pub(crate) fn map_entries_raw(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut entries = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0_u8; key_size];
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` is null (first key) or `key_size` readable bytes, and `value` (the
        // next key, for GET_NEXT_KEY) points at `key_size` writable bytes; both outlive the call.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(error) => return Err(error),
        }
        let mut value = vec![0_u8; value_size];
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: next.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` points at `key_size` bytes and `value` at `value_size` writable
        // bytes, the map's own sizes; both outlive the call.
        match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
            Ok(_) => entries.push((next.clone(), value)),
            // Deleted between the two calls: it is gone, skip it.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => return Err(error),
        }
        key = Some(next);
    }
}

/// Creates a map with raw sizes (tests: a map as an agent with another layout pinned it).
#[cfg(test)]
pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_CREATE attribute prefix.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Writes one entry as raw bytes of the map's own sizes (tests).
#[cfg(test)]
pub(crate) fn map_update_raw(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the caller passes slices of the map's key and value sizes; both outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Pins a bpf object (tests).
#[cfg(test)]
pub(crate) fn obj_pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: object.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `attr.pathname` points at a NUL-terminated string that outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The kernel-internal "operation not supported" errno some bpf commands leak.
const ENOTSUPP: libc::c_int = 524;

/// `bpf(cmd, attr, sizeof(*attr))`.
///
/// # Safety
/// `attr` must be the attribute layout `cmd` expects, and every pointer in it must be valid
/// for what `cmd` does with it.
unsafe fn bpf<A>(cmd: libc::c_int, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` matches `cmd`; the size passed is its own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `bpf_attr.query` (BPF_PROG_QUERY), up to `prog_cnt`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The `BPF_OBJ_*` member of `bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `BPF_MAP_CREATE` member of `bpf_attr`, up to `map_flags`.
#[cfg(test)]
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `bpf_attr.link_detach`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The `BPF_MAP_*_ELEM` member of `bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}
