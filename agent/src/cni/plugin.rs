//! The CNI plugin as the container runtime runs it: `CNI_COMMAND` and friends in the
//! environment, the network config (with `prevResult`, since weft only chains) on stdin,
//! a result or an error on stdout. Spec: <https://www.cni.dev/docs/spec/> (1.0).
//!
//! Synchronous and small on purpose: it runs once per sandbox, under the runtime's timeout.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use super::{
    Command, DEFAULT_SOCKET, MAX_MESSAGE, MESH_NAMESPACES_FILE, MeshNamespaces, PodInfo, Reply,
    Request,
};
use crate::netns::{PodNetns, reply_route};

/// A CNI error: its spec code and a message for the operator (`kubectl describe pod`
/// shows it in the sandbox failure event).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI version {0} is not supported (weft-cni supports 0.3.0 to 1.1.0)")]
    IncompatibleVersion(String),
    #[error("{name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("cannot read the network config on stdin: {0}")]
    Stdin(#[source] io::Error),
    #[error("cannot parse the network config: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network config: {0}")]
    Config(String),
    #[error("weft agent unreachable at {socket}: {reason}")]
    AgentDown { socket: PathBuf, reason: String },
    #[error("weft agent is not ready: {0}")]
    NotReady(String),
    #[error("weft could not enroll pod {pod}: {reason}")]
    Enroll { pod: String, reason: String },
    #[error("BUG: the weft agent answered {0:?} to this command")]
    BugUnexpectedReply(Reply),
}

/// What the runtime reads back: stdout and the exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
}

/// The process environment, or a map in tests (STYLE: no `set_var`).
pub trait Vars {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real environment.
pub struct ProcessEnv;

impl Vars for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: std::hash::BuildHasher> Vars for std::collections::HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// The plugin's own keys of the network config (next to `type: weft-cni`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: Option<String>,
    /// The agent's socket (default [`DEFAULT_SOCKET`]).
    socket: Option<PathBuf>,
    /// Default: `mesh-namespaces.json` next to the socket.
    mesh_namespaces_file: Option<PathBuf>,
    /// How long to wait for the agent's answer, humantime (default 30s; the agent gives up
    /// enrolling after its own `enrollTimeout`, 20s by default).
    timeout: Option<String>,
    prev_result: Option<Value>,
}

/// Runs one CNI command. Diagnostics go to `log` (stderr: the runtime logs it).
pub fn run(stdin: impl Read, env: &impl Vars, log: &mut impl Write) -> Outcome {
    let version = std::cell::Cell::new(String::from(LATEST));
    let result = command(stdin, env, log, &version);
    match result {
        Ok(stdout) => Outcome { stdout, code: 0 },
        Err(e) => {
            let _ = writeln!(log, "weft-cni: {e}");
            let error = serde_json::json!({
                "cniVersion": version.take(),
                "code": e.code(),
                "msg": e.to_string(),
            });
            Outcome {
                stdout: error.to_string(),
                code: 1,
            }
        }
    }
}

