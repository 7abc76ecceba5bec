//! The Gateway API conversion (`source::gateway::route`): one `HTTPRoute` or `GRPCRoute`
//! manifest, as JSON, into the waypoint's route. The file source and the Kubernetes source
//! both hand it manifests they have not checked (`routes:` items, watched objects).
//!
//! Any input must give a route or an error naming a field, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::source::gateway;

fuzz_target!(|data: &[u8]| {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Err(e) = gateway::route("routes[0]", &object, "default") {
        assert!(
            e.field.starts_with("routes[0]"),
            "an error names a field of the route: {e}"
        );
    }
});
