//! The mesh as the node proxy sees it: one immutable `Snapshot` of workloads, services,
//! access policies and mesh-wide data-path settings, replaced whole on every accepted
//! change. Sources produce snapshots; enrollment, the eBPF maps, the proxy and policy
//! evaluation read them through a `StateHandle`.

pub mod authn;
pub mod external;
pub mod gateway;
pub mod policy;
pub mod route;
pub mod service;
pub mod traffic;
pub mod waypoint;
pub mod workload;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::watch;

pub use external::{ExternalPort, ExternalService, OutboundMode, Resolution, TlsOrigination};
pub use gateway::{Gateway, GatewayParent, Listener, TlsCertificate};
pub use policy::{
    AccessPolicy, Action, IpBlock, L7Match, PortRange, Principal, Rule, ServiceAccount, Source,
    WorkloadSelector,
};
pub use route::{HttpRoute, RouteKind};
pub use service::{Service, ServicePort, TrafficDistribution};
pub use traffic::{ConnectionPool, Target, TrafficPolicy};
pub use waypoint::Waypoint;
pub use workload::{Location, Workload, WorkloadRef};

/// Everything the data path needs to know, validated. Cheap to share (`Arc`), never mutated.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Mesh-wide data-path settings.
    pub mesh: MeshSettings,
    /// Workloads on this node, by namespace/name.
    pub workloads: BTreeMap<WorkloadRef, Workload>,
    /// Services, by namespace/name.
    pub services: BTreeMap<WorkloadRef, Service>,
    /// Access policies, by namespace/name of the policy.
    pub policies: BTreeMap<WorkloadRef, AccessPolicy>,
    /// Waypoints, by namespace/name.
    pub waypoints: BTreeMap<WorkloadRef, Waypoint>,
    /// L7 routes (for waypoints and gateways), ordered by kind, then namespace/name.
    pub routes: Vec<HttpRoute>,
    /// Gateways of class `weft` (for `weft gateway`), by namespace/name.
    pub gateways: BTreeMap<WorkloadRef, Gateway>,
    /// TLS certificates the gateways' HTTPS listeners name, by namespace/name of their
    /// Secret. Only those named are read.
    pub tls_certificates: BTreeMap<WorkloadRef, TlsCertificate>,
    /// Traffic policies (for waypoints; for node proxies, the connection pools of Services
    /// without a waypoint), oldest first: where two set the same feature for
    /// one Service, the first wins.
    pub traffic_policies: Vec<TrafficPolicy>,
    /// External services (outside the mesh), by namespace/name of the resource.
    pub external_services: BTreeMap<WorkloadRef, ExternalService>,
    /// What the agent's resolver last found for the hosts of `DNS` external services
    /// (filled in by `source::resolve`, between the source and the node join). A host
    /// that has never resolved is absent; one that stops resolving keeps its last answer.
    pub resolved_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Namespaces labelled into the mesh, where the source knows namespace labels (the
    /// Kubernetes source). `None` for the local file, whose workloads say it one by one.
    /// The CNI plugin refuses an unknown pod of such a namespace rather than let it run
    /// unmeshed.
    pub mesh_namespaces: Option<BTreeSet<String>>,
    /// Lookups by address, built on first use: the proxy asks them on every connection,
    /// so they must not scan thousands of workloads and services.
    #[serde(skip)]
    pub index: AddressIndex,
}

/// Workloads by IP and services by VIP (see `Snapshot::index`). Derived data: never part
/// of equality or of the config dump.
#[derive(Clone, Default)]
pub struct AddressIndex(std::sync::OnceLock<Addresses>);

#[derive(Clone, Default)]
struct Addresses {
    workloads: HashMap<IpAddr, WorkloadRef>,
    services: HashMap<IpAddr, Vec<WorkloadRef>>,
    /// The services with each endpoint IP, in name order.
    endpoints: HashMap<IpAddr, Vec<WorkloadRef>>,
    /// Waypoint pod addresses.
    waypoints: std::collections::HashSet<IpAddr>,
    /// The external services with each address (static or resolved), in name order.
    external: HashMap<IpAddr, Vec<WorkloadRef>>,
}

/// The ports at which the mesh knows one address (`Snapshot::registered_ports`).
enum Registered<P> {
    AnyPort,
    Ports(P),
}

