//! The eBPF data plane: loads the embedded object, pins maps and links under the pin root,
//! attaches the cgroup programs (connect4/6, sock_ops) to the pods' cgroup root and the
//! sk_lookup program to each enrolled pod's netns, and gives typed access to the maps.
//! Inputs: `ebpf::Config`, `ebpf::Settings` and the enroll/unenroll calls. Outputs: kernel
//! state, map reads (`OrigDstTable` for the proxy, `stats`/`dump` for metrics and status).
//!
//! Everything is pinned (`<pin_root>/<MAP>`, `<pin_root>/links/<program>`,
//! `<pin_root>/links/sk_lookup/<netns cookie>`), so the programs outlive the agent (pods fail
//! closed while it is down) and a restarted agent re-adopts the maps and replaces each link
//! with its own, leaving exactly one attachment of each program.

mod links;
mod loader;
mod log;
mod maps;
mod programs;
mod query;
mod registry;
#[cfg(test)]
mod tests;
mod upgrade;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd, BorrowedFd},
    path::PathBuf,
    sync::Arc,
};

use aya::{Ebpf, maps::MapError, programs::ProgramError};
use ebpf_common::{
    host::HostConnKey,
    netns::{NetnsCookie, PodRecord},
    orig_dst::{ConnKey, OrigDst},
    stats::Stats,
};

