//! A fake Kubernetes API server on loopback, for tests of anything that lists and watches
//! (there is no kube-apiserver on the test machines, and a real one would not let a test
//! break it on cue).
//!
//! It serves any collection path (`/api/v1/pods`, `/apis/weft.dev/v1alpha1/accesspolicies`)
//! cluster-wide: `GET` lists (with `limit`/`continue` paging and `fieldSelector` `=`/`!=`
//! on dotted paths such as `spec.nodeName`), and `?watch=true` streams the changes after
//! `resourceVersion` as newline-delimited watch events; `labelSelector` `key=value` lists
//! filter both. `POST` to any path creates an object there (`409` if its name is taken),
//! which `created` returns: writes through the API, such as Events, are only recorded. Every write bumps one global
//! resourceVersion, as etcd does. A test adds, updates and deletes objects (`apply`,
//! `delete`), and breaks the server: `fail_next` (HTTP 500s), `set_down` (503 and every watch
//! closed), `close_watches`, `fail_watches` (an ERROR event on each watch), `expire` (watches
//! from older versions get `410 Gone`, so clients must re-list) and `bookmark`.
//! `GET` of one namespaced object (`/apis/G/V/namespaces/NS/PLURAL/NAME`) reads it, and
//! `PATCH` of its `/status` (a JSON merge patch) changes its status, refused with `409` if
//! the patch's `metadata.resourceVersion` is not the object's; `patches` returns them.
//! `set_missing` makes a collection answer `404`, as an API whose CRD is not installed.
//! A namespaced collection (`/api/v1/namespaces/NS/secrets`) lists and watches the objects
//! of that namespace in the cluster-wide one, so that tests apply objects as always.
//! Not modelled: set-based label selectors, watch timeouts, other updates through the API.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use kube::Resource;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use crate::sync::{Mutex, MutexGuard};

/// The server; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    version: u64,
    /// Watches from a version below this one are answered `410 Gone`.
    oldest_watchable: u64,
    collections: HashMap<String, Collection>,
    fail_next: u32,
    down: bool,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
    /// Objects created through the API, as (collection path, object), in order.
    created: Vec<(String, Value)>,
    create_requests: usize,
    /// Status patches accepted so far, as (object path, patch).
    patches: Vec<(String, Value)>,
    /// Collections whose API is not installed (404).
    missing: std::collections::HashSet<String>,
}

#[derive(Default)]
struct Collection {
    api_version: String,
    kind: String,
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (version, event type, object).
    log: Vec<(u64, &'static str, Value)>,
}

struct Watcher {
    path: String,
    selector: Vec<FieldRequirement>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Clone, Debug)]
struct FieldRequirement {
    /// A dotted path, or a label's key.
    path: String,
    value: String,
    equal: bool,
    label: bool,
}

