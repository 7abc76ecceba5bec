//! weft: a sidecarless service mesh. This crate is the one binary a cluster needs (agent,
//! CA, CNI plugin and installer, status, uninstall; later the waypoint); the library target
//! exists so the end-to-end test
//! crate and benchmarks can reuse its types.

pub mod admin;
pub mod app;
pub mod ca;
pub mod cli;
pub mod cni;
pub mod config;
pub mod dns;
pub mod drain;
pub mod ebpf;
pub mod enroll;
pub mod handover;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod jwt;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod report;
pub mod settings;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod uninstall;
pub mod waypoint;
pub mod web_roots;

#[cfg(test)]
mod test_util;
