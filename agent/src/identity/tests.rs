//! SPIFFE ids, and `leaf_facts`, the one reader of a leaf certificate's identity (HBONE's
//! verifiers and the certificate manager both rely on it; docs/hbone.md, "Verification").

use rcgen::{KeyUsagePurpose, SanType};
use time::OffsetDateTime;

use super::*;
use crate::test_util::TestCa;

#[test]
fn spiffe_ids_round_trip() {
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .unwrap();
    assert_eq!(id.namespace(), "default");
    assert_eq!(id.service_account(), "client");
    assert_eq!(
        id.to_string(),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        SpiffeId::new("cluster.local", "default", "client").unwrap(),
        id
    );
}

#[test]
fn malformed_spiffe_ids_are_rejected() {
    for bad in [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe:///ns/a/sa/b",
        "spiffe://cluster.local/ns/A/sa/b",
    ] {
        assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
    }
}

#[test]
fn leaf_facts_reads_identity_validity_and_serial() {
    let ca = TestCa::new("facts CA");
    let id = client();
    let not_before = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
    let not_after = not_before + time::Duration::days(2);
    let cert = ca.issue_valid(&id, not_before, not_after);
    let leaf = &cert.certified_key.cert[0];
    let facts = leaf_facts(leaf).unwrap();
    assert_eq!(facts.identity, id);
    assert_eq!(facts.not_before, unix(1_900_000_000));
    assert_eq!(facts.not_after, unix(1_900_000_000 + 2 * 86_400));
    assert_eq!(facts.serial, cert.serial);
    assert!(!facts.serial.is_empty());
}

#[test]
fn leaf_facts_requires_exactly_one_uri_san() {
    let ca = TestCa::new("facts CA");
    let id = client();
    let two = ca.issue_raw(&id, |params| {
        params
            .subject_alt_names
            .push(uri("spiffe://cluster.local/ns/default/sa/admin"));
    });
    assert_invalid(&two.0, "expected exactly one URI SAN, found 2");
    let none = ca.issue_raw(&id, |params| {
        params.subject_alt_names = vec![SanType::DnsName("client.default.svc".try_into().unwrap())];
    });
    assert_invalid(&none.0, "expected exactly one URI SAN, found 0");
    let no_extension = ca.issue_raw(&id, |params| params.subject_alt_names.clear());
    assert_invalid(&no_extension.0, "no subject alternative name");
    // A DNS name beside the one URI is not an identity: the URI still is.
    let with_dns = ca.issue_raw(&id, |params| {
        params
            .subject_alt_names
            .push(SanType::DnsName("client.default.svc".try_into().unwrap()));
    });
    assert_eq!(leaf_facts(&with_dns.0).unwrap().identity, id);
}

#[test]
fn leaf_facts_refuses_a_uri_san_that_is_not_a_spiffe_id() {
    let ca = TestCa::new("facts CA");
    for (san, why) in [
        (
            "https://cluster.local/ns/default/sa/client",
            "must start with spiffe://",
        ),
        ("spiffe://cluster.local/default/client", "path must be"),
        (
            "spiffe://Cluster.Local/ns/default/sa/client",
            "trust domain must be",
        ),
    ] {
        let (leaf, _) = ca.issue_raw(&client(), |params| {
            params.subject_alt_names = vec![uri(san)];
        });
        let err = leaf_facts(&leaf).err().expect("refused");
        assert!(
            matches!(&err, Error::InvalidSpiffeId(e) if e.id == san && e.reason.contains(why)),
            "{san}: {err}"
        );
    }
}

#[test]
fn leaf_facts_requires_a_signing_key_usage() {
    let ca = TestCa::new("facts CA");
    for usages in [
        vec![KeyUsagePurpose::KeyEncipherment],
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ],
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
    ] {
        let (leaf, _) = ca.issue_raw(&client(), |params| params.key_usages = usages.clone());
        assert_invalid(&leaf, "is not a workload's");
    }
    // Signing only, as weft's CA issues it; and no key usage at all (any use, RFC 5280).
    for usages in [vec![KeyUsagePurpose::DigitalSignature], vec![]] {
        let (leaf, _) = ca.issue_raw(&client(), |params| params.key_usages = usages.clone());
        assert_eq!(leaf_facts(&leaf).unwrap().identity, client());
    }
}

#[test]
fn leaf_facts_refuses_what_is_not_a_certificate() {
    let der = CertificateDer::from(b"\x30\x03\x02\x01\x01".to_vec());
    assert!(matches!(
        leaf_facts(&der),
        Err(Error::InvalidCertificate(_))
    ));
}

#[track_caller]
fn assert_invalid(leaf: &CertificateDer<'_>, message: &str) {
    match leaf_facts(leaf) {
        Err(Error::InvalidCertificate(m)) => assert!(m.contains(message), "{m}"),
        Err(other) => panic!("expected InvalidCertificate({message:?}), got {other}"),
        Ok(facts) => panic!("accepted, as {}", facts.identity),
    }
}

fn client() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "client").unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}
