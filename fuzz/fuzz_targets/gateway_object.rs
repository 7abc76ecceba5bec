//! The ingress gateway's objects (`source::gateway::listeners::gateway` and
//! `source::gateway::certificate::certificate`): one `Gateway` or `Secret` manifest, as
//! JSON. The file source and a gateway's Kubernetes source hand them manifests they have
//! not checked, and a Secret's PEM and key are parsed and loaded.
//!
//! Any input must give a Gateway (or `None`, another class), a certificate, or an error
//! naming a field, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::source::gateway::{certificate, listeners};

fuzz_target!(|data: &[u8]| {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match listeners::gateway("gateways[0]", &object, "default") {
        Ok(Some(gateway)) => {
            assert!(!gateway.listeners.is_empty(), "a Gateway has listeners");
            for listener in &gateway.listeners {
                assert!(
                    !listener.allowed_routes.kinds.is_empty(),
                    "every listener admits some kind"
                );
            }
        }
        Ok(None) => {}
        Err(e) => assert!(e.field.starts_with("gateways[0]"), "{e}"),
    }
    match certificate::certificate("secrets[0]", &object, "default") {
        Ok(certificate) => assert!(!certificate.chain.is_empty(), "a chain has a leaf"),
        Err(e) => assert!(e.field.starts_with("secrets[0]"), "{e}"),
    }
});
