//! Gateway objects → `state::Gateway`: the one conversion of `Gateway`s
//! (`gateway.networking.k8s.io/v1`, the `gateway-api` crate's experimental types, as the
//! routes), shared by the local file (`gateways:` items) and the Kubernetes source.
//!
//! A Gateway of another `gatewayClassName` is someone else's: `None`, never an error, and
//! nothing else of it is read. One of class `weft` is validated whole; an error names the
//! field (`gateways[0].spec.listeners[1].tls.certificateRefs[0].namespace`).
//!
//! What weft does not build yet is an error naming the field, never silently ignored:
//! UDP listeners, TLS listeners that terminate (`TLS` is passthrough; HTTPS terminates),
//! TLS `options`, certificates in another namespace (they need a ReferenceGrant, which weft
//! does not read), `allowedRoutes.namespaces.from: Selector`, route kinds the protocol does
//! not carry (HTTP/HTTPS: HTTPRoute and GRPCRoute; TLS: TLSRoute; TCP: TCPRoute), ListenerSets (`allowedListeners` other than `None`), `defaultScope`,
//! Gateway-wide `tls`, and `addresses`: a `weft gateway` listens on its `--listen-ip`, and
//! an address it would not serve is refused rather than reported nowhere (weft writes no
//! Gateway status yet). `infrastructure.labels` and `annotations` are read and left alone:
//! they label the resources an implementation creates for a Gateway, and weft creates none;
//! `infrastructure.parametersRef` is refused (weft has no parameters).
//!
//! The listener rules the Gateway API states and weft enforces: names unique; 1 to
//! `MAX_LISTENERS` listeners; one protocol per port (HTTP and HTTPS cannot share a socket);
//! no two listeners of one port with the same hostname; `tls` on HTTPS (required, with at
//! least one certificate) and TLS (required, `mode: Passthrough`, no certificates) only.

use gateway_api::experimental::gateways as gw;
use serde_json::Value;

use super::{
    API_VERSION, GROUP, at, decode, hostname, invalid, is_core, object_name, object_type, port,
};
use crate::{
    source::syntax::{self, Invalid},
    state::{
        Gateway, Listener, WorkloadRef,
        gateway::{AllowedRoutes, GATEWAY_CLASS, ListenerProtocol, RouteNamespaces},
    },
};

/// The most listeners a Gateway may have (the Gateway API's own limit).
pub const MAX_LISTENERS: usize = 64;
/// The most certificates a listener may name (the Gateway API's own limit).
pub const MAX_CERTIFICATE_REFS: usize = 64;

/// Validates a Gateway object (`apiVersion`, `kind`, `metadata`, `spec`) found at `field`
/// (`gateways[0]`, or `""` for an API object); one without a namespace is in
/// `default_namespace`. `None`: a Gateway of another class.
pub fn gateway(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<Option<Gateway>, Invalid> {
    object_type(field, object, API_VERSION, "Gateway")?;
    // Someone else's Gateway is not read any further: its fields are its class's business.
    let class = object
        .pointer("/spec/gatewayClassName")
        .and_then(Value::as_str);
    if class.is_some_and(|c| c != GATEWAY_CLASS) {
        return Ok(None);
    }
    let raw: gw::Gateway = decode(field, object)?;
    let name = object_name(field, &raw.metadata, default_namespace)?;
    let spec_field = at(field, "spec");
    unsupported_fields(&spec_field, &raw.spec)?;
    let count = raw.spec.listeners.len();
    if count == 0 || count > MAX_LISTENERS {
        return Err(invalid(
            format!("{spec_field}.listeners"),
            format!("{count} listeners: expected 1 to {MAX_LISTENERS}"),
        ));
    }
    let mut listeners: Vec<Listener> = Vec::with_capacity(count);
    for (i, raw) in raw.spec.listeners.into_iter().enumerate() {
        let field = format!("{spec_field}.listeners[{i}]");
        let listener = listener(&field, &name.namespace, raw)?;
        conflicts(&field, &listeners, &listener)?;
        listeners.push(listener);
    }
    Ok(Some(Gateway { name, listeners }))
}

/// Refuses the Gateway-wide fields weft does not build.
fn unsupported_fields(spec: &str, raw: &gw::GatewaySpec) -> Result<(), Invalid> {
    if raw.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(not_yet(
            format!("{spec}.addresses"),
            "a weft gateway listens on its --listen-ip (remove addresses)",
        ));
    }
    if let Some(from) = raw
        .allowed_listeners
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.from.as_ref())
        .filter(|from| !matches!(from, gw::GatewayAllowedListenersNamespacesFrom::None))
    {
        return Err(not_yet(
            format!("{spec}.allowedListeners.namespaces.from"),
            &format!("{from:?}: ListenerSets"),
        ));
    }
    if matches!(raw.default_scope, Some(gw::GatewayDefaultScope::All)) {
        return Err(not_yet(format!("{spec}.defaultScope"), "default Gateways"));
    }
    if raw
        .infrastructure
        .as_ref()
        .is_some_and(|i| i.parameters_ref.is_some())
    {
        return Err(not_yet(
            format!("{spec}.infrastructure.parametersRef"),
            "weft gateways take no parameters",
        ));
    }
    if raw.tls.is_some() {
        return Err(not_yet(
            format!("{spec}.tls"),
            "Gateway-wide TLS settings (client certificates, backend TLS)",
        ));
    }
    Ok(())
}

