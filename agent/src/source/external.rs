//! `weft.dev/v1alpha1 ExternalService` specs → `state::ExternalService`: the one validation,
//! shared by the local file (`externalServices:` items) and the Kubernetes source (watched
//! objects). Errors name the field below the caller's prefix
//! (`externalServices[2].ports[0].tls.caCertificates`, `spec.hosts[1]`).
//!
//! Hosts are DNS names the agent resolves itself, so a wildcard (which no resolver can
//! answer) and an IP address (which needs no resolving: `resolution: STATIC`) are refused
//! with a message that says what to write instead. TLS origination is for ports where the
//! application speaks plaintext; a port that already carries TLS is passed through.

use std::{collections::HashSet, net::IpAddr};

use crate::{
    source::{
        gateway::{at, certificate},
        kube::crd::{ExternalPortSpec, ExternalServiceSpec, TlsOriginationSpec},
        syntax::{self, Invalid},
    },
    state::{
        ExternalPort, ExternalService, Resolution, TlsOrigination, WorkloadRef, external::Protocol,
    },
};

/// Most external services one snapshot holds: the node proxy looks each connection's
/// destination up among their addresses, and the eBPF registry has a fixed size.
pub const MAX_SERVICES: usize = 256;

/// Most hosts of one service (the CRD's `maxItems`, enforced here for the file too).
const MAX_HOSTS: usize = 16;
/// Most ports of one service.
const MAX_PORTS: usize = 16;
/// Most static addresses of one service.
const MAX_ADDRESSES: usize = 64;
/// Largest `caCertificates`: a few CA bundles, not a system trust store.
const MAX_CA_BYTES: usize = 64 * 1024;
/// Longest DNS name (RFC 1035, without the trailing dot) and label.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Validates the `spec` (found at `field`) of the external service `name`.
pub fn service(
    field: &str,
    name: WorkloadRef,
    spec: ExternalServiceSpec,
) -> Result<ExternalService, Invalid> {
    let hosts = hosts(&at(field, "hosts"), &spec.hosts)?;
    // `hosts` checked that there is one.
    let first_host = hosts.first().map_or("", String::as_str);
    let addresses = addresses(field, spec.resolution, &spec.addresses)?;
    let ports_field = at(field, "ports");
    count(&ports_field, spec.ports.len(), MAX_PORTS, "ports")?;
    let mut ports: Vec<ExternalPort> = Vec::with_capacity(spec.ports.len());
    for (i, raw) in spec.ports.into_iter().enumerate() {
        let field = format!("{ports_field}[{i}]");
        let port = port(&field, raw, first_host)?;
        if let Some(j) = ports.iter().position(|p| p.number == port.number) {
            return Err(invalid(
                at(&field, "number"),
                format!(
                    "port {} is listed already ({ports_field}[{j}])",
                    port.number
                ),
            ));
        }
        ports.push(port);
    }
    Ok(ExternalService {
        name,
        hosts,
        ports,
        resolution: spec.resolution,
        addresses,
    })
}

/// Checks that `n` external services fit in one snapshot; `field` is their list.
pub fn total(field: &str, n: usize) -> Result<(), Invalid> {
    if n > MAX_SERVICES {
        return Err(invalid(
            field.into(),
            format!("{n} external services: at most {MAX_SERVICES} per snapshot"),
        ));
    }
    Ok(())
}

/// A DNS name as weft resolves it: lower case, no trailing dot, RFC 1123 labels.
pub fn dns_name(field: &str, text: &str) -> Result<String, Invalid> {
    if text.contains('*') {
        return Err(invalid(
            field.into(),
            format!(
                "{text:?}: a wildcard cannot be resolved, and weft resolves every host to \
                 recognise its connections; list each name"
            ),
        ));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            field.into(),
            format!(
                "{text:?} is an IP address, not a host name: use resolution STATIC and list it in addresses"
            ),
        ));
    }
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= MAX_LABEL
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.split('.').all(label_ok) {
        return Err(invalid(
            field.into(),
            format!(
                "{text:?} is not a DNS name (labels of letters, digits and '-', at most \
                 {MAX_LABEL} characters each and {MAX_NAME} in all)"
            ),
        ));
    }
    Ok(name)
}

