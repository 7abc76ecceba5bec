//! Map names, defined once. The eBPF programs name their maps with these, the agent looks
//! them up and pins them (under the pin root) by the same names.

/// `HashMap<NetnsCookie, PodRecord>`: enrolled pods, keyed by their network namespace.
pub const PODS: &str = "PODS";
/// `LruHashMap<SocketCookie, OrigDst>`: destination saved by connect4/6 until sock_ops
/// hands it over.
pub const ORIG_DST_BY_SOCKET: &str = "ORIG_DST_BY_SOCKET";
/// `LruHashMap<ConnKey, OrigDst>`: original destination of each steered connection, read
/// (and deleted) by the proxy when it accepts on the outbound port.
pub const ORIG_DST: &str = "ORIG_DST";
/// `SockHash<ListenerKey>`: the inbound (15006) listener of each enrolled pod IP.
pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
/// `Array<ProxyConfig, 1>`: proxy ports and socket mark.
pub const PROXY_CONFIG: &str = "PROXY_CONFIG";
/// `HashMap<PortKey, u8>`: destination ports never steered.
pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
/// `LpmTrie<AddrKey, u8>`: destination CIDRs never steered (IPv4 as v4-mapped /96+len).
pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
/// `PerCpuArray<Stats, 1>`: one counter per verdict and error arm of every program.
pub const STATS: &str = "STATS";
/// `LruHashMap<SocketCookie, u8>`: the proxy's own sockets, registered by the agent before
/// it connects them; connect4/6 never steers them. (A mark could be set by any pod with
/// CAP_NET_RAW; a registered cookie cannot be forged from a pod.)
pub const PROXY_SOCKETS: &str = "PROXY_SOCKETS";
/// `Array<HostConfig, 1>`: what the host-side program needs (the node's netns cookie).
pub const HOST_CONFIG: &str = "HOST_CONFIG";
/// `LruHashMap<HostConnKey, u8>`: live TCP connections originated by a socket of the node's
/// own network namespace (the kubelet's probes among them), recorded by `host_sock_ops`
/// and taken by the proxy when it accepts them in a pod.
pub const HOST_CONNS: &str = "HOST_CONNS";
/// `HashMap<RegistryKey, u8>`: the destinations the mesh knows (address at one port, or at
/// every port), read by connect4/6 in `REGISTRY_ONLY` mode. Written as a diff by the agent.
pub const REGISTRY: &str = "REGISTRY";
/// `Array<RegistryMode, 1>`: whether connect4/6 refuse destinations absent from `REGISTRY`.
/// A map of its own (not a `PROXY_CONFIG` field), so that upgrading adds a map instead of
/// changing the layout of a pinned one.
pub const REGISTRY_MODE: &str = "REGISTRY_MODE";

/// Every map the agent expects in the object, for the load-time check.
pub const ALL: &[&str] = &[
    PODS,
    ORIG_DST_BY_SOCKET,
    ORIG_DST,
    INBOUND_LISTENERS,
    PROXY_CONFIG,
    EXCLUDED_PORTS,
    EXCLUDED_CIDRS,
    STATS,
    PROXY_SOCKETS,
    HOST_CONFIG,
    HOST_CONNS,
    REGISTRY,
    REGISTRY_MODE,
];

/// Capacity of the pod map: pods on one node.
pub const MAX_PODS: u32 = 4096;
/// Capacity of the in-flight and accepted-connection maps (LRU, so a leak self-heals).
pub const MAX_CONNS: u32 = 65_536;
/// Capacity of the inbound listener map: pod IPs on one node (two families).
pub const MAX_LISTENERS: u32 = 8192;
/// Capacity of each exclusion map.
pub const MAX_EXCLUSIONS: u32 = 256;
/// Capacity of the proxy's own-socket map. An entry is needed only between the agent's
/// registration and its `connect()` right after; LRU, so older ones age out.
pub const MAX_PROXY_SOCKETS: u32 = 16_384;
/// Capacity of the host-originated connection map (live host connections of the node).
pub const MAX_HOST_CONNS: u32 = 65_536;
/// Capacity of the registry map: known destinations (address, or address and port) of the
/// whole mesh. A registry that does not fit makes the agent fall back to refusing nothing
/// in eBPF (the proxy still refuses).
pub const MAX_REGISTRY: u32 = 65_536;