pub use self::maps::stat_fields;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not on a bpf filesystem: is bpffs mounted at {mount}? \
         (`mount -t bpf bpf {mount}`; in Kubernetes mount the host's /sys/fs/bpf)"
    )]
    NotBpffs { path: PathBuf, mount: PathBuf },
    #[error("cannot check which filesystem holds {path}: {source}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create pin directory {path} (is the agent root?): {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "BUG: this agent was built with AYA_BUILD_SKIP and embeds no eBPF object; \
         rebuild it without AYA_BUILD_SKIP"
    )]
    BugNoObject,
    #[error(
        "cannot load the eBPF object (the agent needs CAP_BPF, CAP_NET_ADMIN and \
         CAP_SYS_ADMIN, and a kernel with BTF, 5.17 or later): {}",
        chain(.0)
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BUG: map {0} is missing from the eBPF object")]
    BugMissingMap(&'static str),
    #[error("BUG: program {0} is missing from the eBPF object or has the wrong type")]
    BugMissingProgram(&'static str),
    #[error("the kernel rejected program {program} (the verifier log follows): {}", chain(.source))]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "cannot open cgroup {path}: is it a cgroup v2 directory? (hybrid hosts mount \
         cgroup v2 at /sys/fs/cgroup/unified): {source}"
    )]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (hybrid hosts mount cgroup v2 at \
         /sys/fs/cgroup/unified; set ebpf.cgroupRoot)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cannot attach {program} to {target}: {}", chain(.source))]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "{program} was attached without a bpf link (kernel older than 5.7?), which cannot be \
         pinned: weft needs a 5.17 or later kernel"
    )]
    NoBpfLink { program: &'static str },
    #[error("cannot pin the {program} link at {path}: {source}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot detach and unpin the link pinned at {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the kernel's info on program {program}: {}", chain(.source))]
    ProgramInfo {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot query the programs attached to cgroup {cgroup}: {source}")]
    QueryCgroup {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{program} (program id {id}) is not in the effective set of cgroup {cgroup}: \
         something detached it (another agent, a CNI using BPF_F_ALLOW_OVERRIDE, or \
         someone with bpftool); the agent re-attaches at its next start"
    )]
    NotAttached {
        program: &'static str,
        id: u32,
        cgroup: PathBuf,
    },
    #[error("cannot {op} map {map}: {}", chain(.source))]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("cannot {op} map {map}: {source}")]
    MapSyscall {
        map: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{setting} lists {count} entries, but the eBPF map holds at most {max}: the update \
         is refused and the previous exclusions stay in force"
    )]
    TooManyExclusions {
        setting: &'static str,
        count: usize,
        max: u32,
    },
    #[error(
        "cannot read the layout of the map pinned at {path}: {detail}; it is left in place (it \
         may be what every enrolled pod is steered by) and the agent does not start: check \
         what is pinned there (`bpftool map show pinned {path}`)"
    )]
    InspectPin { path: PathBuf, detail: String },
    #[error("cannot move the pinned map {path} aside to migrate it: {source}")]
    SetAside {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot migrate map {map} to this agent's layout: {detail}; the agent does not start \
         and the previous agent's programs stay attached"
    )]
    Migrate { map: &'static str, detail: String },
    #[error(
        "the mesh registers {count} destinations, but the eBPF registry map holds at most \
         {max}"
    )]
    RegistryTooLarge { count: usize, max: u32 },
    #[error(
        "cannot write the eBPF registry ({}): connect4/6 now refuse nothing, and the proxy \
         alone refuses unregistered destinations (REGISTRY_ONLY) until a write succeeds",
        chain(.0)
    )]
    RegistryIncomplete(Box<Error>),
    #[error(
        "cannot write the eBPF registry ({}), nor turn eBPF refusal off ({}): connect4/6 \
         may refuse (EPERM) registered destinations until a write succeeds",
        chain(.error),
        chain(.fallback)
    )]
    RegistryStuck {
        error: Box<Error>,
        fallback: Box<Error>,
    },
    #[error("cannot list pinned links in {path}: {source}")]
    ListPins {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Stable, snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NotBpffs { .. } => "not_bpffs",
            Error::Statfs { .. } => "statfs",
            Error::PinDir { .. } => "pin_dir",
            Error::BugNoObject => "bug_no_object",
            Error::Load(_) => "load",
            Error::BugMissingMap(_) => "bug_missing_map",
            Error::BugMissingProgram(_) => "bug_missing_program",
            Error::LoadProgram { .. } => "load_program",
            Error::OpenCgroup { .. } => "open_cgroup",
            Error::NotCgroup2 { .. } => "not_cgroup2",
            Error::Attach { .. } => "attach",
            Error::NoBpfLink { .. } => "no_bpf_link",
            Error::PinLink { .. } => "pin_link",
            Error::Unpin { .. } => "unpin",
            Error::ProgramInfo { .. } => "program_info",
            Error::QueryCgroup { .. } => "query_cgroup",
            Error::NotAttached { .. } => "not_attached",
            Error::Map { .. } | Error::MapSyscall { .. } => "map",
            Error::TooManyExclusions { .. } => "too_many_exclusions",
            Error::ListPins { .. } => "list_pins",
            Error::InspectPin { .. } => "inspect_pin",
            Error::SetAside { .. } => "set_aside",
            Error::Migrate { .. } => "migrate",
            Error::RegistryTooLarge { .. } => "registry_too_large",
            Error::RegistryIncomplete(_) => "registry_incomplete",
            Error::RegistryStuck { .. } => "registry_stuck",
        }
    }
}

/// Start-up settings of the data plane (not reloadable).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// bpffs directory holding every pinned map and link (default `/sys/fs/bpf/weft`).
    pub pin_root: PathBuf,
    /// cgroup v2 directory whose subtree holds the pods; connect4/6 and sock_ops attach here.
    pub cgroup_root: PathBuf,
    /// cgroup v2 directory holding the kubelet (default: the host's cgroup2 root);
    /// host_sock_ops attaches here to recognise the node's own connections (probes).
    pub host_cgroup: PathBuf,
}

/// Reloadable data-plane settings written into the config/exclusion maps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    pub proxy_mark: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    pub excluded_ports: Vec<u16>,
    pub excluded_cidrs: Vec<ipnet::IpNet>,
}

/// Detaches and unpins every link and unpins every map under `pin_root`, without loading
/// anything (`weft uninstall`, once no agent runs). Idempotent.
pub fn remove_pinned(pin_root: &std::path::Path) -> Result<(), Error> {
    links::remove_all(pin_root)?;
    loader::remove_map_pins(pin_root)
}