fn hosts(field: &str, raw: &[String]) -> Result<Vec<String>, Invalid> {
    count(field, raw.len(), MAX_HOSTS, "hosts")?;
    let mut hosts: Vec<String> = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let host = dns_name(&field, text)?;
        if hosts.contains(&host) {
            return Err(invalid(field, format!("{host} is listed already")));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

fn addresses(field: &str, resolution: Resolution, raw: &[String]) -> Result<Vec<IpAddr>, Invalid> {
    let list = at(field, "addresses");
    match resolution {
        Resolution::Dns if !raw.is_empty() => Err(invalid(
            list,
            "only with resolution STATIC (with DNS, the agent resolves the hosts)".into(),
        )),
        Resolution::Dns => Ok(Vec::new()),
        Resolution::Static => {
            count(&list, raw.len(), MAX_ADDRESSES, "addresses")?;
            let mut addresses: HashSet<IpAddr> = HashSet::with_capacity(raw.len());
            raw.iter()
                .enumerate()
                .map(|(i, text)| {
                    let field = format!("{list}[{i}]");
                    let ip = syntax::ip(&field, text)?;
                    // No connection goes to these: a typo, not an address.
                    if ip.is_unspecified() || ip.is_multicast() {
                        return Err(invalid(field, format!("{ip} is not a host's address")));
                    }
                    if !addresses.insert(ip) {
                        return Err(invalid(field, format!("{ip} is listed already")));
                    }
                    Ok(ip)
                })
                .collect()
        }
    }
}

fn port(field: &str, raw: ExternalPortSpec, first_host: &str) -> Result<ExternalPort, Invalid> {
    let number = syntax::port(&at(field, "number"), raw.number)?;
    let target_port = syntax::port(
        &at(field, "targetPort"),
        raw.target_port.unwrap_or(raw.number),
    )?;
    let name = match raw.name.is_empty() {
        true => raw.name,
        false => syntax::name(&at(field, "name"), raw.name)?,
    };
    let tls = raw
        .tls
        .map(|tls| origination(&at(field, "tls"), raw.protocol, tls, first_host))
        .transpose()?;
    Ok(ExternalPort {
        number,
        name,
        protocol: raw.protocol,
        target_port,
        tls,
    })
}

fn origination(
    field: &str,
    protocol: Protocol,
    raw: TlsOriginationSpec,
    first_host: &str,
) -> Result<TlsOrigination, Invalid> {
    if matches!(protocol, Protocol::Tls | Protocol::Https) {
        return Err(invalid(
            field.into(),
            format!(
                "the port's protocol is {}: the application already speaks TLS, which weft \
                 passes through; TLS origination is for TCP or HTTP ports",
                if protocol == Protocol::Tls {
                    "TLS"
                } else {
                    "HTTPS"
                }
            ),
        ));
    }
    let sni = match raw.sni {
        Some(sni) => dns_name(&at(field, "sni"), &sni)?,
        None => first_host.to_owned(),
    };
    let ca_certificates = raw
        .ca_certificates
        .map(|pem| ca_certificates(&at(field, "caCertificates"), pem))
        .transpose()?;
    Ok(TlsOrigination {
        sni,
        ca_certificates,
    })
}

/// PEM text holding at least one X.509 certificate and nothing else.
fn ca_certificates(field: &str, pem: String) -> Result<String, Invalid> {
    if pem.len() > MAX_CA_BYTES {
        return Err(invalid(
            field.into(),
            format!("{} bytes: at most {MAX_CA_BYTES}", pem.len()),
        ));
    }
    // A private key pasted here would be stored in the snapshot and shown by the config
    // dump: refused rather than ignored.
    let certificates =
        certificate::pem_certificates(field, pem.as_bytes(), "only CA certificates belong here")?;
    if certificates.is_empty() {
        return Err(invalid(
            field.into(),
            "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        ));
    }
    Ok(pem)
}

/// 1 to `max` entries of `what`.
fn count(field: &str, n: usize, max: usize, what: &str) -> Result<(), Invalid> {
    if n == 0 || n > max {
        return Err(invalid(
            field.into(),
            format!("{n} {what}: expected 1 to {max}"),
        ));
    }
    Ok(())
}

fn invalid(field: String, reason: String) -> Invalid {
    Invalid { field, reason }
}

#[cfg(test)]
mod tests;