fn command(
    mut stdin: impl Read,
    env: &impl Vars,
    log: &mut impl Write,
    version: &std::cell::Cell<String>,
) -> Result<String, Error> {
    let command = required(env, "CNI_COMMAND")?;
    let mut text = String::new();
    stdin.read_to_string(&mut text).map_err(Error::Stdin)?;
    if command == "VERSION" {
        return Ok(serde_json::json!({
            "cniVersion": LATEST,
            "supportedVersions": SUPPORTED,
        })
        .to_string());
    }
    let conf: NetConf = serde_json::from_str(&text).map_err(Error::Decode)?;
    let conf_version = conf
        .cni_version
        .clone()
        .ok_or_else(|| Error::Config("cniVersion is missing".into()))?;
    if !SUPPORTED.contains(&conf_version.as_str()) {
        return Err(Error::IncompatibleVersion(conf_version));
    }
    version.set(conf_version.clone());
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return Err(Error::Env {
                name: "CNI_COMMAND",
                reason: format!("unknown command {other:?} (ADD, DEL, CHECK, VERSION)"),
            });
        }
    };
    let socket = conf.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let timeout = match conf.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| Error::Config(format!("timeout {text:?}: {e}")))?,
    };
    let container_id = required(env, "CNI_CONTAINERID")?;
    let pod = match pod_info(env) {
        Ok(pod) => pod,
        // DEL must succeed whatever it is given: nothing of ours exists without a pod.
        Err(e) if command == Command::Del => {
            let _ = writeln!(
                log,
                "weft-cni: DEL without pod arguments ({e}): nothing to do"
            );
            return Ok(String::new());
        }
        Err(e) => return Err(e),
    };

    if command == Command::Del {
        let request = Request {
            command,
            pod,
            container_id,
            netns: env
                .var("CNI_NETNS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            ips: Vec::new(),
        };
        // The agent forgets the pod; if it is down it learns from discovery that the pod
        // is gone. Either way the sandbox must be deletable.
        if let Err(e) = ask(&socket, &request, timeout) {
            let _ = writeln!(
                log,
                "weft-cni: DEL of {}: agent not told ({e}); ignored",
                request.pod
            );
        }
        return Ok(String::new());
    }

    let prev_result = conf.prev_result.clone().ok_or_else(|| {
        Error::Config(
            "no prevResult: weft-cni is a chained plugin; list it after the primary CNI in a .conflist"
                .into(),
        )
    })?;
    let netns = PathBuf::from(required(env, "CNI_NETNS")?);
    let mesh_namespaces_file = conf
        .mesh_namespaces_file
        .clone()
        .unwrap_or_else(|| default_mesh_namespaces_file(&socket));
    if command == Command::Add {
        prepare_reply_routing(&netns, &mesh_namespaces_file, &pod, log);
    }
    let request = Request {
        command,
        pod,
        container_id,
        netns: Some(netns),
        ips: ips_of(&prev_result),
    };
    let pod_name = format!("{}/{}", request.pod.namespace, request.pod.name);
    let reply = match ask(&socket, &request, timeout) {
        Ok(reply) => reply,
        Err(AskError::Unreachable(e)) => {
            return agent_down(&socket, &mesh_namespaces_file, &request.pod, &e)
                .map(|()| output(command, prev_result, &conf_version));
        }
        Err(AskError::Broken(e)) => {
            return Err(Error::AgentDown {
                socket,
                reason: format!("{e} (the agent accepted the request but gave no answer)"),
            });
        }
    };
    match reply {
        Reply::Enrolled | Reply::NotInMesh => Ok(output(command, prev_result, &conf_version)),
        Reply::NotReady { reason } => Err(Error::NotReady(reason)),
        Reply::Failed { reason } => Err(Error::Enroll {
            pod: pod_name,
            reason,
        }),
        other @ Reply::Forgotten => Err(Error::BugUnexpectedReply(other)),
    }
}

impl Error {
    /// The CNI spec's error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => 1,
            Self::Env { .. } => 4,
            Self::Stdin(_) => 5,
            Self::Decode(_) => 6,
            Self::Config(_) => 7,
            // "Try again later": the runtime retries the sandbox.
            Self::AgentDown { .. } | Self::NotReady(_) => 11,
            Self::Enroll { .. } => 100,
            Self::BugUnexpectedReply(_) => 999,
        }
    }
}

/// For a pod of a mesh namespace, sets `tcp_fwmark_accept` in its netns: the one part of
/// the pod's reply routing (its application seeing mesh clients' addresses) that needs a
/// writable /proc/sys, which the plugin, root on the host, has and the agent's container
/// may not (docs/datapath.md). Best effort: the agent reports a pod without it in /status.
fn prepare_reply_routing(netns: &Path, file: &Path, pod: &PodInfo, log: &mut impl Write) {
    let in_mesh =
        read_mesh_namespaces(file).is_ok_and(|mesh| mesh.namespaces.contains(&pod.namespace));
    if !in_mesh {
        return;
    }
    let set = PodNetns::open(netns).and_then(|netns| netns.run(reply_route::accept_marks)?);
    if let Err(e) = set {
        let _ = writeln!(
            log,
            "weft-cni: {}/{}: cannot set net.ipv4.tcp_fwmark_accept in {}: {e} (its \
             application will see the pod's own address for mesh clients)",
            pod.namespace,
            pod.name,
            netns.display()
        );
    }
}