/// Mesh-wide settings of the data path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshSettings {
    /// Destination ports never steered to the proxy.
    pub excluded_ports: Vec<u16>,
    /// Destination networks never steered to the proxy.
    pub excluded_cidrs: Vec<ipnet::IpNet>,
    /// mTLS mode of workloads that set none themselves.
    pub mtls: MtlsSettings,
    /// Zero trust by default: connections to a workload that no ALLOW policy selects are
    /// denied (instead of allowed).
    pub default_deny: bool,
    /// Which namespaces' pods write access-log lines.
    pub access_log: AccessLogSettings,
    /// How two enrolled pods of one node are connected.
    pub same_node: SameNode,
    /// Whether enrolled pods may reach destinations the mesh does not know.
    pub outbound: OutboundMode,
}

/// How the proxy connects a pod to an enrolled pod it also serves (the same node).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum SameNode {
    /// Over HBONE, as across nodes: every hop is encrypted, for operators who must.
    Hbone,
    /// Inside the proxy: the client's identity is what the node knows of its socket, the
    /// destination's policy is checked as for HBONE, and the bytes, which never leave the
    /// node, are not encrypted (`connection_security_policy="node_local"`).
    #[default]
    Local,
}

/// The access-log switch: on or off mesh-wide, with per-namespace exceptions. The
/// namespace is the reporting pod's (the client's for outbound connections, the server's
/// for inbound ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessLogSettings {
    /// Mesh-wide default (on).
    pub enabled: bool,
    /// Namespaces that differ from the default.
    pub namespaces: BTreeMap<String, bool>,
}

/// mTLS modes by namespace, with a mesh-wide default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MtlsSettings {
    /// Mode of namespaces not listed.
    pub default_mode: MtlsMode,
    /// Per-namespace modes.
    pub namespaces: BTreeMap<String, MtlsMode>,
}

/// How a workload treats plaintext.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inbound: HBONE only; plaintext is refused. Outbound to meshed pods: HBONE.
    Strict,
    /// Inbound: HBONE, and plaintext too (for clients outside the mesh). Outbound: HBONE.
    /// The default, as in Istio, so enrolling a namespace breaks no existing client.
    #[default]
    Permissive,
    /// No mTLS: plaintext both ways (traffic is still steered and observed).
    Disabled,
}

/// Where the proxy should send a connection whose original destination it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The address to connect to.
    pub upstream: SocketAddr,
    /// The service the original destination belonged to, if it was a service VIP.
    pub service: Option<WorkloadRef>,
}

impl AccessLogSettings {
    /// Whether pods of `namespace` write access-log lines.
    pub fn enabled_for(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.enabled)
    }
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            namespaces: BTreeMap::new(),
        }
    }
}

impl PartialEq for AddressIndex {
    fn eq(&self, _: &Self) -> bool {
        // Derived from the rest of the snapshot, which is compared instead.
        true
    }
}

impl std::fmt::Debug for AddressIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressIndex")
    }
}

/// Read side of the current snapshot.
pub type StateHandle = watch::Receiver<Arc<Snapshot>>;

impl Snapshot {
    /// Workloads on this node that are in the mesh: the ones to enroll.
    pub fn local_enrolled(&self) -> impl Iterator<Item = &Workload> {
        self.workloads
            .values()
            .filter(|w| w.enrolled && w.netns().is_some())
    }

    /// The effective mTLS mode of a workload: its own, else its namespace's, else the
    /// mesh default.
    pub fn mtls_mode(&self, workload: &Workload) -> MtlsMode {
        let mtls = &self.mesh.mtls;
        workload
            .mtls_mode
            .or_else(|| mtls.namespaces.get(&workload.name.namespace).copied())
            .unwrap_or(mtls.default_mode)
    }

