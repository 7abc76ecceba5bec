//! `TestWaypoint`: the real `weft waypoint` running inside a pod of a [`TestNode`], as a
//! Kubernetes waypoint Deployment's pod would: its own netns and cgroup, outside the mesh
//! (the pod is not enrolled: the waypoint owns the pod's 15008), its identity from the
//! node's CA root (in-process, like the test agents'). The process, its state file and its
//! ports are a [`Standalone`]'s.
//!
//! Its state file is the node's agent config (workloads, services, policies, waypoints)
//! plus the routes the test gives, written to `<node dir>/<pod>-waypoint.yaml`; stdout
//! (the JSON access log) and stderr go to `<node dir>/<pod>-waypoint.log`.

use std::{
    ffi::OsString,
    ops::{Deref, DerefMut},
};

use anyhow::Result;
use serde_json::Value;

use crate::{node::TestNode, pod::TestPod, standalone::Standalone};

/// A waypoint process in a pod: a [`Standalone`] (its metrics, config dump, access log,
/// state file) started as `weft waypoint`.
pub struct TestWaypoint {
    proxy: Standalone,
}

impl TestWaypoint {
    /// The pod a waypoint named `name` runs in on `node`: its service account is `name`,
    /// and it is not enrolled (the waypoint owns the pod's 15008).
    pub fn pod(node: &TestNode, name: &str) -> Result<TestPod> {
        node.pod(name)
            .service_account(name)
            .enrolled(false)
            .create()
    }

    /// Starts `weft waypoint` in `pod` as `name` (its service account too), with the
    /// node's config plus `routes` (Gateway API objects), and waits until it is ready.
    pub fn start(node: &TestNode, pod: &TestPod, name: &str, routes: Value) -> Result<Self> {
        Self::start_with_args(node, pod, name, routes, &[])
    }

    /// [`TestWaypoint::start`] with more `weft waypoint` flags (`--otlp-endpoint …`).
    pub fn start_with_args(
        node: &TestNode,
        pod: &TestPod,
        name: &str,
        routes: Value,
        args: &[&str],
    ) -> Result<Self> {
        let namespace = pod.namespace();
        let args: Vec<OsString> = ["--name", name, "--service-account", name]
            .into_iter()
            .chain(["--namespace", namespace.as_str()])
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let sections = serde_json::json!({ "routes": routes });
        let proxy = Standalone::start(node, pod, "waypoint", sections, &args)?;
        Ok(TestWaypoint { proxy })
    }

    /// Rewrites the state file from the node's config and `routes`; the waypoint picks the
    /// change up on its next poll.
    pub fn write_config(&self, node: &TestNode, routes: Value) -> Result<()> {
        self.write_sections(node, serde_json::json!({ "routes": routes }))
    }
}

impl Deref for TestWaypoint {
    type Target = Standalone;

    fn deref(&self) -> &Standalone {
        &self.proxy
    }
}

impl DerefMut for TestWaypoint {
    fn deref_mut(&mut self) -> &mut Standalone {
        &mut self.proxy
    }
}

/// A Gateway API route of `kind` (`HTTPRoute`, `GRPCRoute`) named `name` in `default`,
/// attached to port `port` of the Service `service` there (GAMMA), with these `rules`:
/// what a waypoint's state file lists under `routes:`.
pub fn route(kind: &str, name: &str, service: &str, port: u16, rules: Value) -> Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": service, "port": port }],
            "rules": rules,
        },
    })
}
