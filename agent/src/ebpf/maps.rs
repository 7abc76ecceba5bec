//! Typed handles on the pinned maps, and the expected layout of each (checked against pins
//! left by a previous agent).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::size_of,
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapType, PerCpuArray, SockHash,
        lpm_trie::Key,
    },
};
use ebpf_common::{
    config::{AddrKey, HostConfig, ListenerKey, PortKey, ProxyConfig, V4_MAPPED_PREFIX},
    host::HostConnKey,
    maps::{
        self, MAX_CONNS, MAX_EXCLUSIONS, MAX_HOST_CONNS, MAX_LISTENERS, MAX_PODS,
        MAX_PROXY_SOCKETS, MAX_REGISTRY,
    },
    netns::{NetnsCookie, PodRecord},
    orig_dst::{ConnKey, OrigDst, SocketCookie},
    registry::{REGISTRY_MODE_REGISTRY_ONLY, RegistryKey, RegistryMode},
    stats::Stats,
};
use ipnet::IpNet;

use super::{
    AF_INET, ConfigDump, Error, MAX_DUMPED_CONNS, MapDump, OrigDstDump, PodDump, addr_bytes,
    addr_from_bytes, orig_dst_addr,
};

/// Typed handles on the maps the agent writes (and the tables it hands the proxy).
pub(crate) struct Maps {
    pods: HashMap<MapData, NetnsCookie, PodRecord>,
    pub(crate) orig_dst: Arc<HashMap<MapData, ConnKey, OrigDst>>,
    inbound_listeners: SockHash<MapData, ListenerKey>,
    proxy_config: Array<MapData, ProxyConfig>,
    excluded_ports: HashMap<MapData, PortKey, u8>,
    excluded_cidrs: LpmTrie<MapData, AddrKey, u8>,
    pub(crate) proxy_sockets: Arc<HashMap<MapData, SocketCookie, u8>>,
    host_config: Array<MapData, HostConfig>,
    pub(crate) host_conns: Arc<HashMap<MapData, HostConnKey, u8>>,
}

/// What a map must look like; `bpf_map_info` of a pinned map is compared with it.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) name: &'static str,
    pub(crate) map_type: MapType,
    pub(crate) key_size: u32,
    pub(crate) value_size: u32,
    pub(crate) max_entries: u32,
}

/// One entry per name of `ebpf_common::maps::ALL`, in the same order.
pub(crate) const LAYOUTS: &[Layout] = &[
    layout::<NetnsCookie, PodRecord>(maps::PODS, MapType::Hash, MAX_PODS),
    layout::<SocketCookie, OrigDst>(maps::ORIG_DST_BY_SOCKET, MapType::LruHash, MAX_CONNS),
    layout::<ConnKey, OrigDst>(maps::ORIG_DST, MapType::LruHash, MAX_CONNS),
    // A sockhash's value is the socket's fd (u32) on update.
    layout::<ListenerKey, u32>(maps::INBOUND_LISTENERS, MapType::SockHash, MAX_LISTENERS),
    layout::<u32, ProxyConfig>(maps::PROXY_CONFIG, MapType::Array, 1),
    layout::<PortKey, u8>(maps::EXCLUDED_PORTS, MapType::Hash, MAX_EXCLUSIONS),
    // The LPM trie key is the prefix length (u32) followed by the data.
    layout::<Key<AddrKey>, u8>(maps::EXCLUDED_CIDRS, MapType::LpmTrie, MAX_EXCLUSIONS),
    layout::<u32, Stats>(maps::STATS, MapType::PerCpuArray, 1),
    layout::<SocketCookie, u8>(maps::PROXY_SOCKETS, MapType::LruHash, MAX_PROXY_SOCKETS),
    layout::<u32, HostConfig>(maps::HOST_CONFIG, MapType::Array, 1),
    layout::<HostConnKey, u8>(maps::HOST_CONNS, MapType::LruHash, MAX_HOST_CONNS),
    layout::<RegistryKey, u8>(maps::REGISTRY, MapType::Hash, MAX_REGISTRY),
    layout::<u32, RegistryMode>(maps::REGISTRY_MODE, MapType::Array, 1),
];

