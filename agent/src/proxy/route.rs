//! The mesh decisions of the proxy, as pure functions of the snapshot: does an outbound
//! connection go over HBONE (and to which identity), through a waypoint, or in plaintext,
//! and may a plaintext connection into a pod be accepted.
//!
//! A service bound to a waypoint (`Service::waypoint`) never gets its traffic straight from
//! a node proxy: its VIP:port, and the target port of each of its endpoints (a client that
//! dials a pod IP), go over HBONE to one of the waypoint's addresses, with the original
//! destination as the CONNECT authority. When the waypoint cannot be used (unknown, not
//! ready, or this node has no CA for mutual TLS) the connection fails closed.

use std::{collections::HashMap, net::SocketAddr};

use super::{Error, WaypointProblem};
use crate::hbone;
use crate::{
    identity::{self, SpiffeId},
    state::{
        MtlsMode, OutboundMode, Service, Snapshot, TlsOrigination, Waypoint, Workload, WorkloadRef,
        external::Protocol,
    },
    sync::Mutex,
};

/// Where an outbound connection goes, and what its record says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub route: Route,
    /// The address the connection is made to, for the record: the destination (a VIP
    /// resolved to one of its endpoints), or the waypoint's HBONE listener.
    pub upstream: SocketAddr,
    /// The service the destination belongs to: the VIP's, or the bound service a pod
    /// address was sent to the waypoint for.
    pub service: Option<WorkloadRef>,
}

/// How an outbound connection reaches its upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Mutual TLS to the destination pod's HBONE port, which must prove `identity`.
    Hbone {
        identity: SpiffeId,
        /// The destination pod's HBONE listener.
        addr: SocketAddr,
    },
    /// Mutual TLS to a waypoint's HBONE port, which must prove the waypoint's identity;
    /// the CONNECT authority is the original destination (VIP:port or pod IP:port).
    Waypoint {
        waypoint: WorkloadRef,
        identity: SpiffeId,
        /// One of the waypoint's addresses, at its HBONE port.
        addr: SocketAddr,
        /// The original destination, as the client dialled it.
        authority: SocketAddr,
    },
    /// Plaintext, straight to the upstream: the destination is outside the mesh, or one
    /// end has mTLS `DISABLED`, or this node runs without a CA.
    Passthrough,
    /// Straight to a registered external service's host (`upstream`: the address the
    /// application dialled, at the port's target port), after the egress policies that
    /// name the service; with TLS opened by the proxy when the port originates it.
    External {
        service: WorkloadRef,
        /// The port's TLS origination, if it has one (the application speaks plaintext).
        tls: Option<TlsOrigination>,
        /// The port carries HTTP (offered as the TLS session's ALPN when originating).
        http: bool,
    },
}

/// Remembers which bound services last failed for want of their waypoint, and why, so
/// that the warning is logged once per change rather than once per connection.
#[derive(Debug, Default)]
pub struct WaypointWarnings {
    unavailable: Mutex<HashMap<WorkloadRef, (WorkloadRef, WaypointProblem)>>,
}

