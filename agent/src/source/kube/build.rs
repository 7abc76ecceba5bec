//! Caches → `state::Snapshot`: the join of namespaces (enrollment), pods (this node's by pod
//! UID, whose netns `source::node::join` fills in; other nodes' as remote), services with the endpoints and
//! target ports of their slices, access policies and PeerAuthentication modes; waypoint
//! bindings (the Service's `weft.dev/use-waypoint` label, else its Namespace's) and the
//! waypoints (Services labelled `weft.dev/role: waypoint`, addressed by their ready
//! endpoints); for a waypoint, the routes and the TrafficPolicies attached to the Services
//! bound to it; for a gateway, its Gateway, its certificates, the routes naming it and the
//! TrafficPolicies targeting those routes; the external services (`ExternalService`s that could be understood, at most
//! `source::external::MAX_SERVICES`).
//!
//! Where the cluster holds conflicting data, the first by name wins, so the same caches
//! always give the same snapshot: two namespace-wide PeerAuthentications in one namespace,
//! two selecting one pod, one named port that slices map to different numbers. Two
//! TrafficPolicies setting the same feature for one Service are the exception: the older
//! wins (`creationTimestamp`, then namespace/name: the Gateway API's rule), which the
//! snapshot leaves to `state::traffic` by listing them oldest first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    project::{
        DISABLED, MESH_LABEL, NO_WAYPOINT, PeerAuthItem, PodItem, ServiceItem, SliceItem,
        TargetPort,
    },
    reflector::Stores,
};
use crate::{
    source::external,
    state::{
        ExternalService, HttpRoute, Location, MeshSettings, MtlsMode, Service, ServicePort,
        Snapshot, Target, TrafficPolicy, Waypoint, Workload, WorkloadRef,
    },
};