impl Maps {
    /// Takes every map out of the loaded object.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            pods: typed(ebpf, maps::PODS)?,
            orig_dst: Arc::new(typed(ebpf, maps::ORIG_DST)?),
            inbound_listeners: typed(ebpf, maps::INBOUND_LISTENERS)?,
            proxy_config: typed(ebpf, maps::PROXY_CONFIG)?,
            excluded_ports: typed(ebpf, maps::EXCLUDED_PORTS)?,
            excluded_cidrs: typed(ebpf, maps::EXCLUDED_CIDRS)?,
            proxy_sockets: Arc::new(typed(ebpf, maps::PROXY_SOCKETS)?),
            host_config: typed(ebpf, maps::HOST_CONFIG)?,
            host_conns: Arc::new(typed(ebpf, maps::HOST_CONNS)?),
        })
    }

    /// Tells `host_sock_ops` which network namespace is the node's own.
    pub(crate) fn set_host_config(&mut self, node_netns: NetnsCookie) -> Result<(), Error> {
        let config = HostConfig {
            node_netns_cookie: node_netns.0,
        };
        self.host_config
            .set(0, config, 0)
            .map_err(map_error(maps::HOST_CONFIG, "write"))
    }

    /// Writes the proxy config and replaces the exclusion maps' contents. A set larger than a
    /// map is refused before anything is written, so the last good one stays. Within
    /// capacity every update applies: new exclusions go in first while there is room (so
    /// nothing is briefly un-excluded), stale ones come out, then the rest go in. Should the
    /// maps be full, a replaced destination is steered for a moment, never let through.
    pub(crate) fn apply_settings(&mut self, settings: &super::Settings) -> Result<(), Error> {
        let ports: BTreeSet<u16> = settings.excluded_ports.iter().copied().collect();
        let cidrs: BTreeSet<(u32, [u8; 16])> = settings
            .excluded_cidrs
            .iter()
            .map(|net| cidr_key(*net))
            .collect();
        for (setting, count) in [
            ("mesh.excludedPorts", ports.len()),
            ("mesh.excludedCidrs", cidrs.len()),
        ] {
            if count > MAX_EXCLUSIONS as usize {
                return Err(Error::TooManyExclusions {
                    setting,
                    count,
                    max: MAX_EXCLUSIONS,
                });
            }
        }

        let config = ProxyConfig {
            proxy_mark: settings.proxy_mark,
            outbound_port: settings.outbound_port,
            inbound_port: settings.inbound_port,
            hbone_port: settings.hbone_port,
            _pad: [0; 6],
        };
        self.proxy_config
            .set(0, config, 0)
            .map_err(map_error(maps::PROXY_CONFIG, "write"))?;

        let current: BTreeSet<u16> = self
            .excluded_ports
            .keys()
            .map(|key| key.map(|k| k.port))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::EXCLUDED_PORTS, "list"))?;
        replace_set(
            &mut self.excluded_ports,
            &current,
            &ports,
            |map, port| {
                map.insert(port_key(port), 1, 0)
                    .map_err(map_error(maps::EXCLUDED_PORTS, "insert into"))
            },
            |map, port| remove_if_present(map.remove(&port_key(port)), maps::EXCLUDED_PORTS),
        )?;

        let current: BTreeSet<(u32, [u8; 16])> = self
            .excluded_cidrs
            .keys()
            .map(|key| key.map(|k| (k.prefix_len(), k.data().addr)))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::EXCLUDED_CIDRS, "list"))?;
        replace_set(
            &mut self.excluded_cidrs,
            &current,
            &cidrs,
            |map, cidr| {
                map.insert(&lpm_key(cidr), 1, 0)
                    .map_err(map_error(maps::EXCLUDED_CIDRS, "insert into"))
            },
            |map, cidr| remove_if_present(map.remove(&lpm_key(cidr)), maps::EXCLUDED_CIDRS),
        )
    }

    pub(crate) fn insert_pod(
        &mut self,
        cookie: NetnsCookie,
        record: PodRecord,
    ) -> Result<(), Error> {
        self.pods
            .insert(cookie, record, 0)
            .map_err(map_error(maps::PODS, "insert into"))
    }

    pub(crate) fn remove_pod(&mut self, cookie: NetnsCookie) -> Result<(), Error> {
        remove_if_present(self.pods.remove(&cookie), maps::PODS)
    }

    pub(crate) fn set_inbound_listener(
        &mut self,
        ip: IpAddr,
        listener: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        let key = ListenerKey {
            addr: addr_bytes(ip),
        };
        self.inbound_listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_error(maps::INBOUND_LISTENERS, "insert into"))
    }

    pub(crate) fn remove_inbound_listener(&mut self, ip: IpAddr) -> Result<(), Error> {
        let key = ListenerKey {
            addr: addr_bytes(ip),
        };
        remove_if_present(self.inbound_listeners.remove(&key), maps::INBOUND_LISTENERS)
    }
}