/// Loaded, pinned and attached programs plus typed map handles.
pub struct Dataplane {
    config: Config,
    /// Owns the loaded programs (sk_lookup is attached from it at each enrollment).
    ebpf: Ebpf,
    maps: maps::Maps,
    registry: registry::Registry,
    /// Kernel ids of this agent's programs, for `verify_attached`.
    program_ids: links::ProgramIds,
    cgroup: File,
    view: Arc<DataplaneView>,
    host_cgroup: File,
    /// Aborts the aya-log reader task when the data plane is dropped.
    _log: Option<log::Bridge>,
}

/// What admin reads of the data plane: counters and a dump of the maps, links and programs.
/// Its own handles (map pins opened again, a duplicate of the cgroup fd), so a scrape or a
/// `/status` never takes the enroller's lock and cannot change anything.
pub struct DataplaneView {
    maps: maps::MapReader,
    pin_root: PathBuf,
    cgroup_root: PathBuf,
    cgroup: File,
    programs: BTreeMap<&'static str, u32>,
}

/// Concurrent handle on the `ORIG_DST` map for the proxy's accept path. Cheap to clone; each
/// `take` is one `bpf(2)` call and needs no lock.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<aya::maps::HashMap<aya::maps::MapData, ConnKey, OrigDst>>,
}

/// Handle on `HOST_CONNS` for the proxy's inbound path: was a plaintext connection made by a
/// socket of the node itself (a kubelet probe), or does it only carry a node address (a
/// masqueraded client)? Cheap to clone; each `take` is one `bpf(2)` call.
#[derive(Clone)]
pub struct HostConnTable {
    map: Arc<aya::maps::HashMap<aya::maps::MapData, HostConnKey, u8>>,
}

/// Handle on `PROXY_SOCKETS`: the proxy registers each of its upstream sockets before it
/// connects it, so connect4/6 leaves it alone. Cheap to clone.
#[derive(Clone)]
pub struct ProxySocketTable {
    map: Arc<aya::maps::HashMap<aya::maps::MapData, ebpf_common::orig_dst::SocketCookie, u8>>,
}

