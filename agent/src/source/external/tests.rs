use serde_json::{Value, json};

use super::*;
use crate::source::syntax::decode;

/// A self-signed CA certificate, as PEM.
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["ca.example.test".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

fn read(spec: Value) -> Result<ExternalService, Invalid> {
    let field = "externalServices[2]";
    let spec: ExternalServiceSpec = decode(field, &spec)?;
    service(field, WorkloadRef::new("egress", "api"), spec)
}

/// A valid spec with `port` as its only port.
fn with_port(port: Value) -> Value {
    json!({"hosts": ["api.example.test"], "ports": [port]})
}

#[test]
fn a_spec_gets_its_defaults_and_normal_forms() {
    let ca = ca_pem();
    let s = read(json!({
        "hosts": ["API.Example.test.", "b.example.test"],
        "ports": [
            {"number": 443, "name": "https", "protocol": "HTTPS"},
            {"number": 80, "protocol": "HTTP", "targetPort": 443,
             "tls": {"caCertificates": ca}},
            {"number": 5432, "tls": {"sni": "DB.example.test"}},
        ],
    }))
    .unwrap();
    assert_eq!(s.hosts, ["api.example.test", "b.example.test"]);
    assert_eq!(s.resolution, Resolution::Dns);
    assert!(s.addresses.is_empty());
    assert_eq!(
        s.ports[0],
        ExternalPort {
            number: 443,
            name: "https".into(),
            protocol: Protocol::Https,
            target_port: 443,
            tls: None,
        }
    );
    assert_eq!(s.ports[1].target_port, 443);
    let tls = s.ports[1].tls.as_ref().unwrap();
    assert_eq!(tls.sni, "api.example.test", "the first host by default");
    assert_eq!(tls.ca_certificates.as_deref(), Some(ca.as_str()));
    assert_eq!(s.ports[2].protocol, Protocol::Tcp);
    assert_eq!(s.ports[2].tls.as_ref().unwrap().sni, "db.example.test");

    let s = read(json!({
        "hosts": ["db.internal"], "resolution": "STATIC",
        "addresses": ["192.0.2.10", "2001:db8::10"], "ports": [{"number": 5432}],
    }))
    .unwrap();
    assert_eq!(s.resolution, Resolution::Static);
    assert_eq!(s.addresses.len(), 2);
}

#[test]
fn errors_name_the_field() {
    let many = |n: usize, f: &dyn Fn(usize) -> Value| (0..n).map(f).collect::<Vec<_>>();
    let long_label = format!("{}.test", "a".repeat(64));
    let long_name = format!("{}test", "abcdefghi.".repeat(25));
    let cases = [
        (json!({"hosts": [], "ports": [{"number": 80}]}), "hosts"),
        (
            json!({"hosts": many(17, &|i| json!(format!("h{i}.test"))), "ports": [{"number": 80}]}),
            "hosts",
        ),
        (
            json!({"hosts": ["a_b.test"], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": ["-a.test"], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": ["a..test"], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": ["."], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": [long_label], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": [long_name], "ports": [{"number": 80}]}),
            "hosts[0]",
        ),
        (
            json!({"hosts": ["a.test", "A.test."], "ports": [{"number": 80}]}),
            "hosts[1]",
        ),
        (json!({"hosts": ["a.test"], "ports": []}), "ports"),
        (
            json!({"hosts": ["a.test"], "ports": many(17, &|i| json!({"number": i + 1}))}),
            "ports",
        ),
        (with_port(json!({"number": 0})), "ports[0].number"),
        (with_port(json!({"number": 70000})), "ports[0].number"),
        (
            with_port(json!({"number": 80, "targetPort": 0})),
            "ports[0].targetPort",
        ),
        (
            with_port(json!({"number": 80, "name": "Web!"})),
            "ports[0].name",
        ),
        (
            with_port(json!({"number": 80, "protocol": "UDP"})),
            "ports[0].protocol",
        ),
        (with_port(json!({"number": 80, "weight": 1})), "ports[0]"),
        (
            json!({"hosts": ["a.test"], "ports": [{"number": 80}, {"number": 81}, {"number": 80}]}),
            "ports[2].number",
        ),
        (
            with_port(json!({"number": 443, "protocol": "TLS", "tls": {}})),
            "ports[0].tls",
        ),
        (
            with_port(json!({"number": 80, "tls": {"sni": "*.example.test"}})),
            "ports[0].tls.sni",
        ),
        (
            with_port(json!({"number": 80, "tls": {"sni": "10.0.0.1"}})),
            "ports[0].tls.sni",
        ),
        (
            json!({"hosts": ["a.test"], "addresses": ["192.0.2.1"], "ports": [{"number": 80}]}),
            "addresses",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "STATIC", "ports": [{"number": 80}]}),
            "addresses",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "STATIC",
                   "addresses": many(65, &|i| json!(format!("10.0.0.{i}"))), "ports": [{"number": 80}]}),
            "addresses",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "STATIC",
                   "addresses": ["10.0.0.1", "10.0.0.300"], "ports": [{"number": 80}]}),
            "addresses[1]",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "STATIC",
                   "addresses": ["10.0.0.1", "10.0.0.1"], "ports": [{"number": 80}]}),
            "addresses[1]",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "STATIC",
                   "addresses": ["0.0.0.0"], "ports": [{"number": 80}]}),
            "addresses[0]",
        ),
        (
            json!({"hosts": ["a.test"], "resolution": "SOMETIMES", "ports": [{"number": 80}]}),
            "resolution",
        ),
        (
            json!({"hosts": ["a.test"], "ports": [{"number": 80}], "location": "x"}),
            "",
        ),
    ];
    for (spec, field) in cases {
        let want = match field {
            "" => "externalServices[2]".to_owned(),
            field => format!("externalServices[2].{field}"),
        };
        let e = read(spec.clone()).unwrap_err();
        assert_eq!(e.field, want, "{spec}: {e}");
    }
}