fn listener(field: &str, namespace: &str, raw: gw::GatewayListeners) -> Result<Listener, Invalid> {
    let name = syntax::name(&format!("{field}.name"), raw.name)?;
    let port = port(&format!("{field}.port"), raw.port)?;
    let protocol = match raw.protocol.as_str() {
        "HTTP" => ListenerProtocol::Http,
        "HTTPS" => ListenerProtocol::Https,
        "TLS" => ListenerProtocol::Tls,
        "TCP" => ListenerProtocol::Tcp,
        "UDP" => {
            return Err(not_yet(
                format!("{field}.protocol"),
                "UDP listeners (HTTP, HTTPS, TLS and TCP are)",
            ));
        }
        other => {
            return Err(invalid(
                format!("{field}.protocol"),
                format!("{other:?}: expected \"HTTP\", \"HTTPS\", \"TLS\" or \"TCP\""),
            ));
        }
    };
    let hostname = raw
        .hostname
        .map(|h| listener_hostname(&format!("{field}.hostname"), h))
        .transpose()?;
    let certificates = match (protocol, raw.tls) {
        (ListenerProtocol::Http | ListenerProtocol::Tcp, None) => Vec::new(),
        (ListenerProtocol::Http | ListenerProtocol::Tcp, Some(_)) => {
            return Err(invalid(
                format!("{field}.tls"),
                "only for an HTTPS or TLS listener (remove it, or change the protocol)".into(),
            ));
        }
        (ListenerProtocol::Tls, tls) => {
            passthrough(&format!("{field}.tls"), tls)?;
            Vec::new()
        }
        (ListenerProtocol::Https, None) => {
            return Err(invalid(
                format!("{field}.tls"),
                "required for an HTTPS listener (its certificateRefs)".into(),
            ));
        }
        (ListenerProtocol::Https, Some(tls)) => {
            certificates(&format!("{field}.tls"), namespace, tls)?
        }
    };
    let allowed_routes = allowed_routes(
        &format!("{field}.allowedRoutes"),
        protocol,
        raw.allowed_routes,
    )?;
    Ok(Listener {
        name,
        port,
        protocol,
        hostname,
        certificates,
        allowed_routes,
    })
}

/// A TLS listener's `tls`: passthrough, the only mode weft serves on one (terminating TLS
/// for a TLSRoute is not built), without certificates, which it would never present.
fn passthrough(field: &str, tls: Option<gw::GatewayListenersTls>) -> Result<(), Invalid> {
    let Some(tls) = tls else {
        return Err(invalid(
            field.into(),
            "required for a TLS listener: {mode: Passthrough}".into(),
        ));
    };
    if !matches!(tls.mode, Some(gw::GatewayListenersTlsMode::Passthrough)) {
        return Err(not_yet(
            format!("{field}.mode"),
            "TLS listeners that terminate (use HTTPS, or mode Passthrough)",
        ));
    }
    if tls.certificate_refs.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(invalid(
            format!("{field}.certificateRefs"),
            "a passthrough listener presents no certificate: the backend does".into(),
        ));
    }
    if tls.options.as_ref().is_some_and(|o| !o.is_empty()) {
        return Err(not_yet(format!("{field}.options"), "TLS options"));
    }
    Ok(())
}

/// A listener's host name: a DNS name or `*.` and one, lowercased; never an IP address.
fn listener_hostname(field: &str, host: String) -> Result<String, Invalid> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(invalid(
            field.into(),
            format!("{host:?} is an IP address: a listener's hostname is a DNS name"),
        ));
    }
    hostname(field, host)
}