    /// The workload that owns `ip` (on this node or another).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let name = self.addresses().workloads.get(&ip)?;
        self.workloads.get(name)
    }

    /// The service that has `ip` among its endpoints (the first by name, if several do).
    pub fn service_with_endpoint(&self, ip: IpAddr) -> Option<&WorkloadRef> {
        self.addresses().endpoints.get(&ip)?.first()
    }

    /// Services that have `ip` among their endpoints, in name order.
    pub fn services_with_endpoint(
        &self,
        ip: IpAddr,
    ) -> impl Iterator<Item = (&WorkloadRef, &Service)> {
        self.addresses()
            .endpoints
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|name| self.services.get_key_value(name))
    }

    /// The waypoint `service` is bound to: `None` when it is not bound, `Some(Err(name))`
    /// when the waypoint it names is unknown (its traffic must then fail, not bypass it).
    pub fn waypoint_of(&self, service: &Service) -> Option<Result<&Waypoint, WorkloadRef>> {
        let name = WorkloadRef::new(service.name.namespace.clone(), service.waypoint.clone()?);
        Some(self.waypoints.get(&name).ok_or(name))
    }

    /// Services that have `ip` as a VIP.
    pub fn services_by_vip(&self, ip: IpAddr) -> impl Iterator<Item = (&WorkloadRef, &Service)> {
        self.addresses()
            .services
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|name| self.services.get_key_value(name))
    }

    fn addresses(&self) -> &Addresses {
        self.index.0.get_or_init(|| {
            let mut addresses = Addresses::default();
            for (name, workload) in &self.workloads {
                for ip in &workload.ips {
                    // The file source rejects an IP owned twice; first one wins otherwise.
                    addresses
                        .workloads
                        .entry(*ip)
                        .or_insert_with(|| name.clone());
                }
            }
            for (name, service) in &self.services {
                for vip in &service.vips {
                    addresses
                        .services
                        .entry(*vip)
                        .or_default()
                        .push(name.clone());
                }
                for ip in &service.endpoints {
                    let services = addresses.endpoints.entry(*ip).or_default();
                    // An endpoint listed twice by one service counts once.
                    if services.last() != Some(name) {
                        services.push(name.clone());
                    }
                }
            }
            for waypoint in self.waypoints.values() {
                addresses
                    .waypoints
                    .extend(waypoint.addresses.iter().copied());
            }
            for (name, external) in &self.external_services {
                let resolved = external
                    .hosts
                    .iter()
                    .filter(|_| external.resolution == Resolution::Dns)
                    .filter_map(|host| self.resolved_hosts.get(host))
                    .flatten();
                for ip in external.addresses.iter().chain(resolved) {
                    let services = addresses.external.entry(*ip).or_default();
                    // Two hosts of one service may share an address.
                    if !services.contains(name) {
                        services.push(name.clone());
                    }
                }
            }
            addresses
        })
    }

    /// The external service `dst` belongs to: the first (by name) with `dst`'s address
    /// among its static or resolved ones and `dst`'s port among its ports.
    pub fn external_service(&self, dst: SocketAddr) -> Option<&ExternalService> {
        self.addresses()
            .external
            .get(&dst.ip())
            .into_iter()
            .flatten()
            .filter_map(|name| self.external_services.get(name))
            .find(|external| external.port(dst.port()).is_some())
    }

    /// Whether the mesh knows `dst` (for `OutboundMode::RegistryOnly`): a workload's
    /// address, a service's VIP at one of its ports, a service's endpoint, a waypoint, or
    /// an external service at one of its ports.
    pub fn is_registered(&self, dst: SocketAddr) -> bool {
        match self.registered_ports(dst.ip()) {
            Registered::AnyPort => true,
            Registered::Ports(mut ports) => ports.any(|port| port == dst.port()),
        }
    }

    /// Every destination `is_registered` says yes to, as plain data for the data plane:
    /// an address with `None` (known at every port), or with each port it is known at.
    /// Each address is listed once with `None` or once per port, in address order.
    pub fn registry(&self) -> impl Iterator<Item = (IpAddr, Option<u16>)> + '_ {
        let addresses = self.addresses();
        let ips: BTreeSet<IpAddr> = addresses
            .workloads
            .keys()
            .chain(addresses.endpoints.keys())
            .chain(&addresses.waypoints)
            .chain(addresses.services.keys())
            .chain(addresses.external.keys())
            .copied()
            .collect();
        ips.into_iter()
            .flat_map(move |ip| match self.registered_ports(ip) {
                Registered::AnyPort => vec![(ip, None)],
                Registered::Ports(ports) => ports
                    .collect::<BTreeSet<u16>>()
                    .into_iter()
                    .map(|port| (ip, Some(port)))
                    .collect(),
            })
    }

    /// The ports at which the mesh knows `ip`: the one rule behind `is_registered` and
    /// `registry`. Lazy, so the proxy's per-connection check allocates nothing.
    fn registered_ports(&self, ip: IpAddr) -> Registered<impl Iterator<Item = u16> + '_> {
        let addresses = self.addresses();
        if addresses.workloads.contains_key(&ip)
            || addresses.endpoints.contains_key(&ip)
            || addresses.waypoints.contains(&ip)
        {
            return Registered::AnyPort;
        }
        let vip_ports = self
            .services_by_vip(ip)
            .flat_map(|(_, service)| service.ports.iter().map(|p| p.port));
        let external_ports = addresses
            .external
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|name| self.external_services.get(name))
            .flat_map(|external| external.ports.iter().map(|p| p.number));
        Registered::Ports(vip_ports.chain(external_ports))
    }

    /// Resolves an original destination: a service VIP:port becomes one of the service's
    /// endpoints at the target port (picked with `pick`, a caller-supplied index so the
    /// caller owns the balancing state); anything else is connected to as it is.
    pub fn resolve(&self, dst: SocketAddr, pick: usize) -> Resolved {
        for (name, service) in self.services_by_vip(dst.ip()) {
            let Some(port) = service.ports.iter().find(|p| p.port == dst.port()) else {
                continue;
            };
            if service.endpoints.is_empty() {
                break;
            }
            let endpoint = service.endpoints[pick % service.endpoints.len()];
            return Resolved {
                upstream: SocketAddr::new(endpoint, port.target_port),
                service: Some(name.clone()),
            };
        }
        Resolved {
            upstream: dst,
            service: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_with_service() -> Snapshot {
        let name = WorkloadRef::new("default", "echo");
        let service = Service {
            name: name.clone(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec!["10.1.0.3".parse().unwrap(), "10.1.0.4".parse().unwrap()],
            waypoint: None,
            traffic_distribution: None,
        };
        Snapshot {
            services: BTreeMap::from([(name, service)]),
            ..Snapshot::default()
        }
    }

    #[test]
    fn service_vip_resolves_to_endpoints_in_turn() {
        let snapshot = snapshot_with_service();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let first = snapshot.resolve(vip, 0);
        let second = snapshot.resolve(vip, 1);
        assert_eq!(first.upstream, "10.1.0.3:8080".parse().unwrap());
        assert_eq!(second.upstream, "10.1.0.4:8080".parse().unwrap());
        assert_eq!(first.service, Some(WorkloadRef::new("default", "echo")));
    }

    #[test]
    fn unknown_port_of_a_vip_is_left_alone() {
        let snapshot = snapshot_with_service();
        let dst: SocketAddr = "10.96.0.10:81".parse().unwrap();
        assert_eq!(snapshot.resolve(dst, 0).upstream, dst);
        assert_eq!(snapshot.resolve(dst, 0).service, None);
    }

    #[test]
    fn mtls_mode_comes_from_the_workload_then_namespace_then_default() {
        let mut snapshot = Snapshot::default();
        snapshot.mesh.mtls.default_mode = MtlsMode::Permissive;
        snapshot
            .mesh
            .mtls
            .namespaces
            .insert("prod".into(), MtlsMode::Strict);
        let mut pod = Workload {
            name: WorkloadRef::new("prod", "api"),
            service_account: "api".into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            location: Location::Remote { node: "b".into() },
            enrolled: true,
            mtls_mode: None,
            labels: BTreeMap::new(),
        };
        assert_eq!(snapshot.mtls_mode(&pod), MtlsMode::Strict);
        pod.mtls_mode = Some(MtlsMode::Disabled);
        assert_eq!(snapshot.mtls_mode(&pod), MtlsMode::Disabled);
        pod.name.namespace = "dev".into();
        pod.mtls_mode = None;
        assert_eq!(snapshot.mtls_mode(&pod), MtlsMode::Permissive);
    }

    #[test]
    fn pod_ip_is_connected_to_as_it_is() {
        let snapshot = snapshot_with_service();
        let dst: SocketAddr = "10.1.0.3:8080".parse().unwrap();
        assert_eq!(snapshot.resolve(dst, 7).upstream, dst);
    }

    #[test]
    fn lookups_by_address_use_the_index() {
        let s = snapshot_with_service();
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let endpoint: IpAddr = "10.1.0.4".parse().unwrap();
        assert_eq!(s.services_by_vip(vip).count(), 1);
        assert_eq!(
            s.service_with_endpoint(endpoint),
            Some(&WorkloadRef::new("default", "echo"))
        );
        assert!(s.service_with_endpoint(vip).is_none());
        let with_endpoint: Vec<_> = s.services_with_endpoint(endpoint).map(|(n, _)| n).collect();
        assert_eq!(with_endpoint, [&WorkloadRef::new("default", "echo")]);
        // Derived data never makes two equal snapshots differ.
        let fresh = snapshot_with_service();
        assert_eq!(s, fresh);
    }

    #[test]
    fn external_services_are_found_by_static_and_resolved_addresses_at_their_ports() {
        let mut s = snapshot_with_service();
        let port = |number| ExternalPort::for_test(number, external::Protocol::Tcp);
        let egress = |name| WorkloadRef::new("egress", name);
        let by_dns = ExternalService::for_test(
            egress("api"),
            &["api.example.test", "www.example.test"],
            vec![port(443)],
            &[],
        );
        let fixed = ExternalService::for_test(
            egress("db"),
            &["db.example.test"],
            vec![port(5432)],
            &["192.0.2.9"],
        );
        for e in [by_dns, fixed] {
            s.external_services.insert(e.name.clone(), e);
        }
        s.resolved_hosts.insert(
            "api.example.test".into(),
            vec!["192.0.2.1".parse().unwrap()],
        );
        s.resolved_hosts.insert(
            "www.example.test".into(),
            vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
        );
        // A resolved name of a STATIC service does not count.
        s.resolved_hosts
            .insert("db.example.test".into(), vec!["192.0.2.3".parse().unwrap()]);
        let at = |a: &str| {
            s.external_service(a.parse().unwrap())
                .map(|e| e.name.name.as_str())
        };
        assert_eq!(at("192.0.2.1:443"), Some("api"));
        assert_eq!(at("192.0.2.2:443"), Some("api"));
        assert_eq!(at("192.0.2.1:80"), None);
        assert_eq!(at("192.0.2.9:5432"), Some("db"));
        assert_eq!(at("192.0.2.3:5432"), None);
        let registered = |a: &str| s.is_registered(a.parse().unwrap());
        assert!(registered("192.0.2.2:443"));
        assert!(!registered("192.0.2.2:80"));
        assert!(registered("10.96.0.10:80"));
        assert!(!registered("10.96.0.10:81"));
        assert!(registered("10.1.0.3:9999"));
        assert!(!registered("198.51.100.1:443"));
    }

    #[test]
    fn the_registry_lists_exactly_what_is_registered() {
        let mut s = snapshot_with_service();
        let workload = Workload {
            name: WorkloadRef::new("default", "client"),
            service_account: "client".into(),
            ips: vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            location: Location::Remote { node: "b".into() },
            enrolled: true,
            mtls_mode: None,
            labels: BTreeMap::new(),
        };
        s.workloads.insert(workload.name.clone(), workload);
        let waypoint = Waypoint {
            name: WorkloadRef::new("default", "waypoint"),
            service_account: "waypoint".into(),
            addresses: vec!["10.1.0.9".parse().unwrap()],
        };
        s.waypoints.insert(waypoint.name.clone(), waypoint);
        let port = |number| ExternalPort::for_test(number, external::Protocol::Tcp);
        let egress = |name| WorkloadRef::new("egress", name);
        let api = ExternalService::for_test(
            egress("api"),
            &["api.example.test"],
            vec![port(443), port(80)],
            &[],
        );
        // Shares an address with the VIP: their ports add up.
        let db = ExternalService::for_test(
            egress("db"),
            &["db.example.test"],
            vec![port(5432), port(80)],
            &["10.96.0.10"],
        );
        for e in [api, db] {
            s.external_services.insert(e.name.clone(), e);
        }
        s.resolved_hosts.insert(
            "api.example.test".into(),
            vec!["192.0.2.1".parse().unwrap()],
        );

        let registry: Vec<(IpAddr, Option<u16>)> = s.registry().collect();
        let entry = |ip: &str, port| (ip.parse::<IpAddr>().unwrap(), port);
        let expected = BTreeSet::from([
            entry("10.1.0.2", None),
            entry("fd00::2", None),
            entry("10.1.0.3", None),
            entry("10.1.0.4", None),
            entry("10.1.0.9", None),
            entry("10.96.0.10", Some(80)),
            entry("10.96.0.10", Some(5432)),
            entry("192.0.2.1", Some(80)),
            entry("192.0.2.1", Some(443)),
        ]);
        assert_eq!(
            registry.len(),
            expected.len(),
            "no duplicates: {registry:?}"
        );
        assert_eq!(registry.iter().copied().collect::<BTreeSet<_>>(), expected);
        for (ip, port) in &registry {
            let ports = port.map_or(vec![1, 80, 65_535], |p| vec![p]);
            for p in ports {
                assert!(s.is_registered(SocketAddr::new(*ip, p)), "{ip}:{p}");
            }
        }
        for unknown in [
            "10.96.0.10:81",
            "192.0.2.1:5432",
            "10.1.0.5:80",
            "[fd00::3]:80",
            "198.51.100.1:443",
        ] {
            assert!(!s.is_registered(unknown.parse().unwrap()), "{unknown}");
        }
    }
}