/// A response body: all at once, or a watch stream.
enum FakeBody {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl FakeApi {
    /// Starts a server on 127.0.0.1 with no objects.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let state = Arc::new(Mutex::new(State {
            version: 1,
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move {
                            let method = req.method().clone();
                            if method != http::Method::POST && method != http::Method::PATCH {
                                return Ok::<_, Infallible>(handle(&state, &req));
                            }
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.unwrap_or_default();
                            if method == http::Method::PATCH {
                                return Ok(patch(&state, &path, &body));
                            }
                            Ok(create(&state, path, &body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Client settings for this server (build the client as the code under test does,
    /// e.g. with `source::kube::client_from`).
    pub fn config(&self) -> kube::Config {
        let url = format!("http://{}", self.addr)
            .parse()
            .expect("loopback URL");
        kube::Config::new(url)
    }

    /// Adds or replaces `object` (ADDED or MODIFIED to watchers).
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        self.apply_value::<K>(serde_json::to_value(object).expect("serialize a test object"));
    }

    /// Adds or replaces an object given as JSON, in `K`'s collection: for objects that
    /// `K` itself cannot represent (a malformed custom resource).
    pub fn apply_value<K: Resource<DynamicType = ()>>(&self, mut object: Value) {
        let path = K::url_path(&(), None);
        object["apiVersion"] = K::api_version(&()).into_owned().into();
        object["kind"] = K::kind(&()).into_owned().into();
        let key = key_of(&object);
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = version.to_string().into();
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = format!("uid-{}-{}", key.0, key.1).into();
        }
        let collection = state.collection::<K>(&path);
        let event = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.objects.insert(key, object.clone());
        collection.log.push((version, event, object.clone()));
        state.notify(&path, event, &object);
    }

    /// Deletes an object of `K` (DELETED to watchers); a no-op if there is none.
    pub fn delete<K: Resource<DynamicType = ()>>(&self, namespace: Option<&str>, name: &str) {
        let path = K::url_path(&(), None);
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let collection = state.collection::<K>(&path);
        let Some(mut object) = collection.objects.remove(&key) else {
            return;
        };
        object["metadata"]["resourceVersion"] = version.to_string().into();
        collection.log.push((version, "DELETED", object.clone()));
        state.notify(&path, "DELETED", &object);
    }

    /// Answers the next `n` requests with `500 Internal Server Error`.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// While down, every request gets `503 Service Unavailable`; going down closes every
    /// open watch.
    pub fn set_down(&self, down: bool) {
        let mut state = self.lock();
        state.down = down;
        if down {
            state.watchers.clear();
        }
    }

    /// Ends every open watch, as a restarting API server or a dropped connection does.
    pub fn close_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Sends an ERROR event with `code` on every open watch and ends it.
    pub fn fail_watches(&self, code: u16) {
        let mut state = self.lock();
        for watcher in state.watchers.drain(..) {
            let _ = watcher.tx.send(line(&error_event(code)));
        }
    }

    /// Compacts history: watches from a version before now get `410 Gone`. Open watches
    /// are closed, so their clients come back and find out.
    pub fn expire(&self) {
        let mut state = self.lock();
        state.oldest_watchable = state.version + 1;
        state.watchers.clear();
    }

    /// Sends a BOOKMARK at the current version on every watch that asked for bookmarks.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let version = state.version.to_string();
        state.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({"kind": "Bookmark", "apiVersion": "v1",
                "metadata": {"resourceVersion": version}});
            w.tx.send(line(&json!({"type": "BOOKMARK", "object": object})))
                .is_ok()
        });
    }

    /// While `missing`, `K`'s collection answers `404 Not Found` (its CRD is not installed).
    pub fn set_missing<K: Resource<DynamicType = ()>>(&self, missing: bool) {
        let path = K::url_path(&(), None);
        let mut state = self.lock();
        if missing {
            state.missing.insert(path);
        } else {
            state.missing.remove(&path);
        }
    }