fn certificates(
    field: &str,
    namespace: &str,
    tls: gw::GatewayListenersTls,
) -> Result<Vec<WorkloadRef>, Invalid> {
    if matches!(tls.mode, Some(gw::GatewayListenersTlsMode::Passthrough)) {
        return Err(invalid(
            format!("{field}.mode"),
            "Passthrough is for a TLS listener (an HTTPS listener terminates TLS)".into(),
        ));
    }
    if tls.options.as_ref().is_some_and(|o| !o.is_empty()) {
        return Err(not_yet(format!("{field}.options"), "TLS options"));
    }
    let refs = tls.certificate_refs.unwrap_or_default();
    if refs.is_empty() || refs.len() > MAX_CERTIFICATE_REFS {
        return Err(invalid(
            format!("{field}.certificateRefs"),
            format!(
                "{} certificates: expected 1 to {MAX_CERTIFICATE_REFS} (Secrets of type \
                 kubernetes.io/tls)",
                refs.len()
            ),
        ));
    }
    let mut certificates = Vec::with_capacity(refs.len());
    for (i, raw) in refs.into_iter().enumerate() {
        let field = format!("{field}.certificateRefs[{i}]");
        if !is_core(raw.group.as_deref()) {
            return Err(invalid(
                format!("{field}.group"),
                format!(
                    "{:?}: only core Secrets hold certificates (group \"\")",
                    raw.group
                ),
            ));
        }
        if let Some(kind) = raw.kind.filter(|k| k != "Secret") {
            return Err(invalid(
                format!("{field}.kind"),
                format!("{kind:?}: only Secrets hold certificates"),
            ));
        }
        let name = syntax::name(&format!("{field}.name"), raw.name)?;
        if let Some(other) = raw.namespace.filter(|n| n != namespace) {
            return Err(invalid(
                format!("{field}.namespace"),
                format!(
                    "{other:?}: a certificate in another namespace than the Gateway's needs a \
                     ReferenceGrant, which weft does not read yet"
                ),
            ));
        }
        certificates.push(WorkloadRef::new(namespace, name));
    }
    Ok(certificates)
}

fn allowed_routes(
    field: &str,
    protocol: ListenerProtocol,
    raw: Option<gw::GatewayListenersAllowedRoutes>,
) -> Result<AllowedRoutes, Invalid> {
    use gw::GatewayListenersAllowedRoutesNamespacesFrom as Namespaces;
    let raw = raw.unwrap_or_default();
    let namespaces = match raw.namespaces.and_then(|n| n.from) {
        None | Some(Namespaces::Same) => RouteNamespaces::Same,
        Some(Namespaces::All) => RouteNamespaces::All,
        Some(Namespaces::Selector) => {
            return Err(not_yet(
                format!("{field}.namespaces.from"),
                "Selector (use Same or All)",
            ));
        }
    };
    let mut kinds = Vec::new();
    for (i, raw) in raw.kinds.unwrap_or_default().into_iter().enumerate() {
        let field = format!("{field}.kinds[{i}]");
        if !matches!(raw.group.as_deref(), None | Some(GROUP)) {
            return Err(invalid(
                format!("{field}.group"),
                format!("{:?}: expected {GROUP:?}", raw.group),
            ));
        }
        let served = protocol.default_kinds();
        let Some(kind) = served
            .iter()
            .copied()
            .find(|kind| kind.to_string() == raw.kind)
        else {
            let names: Vec<String> = served.iter().map(ToString::to_string).collect();
            return Err(invalid(
                format!("{field}.kind"),
                format!(
                    "{:?}: a listener of protocol {} serves {}",
                    raw.kind,
                    protocol.name(),
                    names.join(" and ")
                ),
            ));
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    // Left out or empty: the kinds of the protocol (the spec's rule).
    if kinds.is_empty() {
        kinds = protocol.default_kinds().to_vec();
    }
    Ok(AllowedRoutes { namespaces, kinds })
}

/// Refuses `listener` (at `field`) if it clashes with one listed before it.
fn conflicts(field: &str, before: &[Listener], listener: &Listener) -> Result<(), Invalid> {
    for (j, other) in before.iter().enumerate() {
        if other.name == listener.name {
            return Err(invalid(
                format!("{field}.name"),
                format!("{:?} is already the name of listeners[{j}]", listener.name),
            ));
        }
        if other.port != listener.port {
            continue;
        }
        if other.protocol != listener.protocol {
            return Err(invalid(
                format!("{field}.protocol"),
                format!(
                    "port {} is already listeners[{j}]'s, with another protocol: the \
                     listeners of one port share its protocol",
                    listener.port
                ),
            ));
        }
        if other.hostname == listener.hostname {
            return Err(invalid(
                format!("{field}.hostname"),
                format!(
                    "listeners[{j}] already serves {} on port {}",
                    listener.hostname.as_deref().unwrap_or("every host"),
                    listener.port
                ),
            ));
        }
    }
    Ok(())
}

fn not_yet(field: String, what: &str) -> Invalid {
    invalid(field, format!("not supported by weft yet: {what}"))
}

#[cfg(test)]
mod tests;
