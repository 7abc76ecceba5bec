use std::{fs, time::Duration};

use tokio::time::{Instant, sleep_until};

use super::*;
use crate::{
    ca::tests::{TestCa, TestRoot},
    identity::CaSource,
};

fn id(trust_domain: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, ns, sa).unwrap()
}

fn in_process(root: &TestRoot, lifetime: Duration) -> CertManager {
    let config = identity::Config {
        cert_lifetime: lifetime,
        ca: CaSource::InProcess {
            cert: root.cert.clone(),
            key: root.key.clone(),
            trusted_roots: Vec::new(),
        },
        ..identity::Config::default()
    };
    identity::start(&config).unwrap().unwrap()
}

fn failures(manager: &CertManager) -> u32 {
    manager.status()[0].failures
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life() {
    let root = TestRoot::new();
    let manager = in_process(&root, Duration::from_secs(10));
    let client = id("cluster.local", "default", "client");
    manager.set_wanted([client.clone()].into());
    let start = Instant::now();
    let first = manager
        .wait_for(&client, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(manager.ready());
    let status = manager.status();
    assert_eq!(status[0].state, CertState::Valid);
    assert_eq!(status[0].serial.as_deref(), Some(first.serial.as_str()));

    // Issued with a 1 s backdate and whole-second validity: half life is 3.5–4.5 s away.
    sleep_until(start + Duration::from_secs(3)).await;
    let same = manager.certificate(&client).unwrap();
    assert_eq!(same.serial, first.serial);

    sleep_until(start + Duration::from_millis(5_000)).await;
    let renewed = manager.certificate(&client).unwrap();
    assert_ne!(renewed.serial, first.serial);
    assert!(renewed.not_after >= first.not_after);
    // The old certificate is still whole for whoever holds it (an established connection).
    assert_eq!(first.identity, client);
    assert_eq!(manager.status()[0].failures, 0);
}

#[tokio::test(start_paused = true)]
async fn retries_with_exponential_backoff_capped_at_30s() {
    let root = TestRoot::new();
    let manager = in_process(&root, Duration::from_secs(60));
    // The in-process CA is for cluster.local: every attempt fails.
    let foreign = id("example.org", "default", "client");
    manager.set_wanted([foreign.clone()].into());
    let start = Instant::now();
    let at = |ms: u64| sleep_until(start + Duration::from_millis(ms));

    // Attempts at 0, then after 1, 2, 4, 8, 16, 30, 30 s, each up to 10 % early.
    at(500).await;
    assert_eq!(failures(&manager), 1);
    at(1_050).await;
    assert_eq!(failures(&manager), 2);
    at(2_600).await;
    assert_eq!(failures(&manager), 2);
    at(3_050).await;
    assert_eq!(failures(&manager), 3);
    at(6_200).await;
    assert_eq!(failures(&manager), 3);
    at(7_050).await;
    assert_eq!(failures(&manager), 4);
    at(100_000).await;
    assert_eq!(failures(&manager), 8, "the backoff is capped at 30 s");

    let status = &manager.status()[0];
    assert_eq!(
        status.state,
        CertState::Failed {
            reason: "wrong_trust_domain".into()
        }
    );
    assert!(status.serial.is_none());
    assert!(!manager.ready());
    let err = manager
        .wait_for(&foreign, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("trust domain"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn forgets_identities_no_longer_wanted() {
    let root = TestRoot::new();
    let manager = in_process(&root, Duration::from_secs(60));
    let client = id("cluster.local", "default", "client");
    let server = id("cluster.local", "default", "server");
    manager.set_wanted([client.clone(), server.clone()].into());
    manager.wait_ready().await;
    assert!(manager.certificate(&server).is_some());

    manager.set_wanted([client.clone()].into());
    assert!(manager.certificate(&server).is_none());
    assert!(manager.certificate(&client).is_some());
    assert_eq!(manager.status().len(), 1);
    assert!(matches!(
        manager.wait_for(&server, Duration::from_secs(1)).await,
        Err(Error::NotWanted { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn never_returns_an_expired_certificate() {
    let root = TestRoot::new();
    let manager = in_process(&root, Duration::from_secs(3600));
    let client = id("cluster.local", "default", "client");
    manager.set_wanted([client.clone()].into());
    let cert = manager
        .wait_for(&client, Duration::from_secs(1))
        .await
        .unwrap();

    // Pretend renewal failed for the whole second half: the certificate is past not_after.
    let expired = WorkloadCert {
        identity: cert.identity.clone(),
        certified_key: Arc::clone(&cert.certified_key),
        not_before: cert.not_before,
        not_after: SystemTime::now() - Duration::from_secs(1),
        serial: cert.serial.clone(),
    };
    manager.inner.lock().entries.get_mut(&client).unwrap().cert = Some(Arc::new(expired));
    assert!(manager.certificate(&client).is_none());
    assert!(!manager.ready());
    assert_eq!(
        manager.status()[0].state,
        CertState::Failed {
            reason: "expired".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn status_serializes_camel_case_with_rfc3339_times() {
    let root = TestRoot::new();
    let manager = in_process(&root, Duration::from_secs(60));
    let client = id("cluster.local", "default", "client");
    manager.set_wanted([client.clone()].into());
    manager.wait_ready().await;
    let json = serde_json::to_value(manager.status()).unwrap();
    let entry = &json[0];
    assert_eq!(entry["identity"], client.to_string());
    assert_eq!(entry["state"], "valid");
    assert!(entry["notAfter"].as_str().unwrap().ends_with('Z'));
    assert!(entry["renewAt"].is_string());
    assert!(entry["lastError"].is_null());
}

#[tokio::test]
async fn remote_issuer_recovers_once_the_token_appears() {
    let ca = TestCa::start().await;
    let token_file = ca.root.dir.path().join("node.token");
    let config = identity::Config {
        cert_lifetime: Duration::from_secs(600),
        ca: CaSource::Remote {
            addr: ca.addr.to_string(),
            server_name: "127.0.0.1".into(),
            root_cert: ca.root.cert.clone(),
            token_file: token_file.clone(),
        },
        ..identity::Config::default()
    };
    let manager = identity::start(&config).unwrap().unwrap();
    // Before any certificate: the configured root is the trust bundle.
    assert_eq!(manager.trust_bundle().roots.len(), 1);
    let client = id("cluster.local", "default", "client");
    manager.set_wanted([client.clone()].into());

    let err = manager
        .wait_for(&client, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
    assert_eq!(
        manager.status()[0].state,
        CertState::Failed {
            reason: "token_unreadable".into()
        }
    );

    fs::write(&token_file, &ca.token_a).unwrap();
    let cert = manager
        .wait_for(&client, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(cert.identity, client);
    assert!(manager.ready());
    assert_eq!(manager.status()[0].last_error, None);
}