/// Where an outbound connection from `source` to the original destination `dst` goes.
/// `pick` balances among a service's endpoints and a waypoint's addresses (the caller
/// owns the counter). `trust_domain` is None when the node has no CA (mutual TLS off).
///
/// A mesh destination comes first; then a registered external service (`Route::External`);
/// then, when the mesh is `REGISTRY_ONLY`, anything else is refused.
///
/// Errors fail the connection closed: a destination whose identity cannot be written as
/// a SPIFFE id (never plaintext to a pod that expects mTLS), a bound service whose
/// waypoint cannot be used (never around the waypoint), and an unknown destination of a
/// `REGISTRY_ONLY` mesh.
pub fn outbound(
    snapshot: &Snapshot,
    source: Option<&Workload>,
    dst: SocketAddr,
    pick: usize,
    hbone_port: u16,
    trust_domain: Option<&str>,
) -> Result<Outbound, Error> {
    if let Some((service, waypoint)) = bound_service(snapshot, dst)
        && let Some(outbound) = via_waypoint(service, waypoint, source, dst, pick, trust_domain)?
    {
        return Ok(outbound);
    }
    if let Some(outbound) = external(snapshot, dst) {
        return Ok(outbound);
    }
    if snapshot.mesh.outbound == OutboundMode::RegistryOnly && !snapshot.is_registered(dst) {
        return Err(Error::Unregistered(dst));
    }
    let resolved = snapshot.resolve(dst, pick);
    let route = direct(
        snapshot,
        source,
        resolved.upstream,
        hbone_port,
        trust_domain,
    )
    .map_err(Error::Identity)?;
    Ok(Outbound {
        route,
        upstream: resolved.upstream,
        service: resolved.service,
    })
}

/// The route to the external service `dst` belongs to, if it belongs to one.
fn external(snapshot: &Snapshot, dst: SocketAddr) -> Option<Outbound> {
    let service = snapshot.external_service(dst)?;
    let port = service.port(dst.port())?;
    Some(Outbound {
        route: Route::External {
            service: service.name.clone(),
            tls: port.tls.clone(),
            http: port.protocol == Protocol::Http,
        },
        upstream: SocketAddr::new(dst.ip(), port.target_port),
        service: None,
    })
}

/// How a connection to `upstream` (a pod or anything else, never a service VIP) goes
/// when no waypoint is involved.
pub fn direct(
    snapshot: &Snapshot,
    source: Option<&Workload>,
    upstream: SocketAddr,
    hbone_port: u16,
    trust_domain: Option<&str>,
) -> Result<Route, identity::InvalidSpiffeId> {
    let Some(trust_domain) = trust_domain else {
        return Ok(Route::Passthrough);
    };
    let Some(destination) = snapshot
        .workload_by_ip(upstream.ip())
        .filter(|w| w.enrolled)
    else {
        return Ok(Route::Passthrough);
    };
    let disabled = |w: &Workload| snapshot.mtls_mode(w) == MtlsMode::Disabled;
    if disabled(destination) || source.is_some_and(disabled) {
        return Ok(Route::Passthrough);
    }
    Ok(Route::Hbone {
        identity: destination.identity(trust_domain)?,
        addr: SocketAddr::new(upstream.ip(), hbone_port),
    })
}

/// Whether a plaintext connection into `pod` (its 15006 listener) is accepted: not when
/// the pod is `STRICT`.
pub fn accepts_plaintext(snapshot: &Snapshot, pod: &Workload, mtls_on: bool) -> bool {
    !mtls_on || snapshot.mtls_mode(pod) != MtlsMode::Strict
}

impl WaypointWarnings {
    /// Records that `service`'s connections fail for `problem` with `waypoint`; true when
    /// that is news (the first failure, or a different one), i.e. worth a warning.
    pub fn failed(
        &self,
        service: &WorkloadRef,
        waypoint: &WorkloadRef,
        problem: WaypointProblem,
    ) -> bool {
        let mut unavailable = self.unavailable.lock();
        let now = (waypoint.clone(), problem);
        if unavailable.get(service) == Some(&now) {
            return false;
        }
        unavailable.insert(service.clone(), now);
        true
    }