/// Everything `weft status` shows of the maps.
#[derive(Debug, serde::Serialize)]
pub struct MapDump {
    pub pin_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Kernel program ids of this agent's programs, by program name.
    pub programs: BTreeMap<&'static str, u32>,
    /// Program ids attached to the cgroup root itself, by hook (ours once each, plus any
    /// other agent's or CNI's).
    pub cgroup_attached: BTreeMap<&'static str, Vec<u32>>,
    pub config: Option<ConfigDump>,
    pub pods: Vec<PodDump>,
    /// Netns cookies with a pinned sk_lookup link (should equal the pods' cookies).
    pub sk_lookup_links: Vec<u64>,
    /// Pod IPs with a registered inbound listener.
    pub inbound_listeners: Vec<IpAddr>,
    pub excluded_ports: Vec<u16>,
    pub excluded_cidrs: Vec<ipnet::IpNet>,
    /// Connects rewritten but not yet established (`ORIG_DST_BY_SOCKET` entries).
    pub orig_dst_pending: usize,
    /// Established connections not yet taken by the proxy (`ORIG_DST` entries).
    pub orig_dst_count: usize,
    /// The first `MAX_DUMPED_CONNS` of those.
    pub orig_dst: Vec<OrigDstDump>,
    /// Counters summed over CPUs, by `Stats` field name.
    pub stats: BTreeMap<&'static str, u64>,
    /// Whether connect4/6 refuse destinations absent from the registry (`REGISTRY_ONLY`).
    pub registry_only: bool,
    /// Entries of the registry map.
    pub registry_entries: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct ConfigDump {
    pub proxy_mark: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
}

#[derive(Debug, serde::Serialize)]
pub struct PodDump {
    pub netns_cookie: u64,
    pub pod_id: u32,
    pub flags: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct OrigDstDump {
    pub netns_cookie: u64,
    pub client_port: u16,
    pub family: &'static str,
    pub orig_dst: SocketAddr,
}

impl Dataplane {
    /// Loads the embedded object, creates or re-adopts pinned maps, attaches the cgroup
    /// programs with multi-attach (replacing links pinned by a previous agent, so there is
    /// never a duplicate), and starts the aya-log bridge. Call inside a tokio runtime (without
    /// one, eBPF logs are not forwarded).
    pub fn load(config: &Config, settings: &Settings) -> Result<Self, Error> {
        loader::prepare_pin_root(&config.pin_root)?;
        let cgroup = loader::open_cgroup(&config.cgroup_root)?;
        let host_cgroup = loader::open_cgroup(&config.host_cgroup)?;
        let node_netns = own_netns_cookie().map_err(|source| Error::MapSyscall {
            map: ebpf_common::maps::HOST_CONFIG,
            op: "read the node's netns cookie for",
            source,
        })?;
        let previous = upgrade::set_aside(&config.pin_root)?;
        let mut ebpf = loader::load(&config.pin_root)?;
        let log = log::Bridge::start(&mut ebpf);
        let mut maps = maps::Maps::take(&mut ebpf)?;
        // Left as pinned: a restarted agent's pods stay refused as before until the first
        // snapshot rewrites it; a new map (an upgrade) refuses nothing.
        let registry = registry::Registry::take(&mut ebpf)?;
        // Settings and migrated pods before attaching: a program must never run with an
        // empty config, nor with an empty pod map where the old programs had a full one.
        maps.apply_settings(settings)?;
        maps.set_host_config(node_netns)?;
        upgrade::migrate(&previous, &mut maps)?;
        let program_ids = links::attach_cgroup_programs(&mut ebpf, &cgroup, &host_cgroup, config)?;
        upgrade::finish(previous);
        let view = Arc::new(DataplaneView {
            maps: maps::MapReader::open(&config.pin_root)?,
            pin_root: config.pin_root.clone(),
            cgroup_root: config.cgroup_root.clone(),
            cgroup: cgroup.try_clone().map_err(|source| Error::OpenCgroup {
                path: config.cgroup_root.clone(),
                source,
            })?,
            programs: program_ids.by_name().into_iter().collect(),
        });
        Ok(Self {
            config: config.clone(),
            ebpf,
            maps,
            registry,
            program_ids,
            cgroup,
            host_cgroup,
            view,
            _log: log,
        })
    }

    /// Rewrites the config and exclusion maps (the exclusion maps' contents are replaced).
    pub fn apply_settings(&mut self, settings: &Settings) -> Result<(), Error> {
        self.maps.apply_settings(settings)
    }

    /// Writes the outbound registry (`registry.rs`): with `registry_only`, connect4/6
    /// refuse (EPERM) TCP connects of enrolled pods to destinations absent from `registry`,
    /// each an address at one port or (`None`) at every port; without, they refuse
    /// nothing. Only what changed since the last write is written. On error, eBPF refuses
    /// nothing (`Error::RegistryIncomplete`) unless the error says otherwise.
    pub fn apply_registry(
        &mut self,
        registry_only: bool,
        registry: impl IntoIterator<Item = (IpAddr, Option<u16>)>,
    ) -> Result<(), Error> {
        self.registry.apply(registry_only, registry)
    }

    /// Checks that connect4, connect6 and sock_ops are in the cgroup's effective set, and
    /// host_sock_ops in the host cgroup's.
    pub fn verify_attached(&self) -> Result<(), Error> {
        links::verify_attached(
            self.cgroup.as_fd(),
            &self.config.cgroup_root,
            &self.program_ids,
        )?;
        links::verify_host_attached(
            self.host_cgroup.as_fd(),
            &self.config.host_cgroup,
            &self.program_ids,
        )
    }