/// Read-only handles of its own on the maps `weft status` and `/metrics` show, opened from
/// the pins: a reader never waits for the enroller's lock, and cannot write.
pub(crate) struct MapReader {
    pods: HashMap<MapData, NetnsCookie, PodRecord>,
    orig_dst_by_socket: HashMap<MapData, SocketCookie, OrigDst>,
    orig_dst: HashMap<MapData, ConnKey, OrigDst>,
    inbound_listeners: SockHash<MapData, ListenerKey>,
    proxy_config: Array<MapData, ProxyConfig>,
    excluded_ports: HashMap<MapData, PortKey, u8>,
    excluded_cidrs: LpmTrie<MapData, AddrKey, u8>,
    stats: PerCpuArray<MapData, Stats>,
    registry: HashMap<MapData, RegistryKey, u8>,
    registry_mode: Array<MapData, RegistryMode>,
}

impl MapReader {
    pub(crate) fn open(pin_root: &Path) -> Result<Self, Error> {
        Ok(Self {
            pods: pinned(pin_root, maps::PODS)?,
            orig_dst_by_socket: pinned(pin_root, maps::ORIG_DST_BY_SOCKET)?,
            orig_dst: pinned(pin_root, maps::ORIG_DST)?,
            inbound_listeners: pinned(pin_root, maps::INBOUND_LISTENERS)?,
            proxy_config: pinned(pin_root, maps::PROXY_CONFIG)?,
            excluded_ports: pinned(pin_root, maps::EXCLUDED_PORTS)?,
            excluded_cidrs: pinned(pin_root, maps::EXCLUDED_CIDRS)?,
            stats: pinned(pin_root, maps::STATS)?,
            registry: pinned(pin_root, maps::REGISTRY)?,
            registry_mode: pinned(pin_root, maps::REGISTRY_MODE)?,
        })
    }

