//! The waypoint's access log: one JSON line per request on stdout (through
//! `telemetry::AccessLog`), with Istio/ztunnel field names.

use serde::Serialize;

/// One request, as its access-log line shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Always `access`.
    pub kind: &'static str,
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// RFC 3339, UTC, milliseconds.
    pub start_time: String,
    pub method: String,
    pub path: String,
    pub authority: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    pub response_code: u16,
    pub grpc_status: Option<String>,
    pub response_flags: &'static str,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    pub duration_ms: u64,
    /// `ip:port` of the endpoint the last try went to.
    pub upstream_host: Option<String>,
    #[serde(rename = "src.identity")]
    pub src_identity: String,
    #[serde(rename = "src.addr")]
    pub src_addr: String,
    #[serde(rename = "dst.service")]
    pub dst_service: Option<String>,
    #[serde(rename = "dst.workload")]
    pub dst_workload: Option<String>,
    /// `namespace/name` of the route, if one routed the request.
    pub route: Option<String>,
    /// Tries after the first.
    pub retries: u32,
    pub trace_id: String,
    pub traceparent: String,
    pub user_agent: Option<String>,
    /// `namespace/name` of the policy that denied the request.
    #[serde(rename = "policy.name")]
    pub policy_name: Option<String>,
    /// Stable reason when the waypoint failed the request.
    pub error: Option<&'static str>,
    pub error_detail: Option<String>,
}
