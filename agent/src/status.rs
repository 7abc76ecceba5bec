//! `weft status`: asks the agent's admin API for `/status` and prints it for people (or as
//! JSON). Works from the agent's network namespace (the admin port is on localhost).

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the agent's admin API at {addr}: {source} (is `weft agent` running in this network namespace?)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bad answer from the agent's admin API: {0}")]
    BadResponse(String),
}

/// Fetches `/status` from the admin API.
pub fn fetch(admin: SocketAddr) -> Result<Value, Error> {
    let body = http_get(admin, "/status")?;
    serde_json::from_str(&body).map_err(|e| Error::BadResponse(e.to_string()))
}

/// A minimal HTTP/1.1 GET, enough for the agent's own admin API.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, Error> {
    let connect = |source| Error::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(connect)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(connect)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(connect)?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(connect)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::BadResponse("no header terminator".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(Error::BadResponse(format!("{status}: {}", body.trim())));
    }
    Ok(body.to_owned())
}

/// Renders `/status` for a terminal.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let node = status["node"].as_str().unwrap_or("?");
    let ready = if status["ready"].as_bool() == Some(true) {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(out, "node {node}: {ready}");
    if let Some(pending) = status["pending"].as_object() {
        for (condition, reason) in pending {
            let _ = writeln!(
                out,
                "  pending {condition}: {}",
                reason.as_str().unwrap_or("?")
            );
        }
    }
    let config = &status["config"];
    let _ = writeln!(
        out,
        "config: generation {}, {} rejected",
        config["generation"], config["rejected_total"]
    );
    if let Some(rejection) = config["last_rejection"].as_str() {
        let _ = writeln!(
            out,
            "  last change REJECTED (previous config in force): {rejection}"
        );
    }
    if let Some(fields) = config["restart_pending"]
        .as_array()
        .filter(|f| !f.is_empty())
    {
        let fields: Vec<&str> = fields.iter().filter_map(|f| f.as_str()).collect();
        let _ = writeln!(
            out,
            "  RESTART PENDING: changed since start-up, not applied: {}",
            fields.join(", ")
        );
    }

    let _ = writeln!(out, "\nenrolled pods:");
    let pods = status["pods"]["enrolled"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if pods.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for pod in &pods {
        let ips: Vec<&str> = pod["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "  {}  id={} sa={} ips={} netns={} cookie={}",
            pod["pod"].as_str().unwrap_or("?"),
            pod["pod_id"],
            pod["service_account"].as_str().unwrap_or("?"),
            ips.join(","),
            pod["netns"].as_str().unwrap_or("?"),
            pod["netns_cookie"]
        );
        if pod["client_address"] == Value::Bool(false) {
            let _ = writeln!(
                out,
                "      its application sees the pod's own address, not its mesh clients' \
                 (no reply routing in the pod: see the agent's log)"
            );
        }
        for listener in pod["listeners"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "      {:<9} {}",
                listener["direction"].as_str().unwrap_or("?"),
                listener["addr"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(failed) = status["pods"]["failed"]
        .as_object()
        .filter(|f| !f.is_empty())
    {
        let _ = writeln!(out, "\npods NOT enrolled (traffic blocked until fixed):");
        for (pod, reason) in failed {
            let _ = writeln!(out, "  {pod}: {}", reason.as_str().unwrap_or("?"));
        }
    }

    if status["mtls"].as_bool() == Some(true) {
        let _ = writeln!(out, "\ncertificates (mutual TLS on):");
        let certs = status["certificates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if certs.is_empty() {
            let _ = writeln!(out, "  (none wanted yet)");
        }
        for cert in &certs {
            let text = |key: &str| cert[key].as_str().unwrap_or("-").to_string();
            let _ = writeln!(
                out,
                "  {}  {}  serial {}  expires {}  renews {}{}",
                text("identity"),
                text("state"),
                text("serial"),
                text("notAfter"),
                text("renewAt"),
                cert["lastError"]
                    .as_str()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
        let pool = &status["hbone_pool"];
        let _ = writeln!(
            out,
            "HBONE pool: {} connections, {} streams open; {} handshakes, {} failed",
            pool["connections"], pool["streams"], pool["handshakes"], pool["handshake_failures"]
        );
    } else {
        let _ = writeln!(
            out,
            "\nmutual TLS OFF (no CA configured): pod-to-pod traffic is plaintext"
        );
    }

    let _ = writeln!(
        out,
        "\nconnections: {} active; closed by outcome: {}",
        status["connections"]["active"], status["connections"]["closed_total"]
    );
    let _ = writeln!(out, "\neBPF maps and counters:");
    let dataplane = serde_json::to_string_pretty(&status["dataplane"]).unwrap_or_default();
    for line in dataplane.lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

const TIMEOUT: Duration = Duration::from_secs(5);