    /// The object of `K` named `namespace/name`, as the server has it.
    pub fn object<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let path = K::url_path(&(), None);
        let key = (namespace.to_owned(), name.to_owned());
        self.lock()
            .collections
            .get(&path)?
            .objects
            .get(&key)
            .cloned()
    }

    /// Status patches accepted so far, as (object path, patch).
    pub fn patches(&self) -> Vec<(String, Value)> {
        self.lock().patches.clone()
    }

    /// Every request so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Objects created through the API so far, as (collection path, object).
    pub fn created(&self) -> Vec<(String, Value)> {
        self.lock().created.clone()
    }

    /// Create requests so far, refused ones included.
    pub fn create_requests(&self) -> usize {
        self.lock().create_requests
    }

    /// Number of open watch streams.
    pub fn open_watches(&self) -> usize {
        let mut state = self.lock();
        state.watchers.retain(|w| !w.tx.is_closed());
        state.watchers.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn collection<K: Resource<DynamicType = ()>>(&mut self, path: &str) -> &mut Collection {
        let collection = self.collections.entry(path.to_owned()).or_default();
        collection.api_version = K::api_version(&()).into_owned();
        collection.kind = K::kind(&()).into_owned();
        collection
    }

    fn notify(&mut self, path: &str, event: &str, object: &Value) {
        let line = line(&json!({"type": event, "object": object}));
        self.watchers.retain(|w| {
            if w.path != path || !matches(&w.selector, object) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
    }
}

fn handle(state: &Mutex<State>, req: &Request<Incoming>) -> Response<FakeBody> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let mut state = state.lock();
    state
        .requests
        .push(format!("{path}?{}", req.uri().query().unwrap_or_default()));
    if state.down {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the fake API server is down",
        );
    }
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return status_response(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
    }
    let mut selector = parse_selector(query.get("fieldSelector").map_or("", String::as_str), false);
    selector.extend(parse_selector(
        query.get("labelSelector").map_or("", String::as_str),
        true,
    ));
    // A namespaced collection: the cluster-wide one, of that namespace.
    let path = match namespaced_collection(&path) {
        Some((collection, namespace)) => {
            selector.push(FieldRequirement {
                path: "metadata.namespace".into(),
                value: namespace,
                equal: true,
                label: false,
            });
            collection
        }
        None => path,
    };
    if state.missing.contains(&path) {
        return status_response(
            StatusCode::NOT_FOUND,
            "the server could not find the requested resource",
        );
    }
    if let Some((collection, key, false)) = object_path(&path) {
        let object = state
            .collections
            .get(&collection)
            .and_then(|c| c.objects.get(&key));
        return match object {
            Some(object) => Response::builder()
                .header("content-type", "application/json")
                .body(FakeBody::Full(Some(Bytes::from(object.to_string()))))
                .expect("valid response"),
            None => status_response(StatusCode::NOT_FOUND, "not found"),
        };
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watch {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        if from < state.oldest_watchable {
            let _ = tx.send(line(&error_event(410)));
            drop(tx);
        } else {
            if let Some(collection) = state.collections.get(&path) {
                for (version, event, object) in &collection.log {
                    if *version > from && matches(&selector, object) {
                        let _ = tx.send(line(&json!({"type": event, "object": object})));
                    }
                }
            }
            let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
            state.watchers.push(Watcher {
                path,
                selector,
                bookmarks,
                tx,
            });
        }
        return Response::builder()
            .header("content-type", "application/json")
            .body(FakeBody::Stream(rx))
            .expect("valid response");
    }

    let version = state.version;
    let (api_version, kind, items): (String, String, Vec<&Value>) =
        match state.collections.get(&path) {
            Some(c) => (
                c.api_version.clone(),
                format!("{}List", c.kind),
                c.objects
                    .values()
                    .filter(|o| matches(&selector, o))
                    .collect(),
            ),
            None => ("v1".into(), "List".into(), Vec::new()),
        };
    // continue = "<version of the first page>:<offset>", so every page reports the version
    // the client must watch from.
    let (list_version, offset) = query
        .get("continue")
        .and_then(|c| c.split_once(':'))
        .and_then(|(v, o)| Some((v.parse().ok()?, o.parse().ok()?)))
        .unwrap_or((version, 0usize));
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = items.iter().skip(offset).take(limit).copied().collect();
    let next = offset.saturating_add(limit);
    let mut metadata = json!({"resourceVersion": list_version.to_string()});
    if next < items.len() {
        metadata["continue"] = format!("{list_version}:{next}").into();
    }
    let body =
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": page});
    Response::builder()
        .header("content-type", "application/json")
        .body(FakeBody::Full(Some(Bytes::from(body.to_string()))))
        .expect("valid response")
}

/// A `PATCH` of `body` (a JSON merge patch) to an object's `/status`.
fn patch(state: &Mutex<State>, path: &str, body: &[u8]) -> Response<FakeBody> {
    let mut state = state.lock();
    state.requests.push(format!("PATCH {path}"));
    if state.down {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the fake API server is down",
        );
    }
    let Some((collection_path, key, true)) = object_path(path) else {
        return status_response(StatusCode::BAD_REQUEST, "only status patches are modelled");
    };
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status_response(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    state.version += 1;
    let version = state.version;
    let Some(collection) = state.collections.get_mut(&collection_path) else {
        return status_response(StatusCode::NOT_FOUND, "not found");
    };
    let Some(object) = collection.objects.get_mut(&key) else {
        return status_response(StatusCode::NOT_FOUND, "not found");
    };
    let wanted = &patch["metadata"]["resourceVersion"];
    if !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"] {
        return status_response(StatusCode::CONFLICT, "the object has been modified");
    }
    merge(&mut object["status"], &patch["status"]);
    object["metadata"]["resourceVersion"] = version.to_string().into();
    let object = object.clone();
    collection.log.push((version, "MODIFIED", object.clone()));
    state.patches.push((path.to_owned(), patch));
    state.notify(&collection_path, "MODIFIED", &object);
    Response::builder()
        .header("content-type", "application/json")
        .body(FakeBody::Full(Some(Bytes::from(object.to_string()))))
        .expect("valid response")
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in patch {
        if value.is_null() {
            if let Value::Object(map) = target {
                map.remove(key);
            }
        } else {
            merge(&mut target[key.as_str()], value);
        }
    }
}