/// The agent is unreachable: refuse pods of mesh namespaces, and every pod when the file
/// that says which namespaces those are cannot be read (fail closed).
fn agent_down(socket: &Path, file: &Path, pod: &PodInfo, cause: &io::Error) -> Result<(), Error> {
    let down = |reason: String| Error::AgentDown {
        socket: socket.to_owned(),
        reason,
    };
    let mesh = read_mesh_namespaces(file).map_err(|e| match e {
        MeshFileError::Unreadable(e) => down(format!(
            "{cause}; and {} is unreadable ({e}), so whether namespace {} is in the mesh is unknown: refusing the pod until the agent runs",
            file.display(),
            pod.namespace
        )),
        MeshFileError::Invalid(e) => down(format!(
            "{cause}; and {} is not valid ({e}): refusing the pod until the agent runs",
            file.display()
        )),
    })?;
    if mesh.namespaces.contains(&pod.namespace) {
        return Err(down(format!(
            "{cause}; namespace {} is in the mesh, so its pods wait for the agent",
            pod.namespace
        )));
    }
    Ok(())
}

/// Why the file of mesh namespaces (the agent's, `MESH_NAMESPACES_FILE`) gave no answer.
enum MeshFileError {
    Unreadable(io::Error),
    Invalid(serde_json::Error),
}

fn read_mesh_namespaces(file: &Path) -> Result<MeshNamespaces, MeshFileError> {
    let text = std::fs::read(file).map_err(MeshFileError::Unreadable)?;
    serde_json::from_slice(&text).map_err(MeshFileError::Invalid)
}

/// ADD returns `prevResult` unchanged (in the config's version); CHECK returns nothing.
fn output(command: Command, mut prev_result: Value, version: &str) -> String {
    match command {
        Command::Add => {
            if let Some(obj) = prev_result.as_object_mut() {
                obj.insert("cniVersion".into(), Value::String(version.into()));
            }
            prev_result.to_string()
        }
        Command::Check | Command::Del => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
enum AskError {
    /// Could not connect: the agent is not running (or not listening yet).
    #[error("cannot connect: {0}")]
    Unreachable(io::Error),
    /// Connected but no valid answer.
    #[error("no answer: {0}")]
    Broken(io::Error),
}

fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, AskError> {
    let mut stream = UnixStream::connect(socket).map_err(AskError::Unreachable)?;
    let broken = AskError::Broken;
    stream.set_read_timeout(Some(timeout)).map_err(broken)?;
    stream.set_write_timeout(Some(timeout)).map_err(broken)?;
    let mut line = serde_json::to_vec(request).map_err(|e| broken(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(broken)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64))
        .read_line(&mut reply)
        .map_err(broken)?;
    serde_json::from_str(&reply).map_err(|e| broken(io::Error::new(io::ErrorKind::InvalidData, e)))
}

fn required(env: &impl Vars, name: &'static str) -> Result<String, Error> {
    env.var(name).filter(|v| !v.is_empty()).ok_or(Error::Env {
        name,
        reason: "not set (the container runtime sets it)".into(),
    })
}

/// `CNI_ARGS`: `K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=c;IgnoreUnknown=1`.
fn pod_info(env: &impl Vars) -> Result<PodInfo, Error> {
    let args = env.var("CNI_ARGS").unwrap_or_default();
    let get = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
            .filter(|v| !v.is_empty())
            .ok_or(Error::Env {
                name: "CNI_ARGS",
                reason: format!(
                    "{key} missing in {args:?} (weft-cni serves Kubernetes pods; the runtime passes it)"
                ),
            })
    };
    Ok(PodInfo {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID")?,
    })
}

/// The pod's addresses in `prevResult.ips[].address` (`10.1.0.2/16`).
fn ips_of(prev_result: &Value) -> Vec<IpAddr> {
    prev_result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// `mesh-namespaces.json` next to the socket.
pub fn default_mesh_namespaces_file(socket: &Path) -> PathBuf {
    socket.with_file_name(MESH_NAMESPACES_FILE)
}

const LATEST: &str = "1.0.0";
const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests;
