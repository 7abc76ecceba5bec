//! `TestGateway`: the real `weft gateway` (the ingress gateway, docs/gateway.md) running in a
//! pod of a [`TestNode`], as a gateway Deployment's pod would: its own netns and cgroup,
//! outside the mesh (not enrolled), its SPIFFE identity `spiffe://cluster.local/ns/<pod
//! namespace>/sa/<pod service account>` from the node's CA root. Its process, state file
//! and ports are a [`Standalone`]'s; its state file is the node's config plus the
//! `gateways:`, `secrets:` and `routes:` the test gives (objects as their manifests say:
//! [`gateway`], [`tls_secret`], [`route`]).
//!
//! Clients call it from outside the cluster: [`outside_client`] is a namespace linked to
//! the gateway's node (an [`Outside`]) whose address the cluster sees untranslated.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let node: weft_tests::TestNode = todo!();
//! use serde_json::json;
//! use weft_tests::gateway::{self, TestGateway};
//! let pod = TestGateway::pod(&node, "edge", "public")?;
//! let listeners = json!([gateway::https_listener("https", 8443, &["shop-cert"])]);
//! let sections = json!({
//!     "gateways": [gateway::gateway("edge", "public", listeners)],
//!     "secrets": [gateway::tls_secret("edge", "shop-cert", "CERT PEM", "KEY PEM")],
//!     "routes": [],
//! });
//! let gw = TestGateway::start(&node, &pod, sections)?;
//! let outside = gateway::outside_client(&node)?;
//! # Ok(()) }
//! ```

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    ops::{Deref, DerefMut},
};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    node::TestNode,
    outside::{Link, Outside},
    pod::TestPod,
    standalone::Standalone,
};

/// A gateway process in a pod: a [`Standalone`] started as `weft gateway`.
pub struct TestGateway {
    proxy: Standalone,
}

impl TestGateway {
    /// The pod a gateway named `name` of namespace `namespace` runs in on `node`: its
    /// service account is `name`, and it is not enrolled (the gateway speaks HBONE itself).
    pub fn pod(node: &TestNode, namespace: &str, name: &str) -> Result<TestPod> {
        node.pod(name)
            .namespace(namespace)
            .service_account(name)
            .enrolled(false)
            .create()
    }

    /// Starts `weft gateway` in `pod` for the Gateway named as the pod in the pod's
    /// namespace, as the pod's service account, with the node's config plus `sections`
    /// (`gateways`, `secrets`, `routes`), and waits until it is ready.
    pub fn start(node: &TestNode, pod: &TestPod, sections: Value) -> Result<Self> {
        let (name, namespace, account) = (pod.name(), pod.namespace(), pod.service_account());
        let args: Vec<OsString> = [
            "--name",
            name.as_str(),
            "--namespace",
            namespace.as_str(),
            "--service-account",
            account.as_str(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let proxy = Standalone::start(node, pod, "gateway", sections, &args)?;
        Ok(TestGateway { proxy })
    }
}

impl Deref for TestGateway {
    type Target = Standalone;

    fn deref(&self) -> &Standalone {
        &self.proxy
    }
}

impl DerefMut for TestGateway {
    fn deref_mut(&mut self) -> &mut Standalone {
        &mut self.proxy
    }
}

/// A namespace outside the cluster, linked to `node` (the gateway's), from which clients
/// call the gateway pod's address: [`OUTSIDE_IP`] is the source the cluster sees.
pub fn outside_client(node: &TestNode) -> Result<Outside> {
    Outside::new(node, "outside", OUTSIDE_LINK)
}

/// A Gateway of class `weft` (`gateway.networking.k8s.io/v1`).
pub fn gateway(namespace: &str, name: &str, listeners: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "gatewayClassName": "weft", "listeners": listeners },
    })
}

/// An HTTPS listener terminating TLS with the certificates of these Secrets (in the
/// Gateway's namespace; SNI picks one), admitting routes from every namespace.
pub fn https_listener(name: &str, port: u16, secrets: &[&str]) -> Value {
    let refs: Vec<Value> = secrets
        .iter()
        .map(|s| json!({ "kind": "Secret", "name": s }))
        .collect();
    json!({
        "name": name, "port": port, "protocol": "HTTPS",
        "tls": { "mode": "Terminate", "certificateRefs": refs },
        "allowedRoutes": { "namespaces": { "from": "All" } },
    })
}

/// A plaintext HTTP listener admitting routes from every namespace.
pub fn http_listener(name: &str, port: u16) -> Value {
    json!({
        "name": name, "port": port, "protocol": "HTTP",
        "allowedRoutes": { "namespaces": { "from": "All" } },
    })
}

/// A TLS listener that passes TLS through, routed by SNI (TLSRoutes), for every namespace.
pub fn passthrough_listener(name: &str, port: u16) -> Value {
    json!({
        "name": name, "port": port, "protocol": "TLS",
        "tls": { "mode": "Passthrough" },
        "allowedRoutes": { "namespaces": { "from": "All" } },
    })
}

/// A TCP listener (TCPRoutes), for every namespace.
pub fn tcp_listener(name: &str, port: u16) -> Value {
    json!({
        "name": name, "port": port, "protocol": "TCP",
        "allowedRoutes": { "namespaces": { "from": "All" } },
    })
}

/// A Secret of type `kubernetes.io/tls` with a PEM chain (leaf first) and its key.
pub fn tls_secret(namespace: &str, name: &str, cert_pem: &str, key_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "type": "kubernetes.io/tls",
        "stringData": { "tls.crt": cert_pem, "tls.key": key_pem },
    })
}

/// A route of `kind` (`HTTPRoute`, `GRPCRoute`, `TLSRoute`, `TCPRoute`) `namespace/name`
/// for `hostnames` (none: the field is left out, as a TCPRoute has none), attached to the
/// listener `section` of the Gateway `gateway` (`namespace/name`), with `rules`.
pub fn route(
    kind: &str,
    (namespace, name): (&str, &str),
    gateway: (&str, &str),
    section: &str,
    hostnames: &[&str],
    rules: Value,
) -> Value {
    // TCPRoute is in the Gateway API's experimental channel only.
    let version = if kind == "TCPRoute" { "v1alpha2" } else { "v1" };
    let mut route = json!({
        "apiVersion": format!("gateway.networking.k8s.io/{version}"),
        "kind": kind,
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "parentRefs": [{
                "group": "gateway.networking.k8s.io", "kind": "Gateway",
                "namespace": gateway.0, "name": gateway.1, "sectionName": section,
            }],
            "rules": rules,
        },
    });
    if !hostnames.is_empty() {
        route["spec"]["hostnames"] = json!(hostnames);
    }
    route
}

/// The outside client's address, as the gateway (and `X-Forwarded-For`) sees it.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The metric of the gateway's TLS handshakes, by `result` (`ok`, `no_certificate`,
/// `failed`, `timeout`).
pub const TLS_HANDSHAKES: &str = "weft_gateway_tls_handshakes_total";
/// The metric of the gateway's passthrough (TLS and TCP listener) connections, by
/// `result` (`ok`, `no_route`, `bad_client_hello`, ...).
pub const PASSTHROUGH: &str = "weft_gateway_passthrough_connections_total";

/// `out0` in the node, `eth0` outside, `203.0.113.0/24` (TEST-NET-3): not the node's
/// default route, the node answers the client over the link's own subnet.
const OUTSIDE_LINK: Link = Link {
    node_end: "out0",
    far_end: "eth0",
    node_ip: Ipv4Addr::new(203, 0, 113, 1),
    far_ip: OUTSIDE_IP,
    default_route: false,
};
