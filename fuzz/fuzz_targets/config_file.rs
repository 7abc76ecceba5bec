//! The agent's config file as bytes: the whole local state file (`source::file::parse`:
//! `agent:`, `mesh:`, workloads, services, policies, waypoints, namespaces, routes, traffic
//! policies with their end-user authentication, external services with their TLS
//! origination and CA certificates), the
//! Kubernetes-mode variant (`parse_settings`), and for a file that parses, the start-up
//! config built from its `agent:` section (`config::Config::new`).
//!
//! Any input must give `Ok` or an `Err`, never a panic, a hang or unbounded memory; an
//! accepted file must give the same snapshot when parsed again.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use weft::{
    config::{Config, Overrides},
    source::file,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    if let Ok(doc) = file::parse(path, text) {
        let again = file::parse(path, text).expect("a file accepted once is accepted again");
        assert_eq!(doc, again, "parsing is deterministic");
        let _ = Config::new(path, &doc.agent, Overrides::default());
    }
    let _ = file::parse_settings(path, text);
});