    pub(crate) fn pods(&self) -> Result<Vec<(NetnsCookie, PodRecord)>, Error> {
        self.pods
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::PODS, "list"))
    }

    pub(crate) fn stats(&self) -> Result<Stats, Error> {
        let per_cpu = self
            .stats
            .get(&0, 0)
            .map_err(map_error(maps::STATS, "read"))?;
        Ok(per_cpu
            .iter()
            .fold(Stats::default(), |sum, cpu| add(&sum, cpu)))
    }

    /// Everything but the fields the data plane fills in (pin root, programs, links).
    pub(crate) fn dump(&self) -> Result<MapDump, Error> {
        let config = self
            .proxy_config
            .get(&0, 0)
            .map_err(map_error(maps::PROXY_CONFIG, "read"))?;
        let pods = self
            .pods()?
            .into_iter()
            .map(|(cookie, record)| PodDump {
                netns_cookie: cookie.0,
                pod_id: record.pod_id,
                flags: record.flags,
            })
            .collect();
        let inbound_listeners = self
            .inbound_listeners
            .keys()
            .map(|key| key.map(|k| addr_from_bytes(k.addr)))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::INBOUND_LISTENERS, "list"))?;
        let excluded_ports = self
            .excluded_ports
            .keys()
            .map(|key| key.map(|k| k.port))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::EXCLUDED_PORTS, "list"))?;
        let excluded_cidrs = self
            .excluded_cidrs
            .keys()
            .map(|key| key.map(|k| cidr_from_key(k.prefix_len(), k.data().addr)))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::EXCLUDED_CIDRS, "list"))?;
        let orig_dst_pending = self.orig_dst_by_socket.keys().count();
        let mut orig_dst_count = 0;
        let mut orig_dst = Vec::new();
        for entry in self.orig_dst.iter() {
            // An entry taken by the proxy while we iterate ends the walk early; that is fine
            // for a status view.
            let Ok((key, value)) = entry else { break };
            orig_dst_count += 1;
            if orig_dst.len() < MAX_DUMPED_CONNS {
                orig_dst.push(OrigDstDump {
                    netns_cookie: key.netns_cookie,
                    client_port: key.client_port,
                    family: if key.family == AF_INET {
                        "ipv4"
                    } else {
                        "ipv6"
                    },
                    orig_dst: orig_dst_addr(&value),
                });
            }
        }
        let stats = stat_fields(&self.stats()?).into_iter().collect();
        let registry_only = self
            .registry_mode
            .get(&0, 0)
            .map_err(map_error(maps::REGISTRY_MODE, "read"))?
            .mode
            == REGISTRY_MODE_REGISTRY_ONLY;
        let registry_entries = self.registry.keys().count();
        Ok(MapDump {
            pin_root: PathBuf::new(),
            cgroup_root: PathBuf::new(),
            programs: BTreeMap::new(),
            cgroup_attached: BTreeMap::new(),
            config: (config.proxy_mark != 0).then_some(ConfigDump {
                proxy_mark: config.proxy_mark,
                outbound_port: config.outbound_port,
                inbound_port: config.inbound_port,
                hbone_port: config.hbone_port,
            }),
            pods,
            sk_lookup_links: Vec::new(),
            inbound_listeners,
            excluded_ports,
            excluded_cidrs,
            orig_dst_pending,
            orig_dst_count,
            orig_dst,
            stats,
            registry_only,
            registry_entries,
        })
    }
}

/// Every counter with its name (the `Stats` field name, used as the metric label value).
pub fn stat_fields(stats: &Stats) -> [(&'static str, u64); 14] {
    let Stats {
        connect_redirected,
        connect_not_enrolled,
        connect_excluded,
        connect_not_tcp,
        connect_error_refused,
        sockops_handed_over,
        sockops_error_missing,
        sklookup_steered,
        sklookup_passed,
        sklookup_error_dropped,
        connect_proxy_socket,
        host_conn_recorded,
        host_conn_error_unrecorded,
        connect_unregistered_refused,
    } = *stats;
    [
        ("connect_redirected", connect_redirected),
        ("connect_not_enrolled", connect_not_enrolled),
        ("connect_excluded", connect_excluded),
        ("connect_not_tcp", connect_not_tcp),
        ("connect_error_refused", connect_error_refused),
        ("sockops_handed_over", sockops_handed_over),
        ("sockops_error_missing", sockops_error_missing),
        ("sklookup_steered", sklookup_steered),
        ("sklookup_passed", sklookup_passed),
        ("sklookup_error_dropped", sklookup_error_dropped),
        ("connect_proxy_socket", connect_proxy_socket),
        ("host_conn_recorded", host_conn_recorded),
        ("host_conn_error_unrecorded", host_conn_error_unrecorded),
        ("connect_unregistered_refused", connect_unregistered_refused),
    ]
}

fn add(a: &Stats, b: &Stats) -> Stats {
    Stats {
        connect_redirected: a.connect_redirected + b.connect_redirected,
        connect_not_enrolled: a.connect_not_enrolled + b.connect_not_enrolled,
        connect_excluded: a.connect_excluded + b.connect_excluded,
        connect_not_tcp: a.connect_not_tcp + b.connect_not_tcp,
        connect_error_refused: a.connect_error_refused + b.connect_error_refused,
        sockops_handed_over: a.sockops_handed_over + b.sockops_handed_over,
        sockops_error_missing: a.sockops_error_missing + b.sockops_error_missing,
        sklookup_steered: a.sklookup_steered + b.sklookup_steered,
        sklookup_passed: a.sklookup_passed + b.sklookup_passed,
        sklookup_error_dropped: a.sklookup_error_dropped + b.sklookup_error_dropped,
        connect_proxy_socket: a.connect_proxy_socket + b.connect_proxy_socket,
        host_conn_recorded: a.host_conn_recorded + b.host_conn_recorded,
        host_conn_error_unrecorded: a.host_conn_error_unrecorded + b.host_conn_error_unrecorded,
        connect_unregistered_refused: a.connect_unregistered_refused
            + b.connect_unregistered_refused,
    }
}

/// The LPM key of a CIDR: IPv4 as v4-mapped, its prefix length shifted by 96.
pub(crate) fn cidr_key(net: IpNet) -> (u32, [u8; 16]) {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => (
            V4_MAPPED_PREFIX + u32::from(v4.prefix_len()),
            ebpf_common::config::v4_mapped(v4.addr().octets()),
        ),
        IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.addr().octets()),
    }
}