    /// Puts the pod in the pod map and attaches sk_lookup to its netns (pinned link,
    /// replacing one left by a previous agent).
    pub fn enroll(
        &mut self,
        cookie: NetnsCookie,
        record: PodRecord,
        netns: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        self.maps.insert_pod(cookie, record)?;
        links::attach_sk_lookup(&mut self.ebpf, &self.config.pin_root, cookie, netns)
    }

    /// Removes the pod from the pod map and detaches (and unpins) its sk_lookup link. Works
    /// for pods enrolled by a previous agent too, and is a no-op for unknown cookies.
    pub fn unenroll(&mut self, cookie: NetnsCookie) -> Result<(), Error> {
        self.maps.remove_pod(cookie)?;
        links::detach_sk_lookup(&self.config.pin_root, cookie)
    }

    /// Registers the pod's inbound listener for one of its IPs (replacing any previous one).
    pub fn set_inbound_listener(
        &mut self,
        ip: IpAddr,
        listener: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        self.maps.set_inbound_listener(ip, listener)
    }

    /// Unregisters the inbound listener of a pod IP; a no-op if there is none.
    pub fn remove_inbound_listener(&mut self, ip: IpAddr) -> Result<(), Error> {
        self.maps.remove_inbound_listener(ip)
    }

    /// Pods in the pod map (after a restart: what the previous agent enrolled).
    pub fn enrolled(&self) -> Result<Vec<(NetnsCookie, PodRecord)>, Error> {
        self.view.maps.pods()
    }

    /// Netns cookies that have a pinned sk_lookup link, whether or not they are in the pod
    /// map. After a restart, those that are neither enrolled nor wanted are stale: pass them
    /// to `unenroll`.
    pub fn pinned_netns(&self) -> Result<Vec<NetnsCookie>, Error> {
        links::pinned_sk_lookup(&self.config.pin_root)
    }

    pub fn orig_dst_table(&self) -> OrigDstTable {
        OrigDstTable {
            map: Arc::clone(&self.maps.orig_dst),
        }
    }

    pub fn host_conn_table(&self) -> HostConnTable {
        HostConnTable {
            map: Arc::clone(&self.maps.host_conns),
        }
    }

    pub fn proxy_socket_table(&self) -> ProxySocketTable {
        ProxySocketTable {
            map: Arc::clone(&self.maps.proxy_sockets),
        }
    }

    /// The read-only view admin serves from.
    pub fn view(&self) -> Arc<DataplaneView> {
        Arc::clone(&self.view)
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        self.view.stats()
    }

    pub fn dump(&self) -> Result<MapDump, Error> {
        self.view.dump()
    }

    /// Detaches every program and removes every pin (maps included): the node leaves the
    /// mesh. For `weft` uninstall paths and tests; a normal shutdown keeps everything.
    pub fn uninstall(self) -> Result<(), Error> {
        links::remove_all(&self.config.pin_root)?;
        loader::remove_map_pins(&self.config.pin_root)
    }
}

impl DataplaneView {
    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        self.maps.stats()
    }

    pub fn dump(&self) -> Result<MapDump, Error> {
        let mut dump = self.maps.dump()?;
        dump.pin_root.clone_from(&self.pin_root);
        dump.cgroup_root.clone_from(&self.cgroup_root);
        dump.programs = self.programs.clone();
        dump.cgroup_attached = links::cgroup_attached(self.cgroup.as_fd(), &self.cgroup_root)?
            .into_iter()
            .collect();
        dump.sk_lookup_links = links::pinned_sk_lookup(&self.pin_root)?
            .into_iter()
            .map(|c| c.0)
            .collect();
        Ok(dump)
    }
}

impl OrigDstTable {
    /// Reads and deletes the original destination of an accepted outbound connection.
    pub fn take(&self, key: ConnKey) -> Result<Option<SocketAddr>, Error> {
        Ok(self.take_record(key)?.as_ref().map(orig_dst_addr))
    }