    /// Forgets the failures that `snapshot` no longer has (the service is gone or bound
    /// elsewhere, or its waypoint is known and ready now), so that the next failure is
    /// news again. Returns the (service, waypoint) pairs whose waypoint is ready again.
    pub fn update(&self, snapshot: &Snapshot) -> Vec<(WorkloadRef, WorkloadRef)> {
        let mut unavailable = self.unavailable.lock();
        let mut ready = Vec::new();
        unavailable.retain(|service, (waypoint, problem)| {
            let now = snapshot
                .services
                .get(service)
                .and_then(|s| snapshot.waypoint_of(s));
            let same = match &now {
                Some(Ok(w)) => w.name == *waypoint,
                Some(Err(name)) => name == waypoint,
                None => false,
            };
            if !same {
                // Unbound, gone, or bound to another waypoint: a new story.
                return false;
            }
            let fixed = match (*problem, now) {
                (WaypointProblem::Unknown | WaypointProblem::NotReady, Some(Ok(w))) => {
                    !w.addresses.is_empty()
                }
                // Still unknown; or a failure that does not depend on the waypoint's
                // addresses. (A different failure is news to `failed` anyway.)
                _ => false,
            };
            if fixed {
                ready.push((service.clone(), waypoint.clone()));
            }
            !fixed
        });
        ready
    }
}

/// A bound service and its waypoint (or the name of the unknown waypoint it names).
type Bound<'s> = (&'s Service, Result<&'s Waypoint, WorkloadRef>);

/// The bound service `dst` belongs to: `dst` is a VIP:port of the service, or an
/// endpoint's IP at one of the service's target ports. A VIP is only ever a VIP: its
/// service decides, bound or not.
fn bound_service(snapshot: &Snapshot, dst: SocketAddr) -> Option<Bound<'_>> {
    let mut vips = snapshot.services_by_vip(dst.ip()).peekable();
    if vips.peek().is_some() {
        // The same service `resolve` picks: the first (by name) with this port.
        let (_, service) = vips.find(|(_, s)| s.ports.iter().any(|p| p.port == dst.port()))?;
        return Some((service, snapshot.waypoint_of(service)?));
    }
    snapshot
        .services_with_endpoint(dst.ip())
        .filter(|(_, s)| s.ports.iter().any(|p| p.target_port == dst.port()))
        .find_map(|(_, service)| Some((service, snapshot.waypoint_of(service)?)))
}

/// The route through `service`'s waypoint; None when the client is that waypoint itself
/// (a waypoint is never enrolled, but if one were, sending its traffic back to itself
/// would loop).
fn via_waypoint(
    service: &Service,
    waypoint: Result<&Waypoint, WorkloadRef>,
    source: Option<&Workload>,
    dst: SocketAddr,
    pick: usize,
    trust_domain: Option<&str>,
) -> Result<Option<Outbound>, Error> {
    let name = match &waypoint {
        Ok(w) => w.name.clone(),
        Err(name) => name.clone(),
    };
    let unavailable = |problem| Error::WaypointUnavailable {
        service: service.name.clone(),
        waypoint: name.clone(),
        problem,
    };
    let trust_domain = trust_domain.ok_or_else(|| unavailable(WaypointProblem::NoMtls))?;
    let waypoint = waypoint.map_err(|_| unavailable(WaypointProblem::Unknown))?;
    let identity = waypoint
        .identity(trust_domain)
        .map_err(|_| unavailable(WaypointProblem::InvalidIdentity))?;
    if source.is_some_and(|s| s.identity(trust_domain).is_ok_and(|id| id == identity)) {
        return Ok(None);
    }
    if waypoint.addresses.is_empty() {
        return Err(unavailable(WaypointProblem::NotReady));
    }
    // mTLS modes do not enter into it: a waypoint speaks HBONE only, and the bound
    // endpoints admit nothing but the waypoint, so there is no plaintext way to them.
    let ip = waypoint.addresses[pick % waypoint.addresses.len()];
    let addr = SocketAddr::new(ip, WAYPOINT_PORT);
    Ok(Some(Outbound {
        route: Route::Waypoint {
            waypoint: name.clone(),
            identity,
            addr,
            authority: dst,
        },
        upstream: addr,
        service: Some(service.name.clone()),
    }))
}