/// A namespaced object's path (`/apis/G/V/namespaces/NS/PLURAL/NAME[/status]`) as (its
/// collection's path, its key, whether it is the status).
fn object_path(path: &str) -> Option<(String, (String, String), bool)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let at = parts.iter().position(|p| *p == "namespaces")?;
    let (prefix, rest) = parts.split_at(at);
    match rest {
        ["namespaces", ns, plural, name] | ["namespaces", ns, plural, name, "status"] => {
            let status = rest.len() == 5;
            let collection = format!("/{}/{plural}", prefix.join("/"));
            Some((collection, ((*ns).to_owned(), (*name).to_owned()), status))
        }
        _ => None,
    }
}

/// A namespaced collection's path (`/api/v1/namespaces/NS/PLURAL`) as (the cluster-wide
/// collection's path, the namespace).
fn namespaced_collection(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let at = parts.iter().position(|p| *p == "namespaces")?;
    let (prefix, rest) = parts.split_at(at);
    match rest {
        ["namespaces", ns, plural] => {
            Some((format!("/{}/{plural}", prefix.join("/")), (*ns).to_owned()))
        }
        _ => None,
    }
}

/// A `POST` of `body` to `path`: recorded, `409 AlreadyExists` if the name is taken there.
fn create(state: &Mutex<State>, path: String, body: &[u8]) -> Response<FakeBody> {
    let mut state = state.lock();
    state.create_requests += 1;
    if state.down {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the fake API server is down",
        );
    }
    let Ok(object) = serde_json::from_slice::<Value>(body) else {
        return status_response(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let name = &object["metadata"]["name"];
    if state
        .created
        .iter()
        .any(|(p, o)| *p == path && o["metadata"]["name"] == *name)
    {
        return status_response(StatusCode::CONFLICT, "already exists");
    }
    let text = object.to_string();
    state.created.push((path, object));
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(FakeBody::Full(Some(Bytes::from(text))))
        .expect("valid response")
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            FakeBody::Stream(rx) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
        }
    }
}

fn status_response(code: StatusCode, message: &str) -> Response<FakeBody> {
    let body = status(code.as_u16(), message);
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(FakeBody::Full(Some(Bytes::from(body.to_string()))))
        .expect("valid response")
}

fn status(code: u16, message: &str) -> Value {
    let reason = match code {
        400 => "BadRequest",
        404 => "NotFound",
        409 => "AlreadyExists",
        410 => "Expired",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn error_event(code: u16) -> Value {
    let message = if code == 410 {
        "too old resource version"
    } else {
        "injected watch error"
    };
    json!({"type": "ERROR", "object": status(code, message)})
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn key_of(object: &Value) -> (String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

fn parse_selector(text: &str, label: bool) -> Vec<FieldRequirement> {
    text.split(',')
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            if let Some((path, value)) = t.split_once("!=") {
                Some((path, value, false))
            } else {
                let (path, value) = t.split_once('=')?;
                Some((path, value.strip_prefix('=').unwrap_or(value), true))
            }
        })
        .map(|(path, value, equal)| FieldRequirement {
            path: path.to_owned(),
            value: value.to_owned(),
            equal,
            label,
        })
        .collect()
}

fn matches(selector: &[FieldRequirement], object: &Value) -> bool {
    selector.iter().all(|r| {
        let value = if r.label {
            &object["metadata"]["labels"][r.path.as_str()]
        } else {
            r.path.split('.').fold(object, |v, part| &v[part])
        };
        let value = value.as_str().unwrap_or_default();
        (value == r.value) == r.equal
    })
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