/// The snapshot of `stores`; `routes_for` is the waypoint whose routes it carries (the
/// routes with a parent Service bound to it), `gateway` the Gateway whose routes it
/// carries (the routes naming it as a parent), both `None` for a node agent (no routes).
pub(super) fn snapshot(
    stores: &Stores,
    mesh: &MeshSettings,
    routes_for: Option<&WorkloadRef>,
    gateway: Option<&WorkloadRef>,
) -> Snapshot {
    let mut mesh = mesh.clone();
    let mut namespace_modes = BTreeSet::new();
    let mut workload_modes: Vec<&PeerAuthItem> = Vec::new();
    for item in stores.peer_authentications.items.values() {
        match item.selector {
            // The resource wins over the config file's `mesh.mtls.namespaces`.
            None if namespace_modes.insert(item.namespace.as_str()) => {
                mesh.mtls
                    .namespaces
                    .insert(item.namespace.clone(), item.mode);
            }
            None => {}
            Some(_) => workload_modes.push(item),
        }
    }
    let enabled = |namespace: &str| {
        stores
            .namespaces
            .items
            .get(namespace)
            .is_some_and(|n| n.enabled)
    };
    let workload = |pod: &PodItem, location: Location| Workload {
        name: pod.name.clone(),
        service_account: pod.service_account.clone(),
        ips: pod.ips.clone(),
        location,
        enrolled: enabled(&pod.name.namespace)
            && pod.labels.get(MESH_LABEL).map(String::as_str) != Some(DISABLED),
        mtls_mode: mode_of(pod, &workload_modes),
        labels: pod.labels.clone(),
    };

    let mut workloads = BTreeMap::new();
    for pod in stores.local_pods.items.values() {
        // In the state from the moment it is scheduled here, even before it has an IP: the
        // CNI plugin's ADD (which comes before the kubelet reports the IP) waits for it.
        // Until the CNI plugin or discovery has said where its netns is, it cannot be
        // entered; `node::join` fills that in.
        let location = Location::Pod {
            uid: pod.uid.clone(),
            netns: None,
            probe_ports: pod.probe_ports.clone(),
        };
        workloads.insert(pod.name.clone(), workload(pod, location));
    }
    for pod in stores.remote_pods.items.values() {
        // A pod of another node without an IP yet is nothing to reach.
        if !pod.ips.is_empty() && !workloads.contains_key(&pod.name) {
            let location = Location::Remote {
                node: pod.node.clone(),
            };
            workloads.insert(pod.name.clone(), workload(pod, location));
        }
    }

    let mut slices: HashMap<&WorkloadRef, Vec<&SliceItem>> = HashMap::new();
    for slice in stores.slices.items.values() {
        slices.entry(&slice.service).or_default().push(slice);
    }
    let services: BTreeMap<WorkloadRef, Service> = stores
        .services
        .items
        .values()
        .map(|item| {
            let mut service = service(item, slices.get(&item.name).map_or(&[][..], Vec::as_slice));
            service.waypoint = binding(stores, item);
            (item.name.clone(), service)
        })
        .collect();
    let waypoints = stores
        .services
        .items
        .values()
        .filter_map(|item| {
            let service_account = item.waypoint_account.clone()?;
            let waypoint = Waypoint {
                name: item.name.clone(),
                service_account,
                // Ready endpoints only: an empty list is a waypoint not ready.
                addresses: services
                    .get(&item.name)
                    .map(|s| s.endpoints.clone())
                    .unwrap_or_default(),
            };
            Some((item.name.clone(), waypoint))
        })
        .collect();
    let routes = routes(stores, &services, routes_for, gateway);
    // A waypoint enforces the policies of the Services bound to it and of their routes. A
    // node agent enforces one feature at L4 (`connectionPool.maxConnections`), for the
    // Services bound to no waypoint; it gets the connection pools of those.
    // A gateway applies the policies of the routes it carries.
    let mut traffic_policies = traffic_policies(stores);
    match (routes_for, gateway) {
        (Some(waypoint), _) => traffic_policies.retain(|p| {
            p.targets.iter().any(|t| match t {
                Target::Service(service) => bound_to(services.get(service), waypoint),
                Target::Route { route, .. } => routes.iter().any(|r| r.name == *route),
            })
        }),
        (None, Some(_)) => traffic_policies.retain(|p| {
            p.targets.iter().any(|t| match t {
                Target::Service(_) => false,
                Target::Route { route, .. } => routes.iter().any(|r| r.name == *route),
            })
        }),
        (None, None) => traffic_policies.retain(|p| pools_unbound_service(p, &services)),
    }

    let policies = stores
        .policies
        .items
        .values()
        .map(|item| (item.policy.name.clone(), item.policy.clone()))
        .collect();

    let mesh_namespaces = stores.mesh_namespaces().cloned().collect();
    Snapshot {
        mesh,
        workloads,
        services,
        policies,
        waypoints,
        routes,
        traffic_policies,
        external_services: external_services(stores),
        gateways: stores
            .gateways
            .items
            .values()
            .flatten()
            .map(|g| (g.name.clone(), g.clone()))
            .collect(),
        tls_certificates: stores
            .tls_secrets
            .items
            .values()
            .flatten()
            .map(|c| (c.name.clone(), c.clone()))
            .collect(),
        resolved_hosts: Default::default(),
        mesh_namespaces: Some(mesh_namespaces),
        index: Default::default(),
    }
}

/// The routes with a parent Service bound to `waypoint`, or naming `gateway` as a parent,
/// by kind, namespace and name.
fn routes(
    stores: &Stores,
    services: &BTreeMap<WorkloadRef, Service>,
    waypoint: Option<&WorkloadRef>,
    gateway: Option<&WorkloadRef>,
) -> Vec<HttpRoute> {
    let mut routes: Vec<HttpRoute> = stores
        .http_routes
        .items
        .values()
        .chain(stores.grpc_routes.items.values())
        .chain(stores.tls_routes.items.values())
        .chain(stores.tcp_routes.items.values())
        .map(|item| &item.route)
        .filter(|route| {
            let to_waypoint = waypoint.is_some_and(|waypoint| {
                route
                    .parents
                    .iter()
                    .any(|p| bound_to(services.get(&p.service), waypoint))
            });
            let to_gateway = gateway
                .is_some_and(|gateway| route.gateway_parents.iter().any(|p| p.gateway == *gateway));
            to_waypoint || to_gateway
        })
        .cloned()
        .collect();
    routes.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    routes
}