/// The inverse of `cidr_key` (for dumps); an impossible prefix shows as a /128 host.
pub(crate) fn cidr_from_key(prefix_len: u32, addr: [u8; 16]) -> IpNet {
    match addr_from_bytes(addr) {
        IpAddr::V4(ip) if prefix_len >= V4_MAPPED_PREFIX => {
            let len = u8::try_from(prefix_len - V4_MAPPED_PREFIX).unwrap_or(32);
            IpNet::new(IpAddr::V4(ip), len).unwrap_or(IpNet::from(IpAddr::V4(ip)))
        }
        ip => {
            let v6 = std::net::Ipv6Addr::from(addr);
            let len = u8::try_from(prefix_len).unwrap_or(128);
            IpNet::new(IpAddr::V6(v6), len).unwrap_or(IpNet::from(ip))
        }
    }
}

/// Makes a map holding `current` (at most `MAX_EXCLUSIONS` entries) hold `wanted` instead:
/// inserts while there is room, removes what is stale, inserts the rest.
fn replace_set<M, K: Ord + Copy>(
    map: &mut M,
    current: &BTreeSet<K>,
    wanted: &BTreeSet<K>,
    insert: fn(&mut M, K) -> Result<(), Error>,
    remove: fn(&mut M, K) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut room = (MAX_EXCLUSIONS as usize).saturating_sub(current.len());
    let mut later = Vec::new();
    for &key in wanted.difference(current) {
        if room == 0 {
            later.push(key);
        } else {
            insert(map, key)?;
            room -= 1;
        }
    }
    for &key in current.difference(wanted) {
        remove(map, key)?;
    }
    later.into_iter().try_for_each(|key| insert(map, key))
}

fn lpm_key((prefix_len, addr): (u32, [u8; 16])) -> Key<AddrKey> {
    Key::new(prefix_len, AddrKey { addr })
}

fn port_key(port: u16) -> PortKey {
    PortKey { port, _pad: [0; 2] }
}

pub(super) fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::BugMissingMap(name))?;
    T::try_from(map).map_err(map_error(name, "open"))
}

/// A map of this agent's object, opened again from its pin.
fn pinned<T>(pin_root: &Path, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data =
        MapData::from_pin(pin_root.join(name)).map_err(map_error(name, "open the pin of"))?;
    let map = Map::from_map_data(data).map_err(map_error(name, "open the pin of"))?;
    T::try_from(map).map_err(map_error(name, "open"))
}

pub(super) fn map_error(map: &'static str, op: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map {
        map,
        op,
        source: Box::new(source),
    }
}

/// Deleting what is already gone is success (unenroll and reconcile are idempotent).
pub(super) fn remove_if_present(
    result: Result<(), MapError>,
    map: &'static str,
) -> Result<(), Error> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Map {
            map,
            op: "delete from",
            source: Box::new(source),
        }),
    }
}

const fn layout<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> Layout {
    Layout {
        name,
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
    }
}