    /// The record as the eBPF program wrote it.
    fn take_record(&self, key: ConnKey) -> Result<Option<OrigDst>, Error> {
        use aya::maps::IterableMap as _;

        query::map_take(self.map.map().fd().as_fd(), &key).map_err(|source| Error::MapSyscall {
            map: ebpf_common::maps::ORIG_DST,
            op: "take from",
            source,
        })
    }
}

impl HostConnTable {
    /// Whether the connection from `peer` to `local` (as a pod's listener accepted it) was
    /// originated by a socket of the node's own netns; forgets it either way.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<bool, Error> {
        use aya::maps::IterableMap as _;

        let key = HostConnKey {
            local_addr: addr_bytes(peer.ip().to_canonical()),
            remote_addr: addr_bytes(local.ip().to_canonical()),
            local_port: peer.port(),
            remote_port: local.port(),
            _pad: [0; 4],
        };
        query::map_take::<HostConnKey, u8>(self.map.map().fd().as_fd(), &key)
            .map(|found| found.is_some())
            .map_err(|source| Error::MapSyscall {
                map: ebpf_common::maps::HOST_CONNS,
                op: "take from",
                source,
            })
    }
}

impl ProxySocketTable {
    /// Registers a socket of the proxy before it is connected: connect4/6 then never steers
    /// it, whatever its mark.
    pub fn register(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        use aya::maps::IterableMap as _;

        let cookie = socket_cookie(socket)?;
        let value: u8 = 1;
        query::map_update(self.map.map().fd().as_fd(), &cookie, &value)
    }
}

/// The cookie of the network namespace the calling thread is in (`SO_NETNS_COOKIE`, Linux
/// 5.14), as `bpf_get_netns_cookie` reports it to the programs.
pub fn own_netns_cookie() -> io::Result<NetnsCookie> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    netns_cookie_of(&socket)
}

/// The netns cookie of the namespace `socket` was created in.
pub fn netns_cookie_of(socket: &impl AsRawFd) -> io::Result<NetnsCookie> {
    getsockopt_u64(socket.as_raw_fd(), SO_NETNS_COOKIE).map(NetnsCookie)
}

/// The socket's cookie (`SO_COOKIE`), as `bpf_get_socket_cookie` reports it.
fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<ebpf_common::orig_dst::SocketCookie> {
    getsockopt_u64(socket.as_raw_fd(), libc::SO_COOKIE).map(ebpf_common::orig_dst::SocketCookie)
}

fn getsockopt_u64(fd: std::os::fd::RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed; the fd is open
    // for the duration of the call (borrowed from a live socket).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The `ORIG_DST` key of a connection the proxy accepted on its outbound listener in the pod
/// whose netns cookie is `netns`, from the connection's peer (client) address. The family is
/// the connection's as the listener sees it: a v4-mapped peer (dual-stack listener) counts
/// as IPv4, like the `sock_ops` program records it.
pub fn conn_key(netns: NetnsCookie, peer: SocketAddr) -> ConnKey {
    let family = match peer.ip().to_canonical() {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    ConnKey {
        netns_cookie: netns.0,
        client_port: peer.port(),
        family,
        _pad: [0; 4],
    }
}

/// The address the application connected to (a v4-mapped address as plain IPv4).
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(addr_from_bytes(orig.addr), orig.port)
}

/// An error and its sources, `: `-separated (aya's errors keep the errno in a source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        text.push_str(": ");
        text.push_str(&error.to_string());
        source = error.source();
    }
    text
}

/// The 16-byte form of an address the maps use (IPv4 v4-mapped).
pub(crate) fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(ip) => ebpf_common::config::v4_mapped(ip.octets()),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// The inverse of `addr_bytes`.
pub(crate) fn addr_from_bytes(addr: [u8; 16]) -> IpAddr {
    match Ipv6Addr::from(addr).to_ipv4_mapped() {
        Some(ip) => IpAddr::V4(ip),
        None => IpAddr::V6(Ipv6Addr::from(addr)),
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not yet in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
/// `dump` lists at most this many `ORIG_DST` entries (it counts them all).
const MAX_DUMPED_CONNS: usize = 256;