/// Every TrafficPolicy in force (a rejected one's last good version), oldest first: by
/// `creationTimestamp`, then namespace and name.
pub(super) fn traffic_policies(stores: &Stores) -> Vec<TrafficPolicy> {
    let mut policies: Vec<_> = stores
        .traffic_policies
        .items
        .values()
        .filter_map(|item| Some((&item.created, item.policy.as_ref()?)))
        .collect();
    policies.sort_by(|(a, p), (b, q)| (a, &p.name).cmp(&(b, &q.name)));
    policies.into_iter().map(|(_, p)| p.clone()).collect()
}

/// The external services in force: the valid ones, the first `external::MAX_SERVICES` of
/// them by namespace/name (`over_the_limit` are the others, whose status says so).
fn external_services(stores: &Stores) -> BTreeMap<WorkloadRef, ExternalService> {
    stores
        .external_services
        .items
        .values()
        .filter_map(|item| item.service.as_ref())
        .take(external::MAX_SERVICES)
        .map(|service| (service.name.clone(), service.clone()))
        .collect()
}

/// The keys of the valid external services left out of the snapshot because there are more
/// than `external::MAX_SERVICES`.
pub(super) fn over_the_limit(stores: &Stores) -> impl Iterator<Item = &String> {
    stores
        .external_services
        .items
        .iter()
        .filter(|(_, item)| item.service.is_some())
        .skip(external::MAX_SERVICES)
        .map(|(key, _)| key)
}

/// Whether `policy` sets `connectionPool` for a Service bound to no waypoint. Any of its
/// fields, not only the `maxConnections` a node proxy enforces: the conflict rule picks
/// one pool per Service, and an older pool without `maxConnections` means no limit.
fn pools_unbound_service(
    policy: &TrafficPolicy,
    services: &BTreeMap<WorkloadRef, Service>,
) -> bool {
    policy.connection_pool.is_some()
        && policy.targets.iter().any(|t| match t {
            Target::Service(service) => services.get(service).is_some_and(|s| s.waypoint.is_none()),
            Target::Route { .. } => false,
        })
}

/// The waypoint `item` is bound to: its label wins, `none` opts out of its namespace's.
pub(super) fn binding(stores: &Stores, item: &ServiceItem) -> Option<String> {
    match item.waypoint.as_deref() {
        Some(NO_WAYPOINT) => None,
        Some(name) => Some(name.to_owned()),
        None => stores
            .namespaces
            .items
            .get(&item.name.namespace)
            .and_then(|n| n.waypoint.clone()),
    }
}

/// Whether `service` exists and is bound to `waypoint`.
pub(super) fn bound_to(service: Option<&Service>, waypoint: &WorkloadRef) -> bool {
    service.is_some_and(|s| {
        s.name.namespace == waypoint.namespace && s.waypoint.as_deref() == Some(&waypoint.name)
    })
}

fn service(item: &ServiceItem, slices: &[&SliceItem]) -> Service {
    let ports = item
        .ports
        .iter()
        .filter_map(|port| {
            // The slices carry the resolved number of each service port, by port name.
            let from_slices = slices
                .iter()
                .flat_map(|s| &s.ports)
                .find(|(name, _)| *name == port.name)
                .map(|(_, number)| *number);
            let target_port = match (&port.target, from_slices) {
                (_, Some(number)) => number,
                (TargetPort::Number(number), None) => *number,
                // A named port no slice resolves has no endpoint to go to either.
                (TargetPort::Named(_), None) => return None,
            };
            Some(ServicePort {
                port: port.port,
                target_port,
            })
        })
        .collect();
    let mut endpoints: Vec<_> = slices
        .iter()
        .flat_map(|s| s.addresses.iter().copied())
        .collect();
    // An endpoint in two slices (while one is being replaced) is one endpoint.
    endpoints.sort_unstable();
    endpoints.dedup();
    Service {
        name: item.name.clone(),
        vips: item.vips.clone(),
        ports,
        endpoints,
        waypoint: None,
        traffic_distribution: item.traffic_distribution,
    }
}

fn mode_of(pod: &PodItem, workload_modes: &[&PeerAuthItem]) -> Option<MtlsMode> {
    workload_modes
        .iter()
        .find(|item| {
            item.namespace == pod.name.namespace
                && item
                    .selector
                    .as_ref()
                    .is_some_and(|labels| labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
        })
        .map(|item| item.mode)
}