#[test]
fn a_wildcard_or_an_address_as_host_says_what_to_write_instead() {
    let e = read(json!({"hosts": ["*.example.test"], "ports": [{"number": 443}]})).unwrap_err();
    assert_eq!(e.field, "externalServices[2].hosts[0]");
    assert!(
        e.reason.contains("wildcard") && e.reason.contains("resolves every host"),
        "{e}"
    );
    for address in ["203.0.113.7", "2001:db8::7", "[2001:db8::7]"] {
        let e =
            read(json!({"hosts": ["a.test", address], "ports": [{"number": 443}]})).unwrap_err();
        assert_eq!(e.field, "externalServices[2].hosts[1]");
        assert!(
            e.reason.contains("resolution STATIC") && e.reason.contains("addresses"),
            "{e}"
        );
    }
    let e = read(with_port(
        json!({"number": 443, "protocol": "HTTPS", "tls": {}}),
    ))
    .unwrap_err();
    assert!(e.reason.contains("already speaks TLS"), "{e}");
}

#[test]
fn ca_certificates_must_be_certificates() {
    let field = "externalServices[2].ports[0].tls.caCertificates";
    let ca = ca_pem();
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let garbled = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
    let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    let too_big = ca.repeat(MAX_CA_BYTES / ca.len() + 1);
    let cases = [
        ("", "no PEM certificate"),
        ("just text", "no PEM certificate"),
        (garbled, "PEM block 0"),
        (not_der, "not an X.509 certificate"),
        (&format!("{ca}{key}"), "PEM block 1 is not a CERTIFICATE"),
        (&too_big, "at most 65536"),
    ];
    for (pem, says) in cases {
        let e = read(with_port(
            json!({"number": 80, "tls": {"caCertificates": pem}}),
        ))
        .unwrap_err();
        assert_eq!(e.field, field, "{pem}");
        assert!(e.reason.contains(says), "{says}: {e}");
    }
    // Two certificates (a bundle) are fine.
    let bundle = format!("{ca}{}", ca_pem());
    read(with_port(
        json!({"number": 80, "tls": {"caCertificates": bundle}}),
    ))
    .unwrap();
}

#[test]
fn at_most_256_services_per_snapshot() {
    total("externalServices", MAX_SERVICES).unwrap();
    let e = total("externalServices", MAX_SERVICES + 1).unwrap_err();
    assert_eq!(e.field, "externalServices");
    assert!(e.reason.contains("at most 256"), "{e}");
}