/// Waypoints take HBONE on the mesh's fixed port, whatever port this node's pods use.
const WAYPOINT_PORT: u16 = hbone::PORT;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::{Location, ServicePort};

    fn pod(name: &str, ip: &str, enrolled: bool, mode: Option<MtlsMode>) -> Workload {
        Workload {
            name: WorkloadRef::new("default", name),
            service_account: name.to_string(),
            ips: vec![ip.parse().unwrap()],
            location: Location::Local {
                netns: PathBuf::from("/run/netns/x"),
            },
            enrolled,
            mtls_mode: mode,
            labels: Default::default(),
        }
    }

    fn snapshot(workloads: Vec<Workload>) -> Snapshot {
        let mut s = Snapshot::default();
        for w in workloads {
            s.workloads.insert(w.name.clone(), w);
        }
        s
    }

    const TD: Option<&str> = Some("cluster.local");

    #[test]
    fn enrolled_destinations_go_over_hbone_to_their_identity() {
        let s = snapshot(vec![
            pod("a", "10.1.0.2", true, None),
            pod("b", "10.1.0.3", true, None),
        ]);
        let src = s.workload_by_ip("10.1.0.2".parse().unwrap());
        let route = direct(&s, src, "10.1.0.3:80".parse().unwrap(), 15008, TD).unwrap();
        assert_eq!(
            route,
            Route::Hbone {
                identity: "spiffe://cluster.local/ns/default/sa/b".parse().unwrap(),
                addr: "10.1.0.3:15008".parse().unwrap(),
            }
        );
    }

    #[test]
    fn outside_the_mesh_disabled_or_no_ca_is_plaintext() {
        let s = snapshot(vec![
            pod("a", "10.1.0.2", true, None),
            pod("off", "10.1.0.3", false, None),
            pod("legacy", "10.1.0.4", true, Some(MtlsMode::Disabled)),
            pod("b", "10.1.0.5", true, None),
        ]);
        let src = s.workload_by_ip("10.1.0.2".parse().unwrap());
        let legacy = s.workload_by_ip("10.1.0.4".parse().unwrap());
        for (source, dst, td) in [
            (src, "10.1.0.3:80", TD),    // not enrolled
            (src, "192.0.2.1:80", TD),   // unknown
            (src, "10.1.0.4:80", TD),    // destination DISABLED
            (legacy, "10.1.0.5:80", TD), // source DISABLED
            (src, "10.1.0.5:80", None),  // no CA on this node
        ] {
            assert_eq!(
                direct(&s, source, dst.parse().unwrap(), 15008, td).unwrap(),
                Route::Passthrough,
                "{dst}"
            );
        }
    }

    #[test]
    fn only_strict_refuses_plaintext() {
        let s = snapshot(vec![]);
        let strict = pod("s", "10.1.0.2", true, Some(MtlsMode::Strict));
        assert!(!accepts_plaintext(&s, &strict, true));
        assert!(
            accepts_plaintext(&s, &strict, false),
            "no CA: nothing to insist on"
        );
        assert!(accepts_plaintext(
            &s,
            &pod("p", "10.1.0.3", true, None),
            true
        ));
    }

    /// Pods `client` (10.1.0.2) and `server` (10.1.0.3); service `default/api` (VIP
    /// 10.96.0.10, 80 → 8080) with `server` as its endpoint, bound to `waypoint` when it
    /// is Some; waypoint `default/wp` (service account `wp-sa`) at `waypoint_ips`.
    fn bound(waypoint: Option<&str>, waypoint_ips: &[&str]) -> Snapshot {
        let mut s = snapshot(vec![
            pod("client", "10.1.0.2", true, None),
            pod("server", "10.1.0.3", true, None),
        ]);
        let api = Service {
            name: WorkloadRef::new("default", "api"),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec!["10.1.0.3".parse().unwrap()],
            waypoint: waypoint.map(str::to_owned),
            traffic_distribution: None,
        };
        s.services.insert(api.name.clone(), api);
        let wp = Waypoint {
            name: WorkloadRef::new("default", "wp"),
            service_account: "wp-sa".into(),
            addresses: waypoint_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        };
        s.waypoints.insert(wp.name.clone(), wp);
        s
    }

    fn from_client(s: &Snapshot, dst: &str, pick: usize) -> Result<Outbound, Error> {
        let src = s.workload_by_ip("10.1.0.2".parse().unwrap());
        outbound(s, src, dst.parse().unwrap(), pick, 15008, TD)
    }

    fn waypoint_route(waypoint_ip: &str, authority: &str) -> Route {
        Route::Waypoint {
            waypoint: WorkloadRef::new("default", "wp"),
            identity: "spiffe://cluster.local/ns/default/sa/wp-sa"
                .parse()
                .unwrap(),
            addr: SocketAddr::new(waypoint_ip.parse().unwrap(), 15008),
            authority: authority.parse().unwrap(),
        }
    }

    #[test]
    fn a_bound_vip_goes_to_the_waypoint_with_the_vip_as_authority() {
        let s = bound(Some("wp"), &["10.1.0.9", "10.1.0.10"]);
        let first = from_client(&s, "10.96.0.10:80", 0).unwrap();
        assert_eq!(first.route, waypoint_route("10.1.0.9", "10.96.0.10:80"));
        assert_eq!(first.upstream, "10.1.0.9:15008".parse().unwrap());
        assert_eq!(first.service, Some(WorkloadRef::new("default", "api")));
        // Balanced over the waypoint's addresses.
        let second = from_client(&s, "10.96.0.10:80", 1).unwrap();
        assert_eq!(second.route, waypoint_route("10.1.0.10", "10.96.0.10:80"));
    }

    #[test]
    fn a_bound_pod_at_its_target_port_goes_to_the_waypoint_with_the_pod_as_authority() {
        let s = bound(Some("wp"), &["10.1.0.9"]);
        let out = from_client(&s, "10.1.0.3:8080", 0).unwrap();
        assert_eq!(out.route, waypoint_route("10.1.0.9", "10.1.0.3:8080"));
        assert_eq!(out.service, Some(WorkloadRef::new("default", "api")));
    }

    #[test]
    fn another_port_of_a_bound_pod_goes_direct() {
        let s = bound(Some("wp"), &["10.1.0.9"]);
        let out = from_client(&s, "10.1.0.3:9090", 0).unwrap();
        assert_eq!(
            out.route,
            Route::Hbone {
                identity: "spiffe://cluster.local/ns/default/sa/server"
                    .parse()
                    .unwrap(),
                addr: "10.1.0.3:15008".parse().unwrap(),
            }
        );
        assert_eq!(out.upstream, "10.1.0.3:9090".parse().unwrap());
        assert_eq!(out.service, None);
    }

    #[test]
    fn an_unbound_service_is_resolved_to_its_endpoint_as_before() {
        let s = bound(None, &["10.1.0.9"]);
        let server = Route::Hbone {
            identity: "spiffe://cluster.local/ns/default/sa/server"
                .parse()
                .unwrap(),
            addr: "10.1.0.3:15008".parse().unwrap(),
        };
        let via_vip = from_client(&s, "10.96.0.10:80", 0).unwrap();
        assert_eq!(via_vip.route, server);
        assert_eq!(via_vip.upstream, "10.1.0.3:8080".parse().unwrap());
        assert_eq!(via_vip.service, Some(WorkloadRef::new("default", "api")));
        let to_pod = from_client(&s, "10.1.0.3:8080", 0).unwrap();
        assert_eq!(to_pod.route, server);
        assert_eq!(to_pod.service, None);
    }

    #[test]
    fn a_waypoint_missing_not_ready_or_without_mtls_fails_the_connection() {
        let problem = |r: Result<Outbound, Error>| match r {
            Err(Error::WaypointUnavailable {
                service,
                waypoint,
                problem,
            }) => {
                assert_eq!(service, WorkloadRef::new("default", "api"));
                (waypoint.to_string(), problem)
            }
            other => panic!("expected waypoint_unavailable, got {other:?}"),
        };
        let unknown = bound(Some("gone"), &["10.1.0.9"]);
        for dst in ["10.96.0.10:80", "10.1.0.3:8080"] {
            assert_eq!(
                problem(from_client(&unknown, dst, 0)),
                ("default/gone".into(), WaypointProblem::Unknown),
                "{dst}"
            );
        }
        let empty = bound(Some("wp"), &[]);
        for dst in ["10.96.0.10:80", "10.1.0.3:8080"] {
            assert_eq!(
                problem(from_client(&empty, dst, 0)),
                ("default/wp".into(), WaypointProblem::NotReady),
                "{dst}"
            );
        }
        let ready = bound(Some("wp"), &["10.1.0.9"]);
        let src = ready.workload_by_ip("10.1.0.2".parse().unwrap());
        let no_ca = outbound(
            &ready,
            src,
            "10.96.0.10:80".parse().unwrap(),
            0,
            15008,
            None,
        );
        let e = no_ca.unwrap_err();
        assert_eq!(e.reason(), "waypoint_unavailable");
        assert!(e.to_string().contains("needs mutual TLS"), "{e}");
        // Even an unbound port of the no-CA node stays plaintext, as before.
        let plain = outbound(
            &ready,
            src,
            "10.1.0.3:9090".parse().unwrap(),
            0,
            15008,
            None,
        );
        assert_eq!(plain.unwrap().route, Route::Passthrough);
    }

    #[test]
    fn a_source_with_mtls_disabled_still_goes_to_the_waypoint() {
        let mut s = bound(Some("wp"), &["10.1.0.9"]);
        let legacy = pod("legacy", "10.1.0.5", true, Some(MtlsMode::Disabled));
        s.workloads.insert(legacy.name.clone(), legacy);
        let src = s.workload_by_ip("10.1.0.5".parse().unwrap());
        let out = outbound(&s, src, "10.96.0.10:80".parse().unwrap(), 0, 15008, TD).unwrap();
        assert_eq!(out.route, waypoint_route("10.1.0.9", "10.96.0.10:80"));
    }

    #[test]
    fn the_waypoint_itself_reaches_the_endpoints_directly() {
        let mut s = bound(Some("wp"), &["10.1.0.9"]);
        let mut wp = pod("wp-pod", "10.1.0.9", true, None);
        wp.service_account = "wp-sa".into();
        s.workloads.insert(wp.name.clone(), wp);
        let src = s.workload_by_ip("10.1.0.9".parse().unwrap());
        let out = outbound(&s, src, "10.1.0.3:8080".parse().unwrap(), 0, 15008, TD).unwrap();
        assert!(matches!(out.route, Route::Hbone { .. }), "{out:?}");
    }

    /// `bound(None, ..)` plus external service `egress/api` at 192.0.2.1 (resolved), port
    /// 443 passed through and port 80 originating TLS to 443.
    fn with_external(mode: OutboundMode) -> Snapshot {
        use crate::state::{ExternalPort, ExternalService, external::Protocol};
        let mut s = bound(None, &[]);
        s.mesh.outbound = mode;
        let http = ExternalPort {
            target_port: 443,
            tls: Some(TlsOrigination {
                sni: "api.example.test".into(),
                ca_certificates: None,
            }),
            ..ExternalPort::for_test(80, Protocol::Http)
        };
        let api = ExternalService::for_test(
            WorkloadRef::new("egress", "api"),
            &["api.example.test"],
            vec![ExternalPort::for_test(443, Protocol::Https), http],
            &[],
        );
        s.external_services.insert(api.name.clone(), api);
        s.resolved_hosts.insert(
            "api.example.test".into(),
            vec!["192.0.2.1".parse().unwrap()],
        );
        s
    }

    #[test]
    fn a_registered_external_service_is_routed_to_its_target_port() {
        let s = with_external(OutboundMode::AllowAny);
        let https = from_client(&s, "192.0.2.1:443", 0).unwrap();
        assert_eq!(
            https.route,
            Route::External {
                service: WorkloadRef::new("egress", "api"),
                tls: None,
                http: false,
            }
        );
        assert_eq!(https.upstream, "192.0.2.1:443".parse().unwrap());
        let http = from_client(&s, "192.0.2.1:80", 0).unwrap();
        assert!(
            matches!(&http.route, Route::External { tls: Some(t), http: true, .. } if t.sni == "api.example.test"),
            "{http:?}"
        );
        assert_eq!(http.upstream, "192.0.2.1:443".parse().unwrap());
        // Another port of the same address is not the service's.
        let other = from_client(&s, "192.0.2.1:8443", 0).unwrap();
        assert_eq!(other.route, Route::Passthrough);
    }

    #[test]
    fn registry_only_refuses_what_the_mesh_does_not_know_and_nothing_else() {
        let s = with_external(OutboundMode::RegistryOnly);
        for unknown in ["192.0.2.1:8443", "198.51.100.7:443", "10.96.0.10:81"] {
            let e = from_client(&s, unknown, 0).expect_err(unknown);
            assert_eq!(e.reason(), "unregistered_destination", "{unknown}");
        }
        for known in ["192.0.2.1:443", "10.96.0.10:80", "10.1.0.3:9999"] {
            assert!(from_client(&s, known, 0).is_ok(), "{known}");
        }
        // A host that stopped resolving keeps its last answer in the snapshot; one that
        // never resolved has no address to be recognised by.
        let mut unresolved = s.clone();
        unresolved.resolved_hosts.clear();
        unresolved.index = Default::default();
        assert!(from_client(&unresolved, "192.0.2.1:443", 0).is_err());
    }

    #[test]
    fn waypoint_warnings_are_news_once_per_change() {
        let warnings = WaypointWarnings::default();
        let (api, wp, gone) = (
            WorkloadRef::new("default", "api"),
            WorkloadRef::new("default", "wp"),
            WorkloadRef::new("default", "gone"),
        );
        assert!(warnings.failed(&api, &wp, WaypointProblem::NotReady));
        assert!(!warnings.failed(&api, &wp, WaypointProblem::NotReady));
        assert!(warnings.failed(&api, &wp, WaypointProblem::Unknown));
        assert!(warnings.failed(&api, &gone, WaypointProblem::Unknown));

        // Still unknown: remembered, nothing ready.
        assert!(warnings.update(&bound(Some("gone"), &[])).is_empty());
        assert!(!warnings.failed(&api, &gone, WaypointProblem::Unknown));
        // Bound elsewhere: forgotten, the next failure is news.
        assert!(warnings.update(&bound(Some("wp"), &[])).is_empty());
        assert!(warnings.failed(&api, &wp, WaypointProblem::NotReady));
        // Not ready yet: remembered.
        assert!(warnings.update(&bound(Some("wp"), &[])).is_empty());
        assert!(!warnings.failed(&api, &wp, WaypointProblem::NotReady));
        // Ready: said once, then forgotten.
        let ready = bound(Some("wp"), &["10.1.0.9"]);
        assert_eq!(warnings.update(&ready), [(api.clone(), wp.clone())]);
        assert!(warnings.update(&ready).is_empty());
        assert!(warnings.failed(&api, &wp, WaypointProblem::NotReady));
        // Unbound: forgotten without a word.
        assert!(warnings.update(&bound(None, &[])).is_empty());
        assert!(warnings.failed(&api, &wp, WaypointProblem::NotReady));
        // No CA on this node: remembered whatever the waypoint does.
        assert!(warnings.failed(&api, &gone, WaypointProblem::NoMtls));
        assert!(warnings.update(&bound(Some("gone"), &[])).is_empty());
        assert!(!warnings.failed(&api, &gone, WaypointProblem::NoMtls));
    }
}
