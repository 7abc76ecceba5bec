//! `weft waypoint` as its command line starts it: on a state file, and on the Kubernetes
//! API (the fake one of `test_util::kube_api`).

use clap::Parser;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::CaSource;
use crate::{
    cli::{Cli, Command},
    test_util::kube_api::FakeApi,
};

type HttpRouteKind = gateway_api::experimental::httproutes::HttpRoute;

async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The settings of `weft waypoint <flags>` with every address on loopback port 0 and the
/// in-process CA `ca`.
fn settings(ca: &crate::identity::signer::InitPaths, flags: &[&str]) -> Settings {
    let (cert, key) = (ca.cert.display().to_string(), ca.key.display().to_string());
    let mut argv = vec!["weft", "waypoint"];
    argv.extend_from_slice(flags);
    for flag in [
        "--listen-addr",
        "--admin-addr",
        "--metrics-addr",
        "--readiness-addr",
    ] {
        argv.extend([flag, "127.0.0.1:0"]);
    }
    argv.extend(["--ca-cert", &cert, "--ca-key", &key]);
    let Command::Waypoint(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!("parsed the waypoint subcommand")
    };
    args.settings().unwrap()
}

/// Waits until the readiness server says 200.
async fn until_ready(readiness: SocketAddr) {
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        let (status, body) = get(readiness, "GET", "/healthz/ready").await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_gets_its_certificate_becomes_ready_and_dumps_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::ca::init(dir.path(), "cluster.local").unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        "services:\n\
         - {name: echo, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], endpoints: [10.1.0.3], waypoint: wp}\n\
         workloads:\n\
         - {name: echo-1, ips: [10.1.0.3], node: node-b}\n\
         waypoints:\n\
         - {name: wp, ips: [127.0.0.1]}\n",
    )
    .unwrap();
    let state = state.display().to_string();
    let settings = settings(&ca, &["--name", "wp", "--config", &state]);
    assert_eq!(
        settings.waypoint.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/wp"
    );
    let doc = source::file::load(settings.config_path.as_ref().unwrap()).unwrap();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run(settings, doc, None, Some(bound_tx)));
    let bound = bound_rx.await.unwrap();
    until_ready(bound.readiness).await;
    let (status, dump) = get(bound.admin, "GET", "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(dump["snapshot"]["routes"].is_array(), "{dump}");
    assert_eq!(dump["certificates"][0]["state"], "valid", "{dump}");
    let (status, metrics) = get(bound.metrics, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    assert_eq!(get(bound.readiness, "GET", "/metrics").await.0, 404);
    quit(bound.admin, task).await;
}

#[test]
fn the_sources_and_the_ca_are_checked_with_a_reason() {
    let parse = |extra: &[&str]| {
        let argv = ["weft", "waypoint", "--name", "wp"];
        let Command::Waypoint(args) = Cli::try_parse_from(argv.iter().chain(extra))
            .unwrap()
            .command
        else {
            unreachable!("parsed the waypoint subcommand")
        };
        args.settings()
    };
    let no_state = Cli::try_parse_from(["weft", "waypoint", "--name", "wp"]).unwrap_err();
    assert!(no_state.to_string().contains("--config"), "{no_state}");
    assert!(matches!(
        parse(&["--source", "kubernetes"]),
        Err(Error::NoCa)
    ));
    let cluster = parse(&[
        "--source",
        "kubernetes",
        "--ca-cert",
        "/c",
        "--ca-key",
        "/k",
    ])
    .unwrap();
    assert_eq!(
        (cluster.source, cluster.config_path),
        (source::Kind::Kubernetes, None)
    );
    assert!(matches!(parse(&["--config", "s.yaml"]), Err(Error::NoCa)));
    let remote = parse(&[
        "--config",
        "s.yaml",
        "--ca-addr",
        "weft-ca.weft:15012",
        "--ca-token-file",
        "/t",
        "--ca-root-cert",
        "/r",
    ])
    .unwrap();
    match remote.identity.ca {
        CaSource::Remote { server_name, .. } => assert_eq!(server_name, "weft-ca.weft"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_a_waypoint_is_ready_once_synced_routes_its_services_and_writes_their_status()
{
    let api = FakeApi::start().await;
    // Down first: certificate and listener come, but readiness waits for the source.
    api.set_down(true);
    serve_shop(&api);
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::ca::init(dir.path(), "cluster.local").unwrap();
    let settings = settings(
        &ca,
        &[
            "--source",
            "kubernetes",
            "--name",
            "waypoint",
            "--namespace",
            "shop",
            "--node-name",
            "node-w",
        ],
    );
    let client = source::kube::client_from(api.config()).unwrap();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_on_cluster(
        settings,
        client,
        MeshSettings::default(),
        Some(bound_tx),
    ));
    let bound = bound_rx.await.unwrap();

    let deadline = tokio::time::Instant::now() + patience();
    let (status, pending) = loop {
        let (status, pending) = get(bound.readiness, "GET", "/healthz/ready").await;
        if !pending.contains("certificates") {
            break (status, pending);
        }
        assert!(tokio::time::Instant::now() < deadline, "{pending}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{pending}");
    assert!(
        pending.contains("snapshot") && pending.contains("kubernetes"),
        "{pending}"
    );
    assert_eq!(config_dump(bound.admin).await["source"]["generation"], 0);

    api.set_down(false);
    until_ready(bound.readiness).await;
    let dump = config_dump(bound.admin).await;
    assert_eq!(dump["certificates"][0]["state"], "valid", "{dump:#}");
    assert_ne!(dump["source"]["generation"], 0, "{dump:#}");
    let snapshot = &dump["snapshot"];
    let routes = snapshot["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{snapshot:#}");
    let route = &routes[0];
    assert_eq!(
        (&route["name"], &route["kind"]),
        (&json!("shop/reviews"), &json!("HTTPRoute"))
    );
    assert_eq!(
        route["parents"],
        json!([{"service": "shop/reviews", "port": 9080}])
    );
    let backends: Vec<(&Value, &Value)> = route["rules"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (&b["service"]["name"], &b["weight"]))
        .collect();
    assert_eq!(
        backends,
        [
            (&json!("shop/reviews-v1"), &json!(90)),
            (&json!("shop/reviews-v2"), &json!(10))
        ]
    );
    assert_eq!(
        snapshot["waypoints"]["shop/waypoint"],
        json!({"name": "shop/waypoint", "serviceAccount": "waypoint", "addresses": ["10.1.0.5"]})
    );
    assert_eq!(snapshot["services"]["shop/reviews"]["waypoint"], "waypoint");
    let (_, metrics) = get(bound.metrics, "GET", "/metrics").await;
    assert!(
        metrics.contains("weft_kubernetes_objects{kind=\"http_route\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_kubernetes_watch_stale{kind=\"service\"} 0"),
        "{metrics}"
    );
    // The backends' pods, on other nodes, with the identities the waypoint will require.
    let v2 = &snapshot["workloads"]["shop/reviews-v2-0"];
    assert_eq!(v2["service_account"], "reviews-v2", "{snapshot:#}");
    assert_eq!(v2["location"], json!({"remote": {"node": "node-b"}}));

    // The route's status, written for its parent Service.
    let deadline = tokio::time::Instant::now() + patience();
    let patch = loop {
        let patches = api.patches();
        if let Some((_, patch)) = patches
            .iter()
            .find(|(path, _)| path.ends_with("/namespaces/shop/httproutes/reviews/status"))
        {
            break patch.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status patch: {patches:?}\nrequests: {:#?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let parents = patch["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{patch:#}");
    assert_eq!(parents[0]["controllerName"], "weft.dev/waypoint");
    assert_eq!(parents[0]["parentRef"]["name"], "reviews");
    let conditions: Vec<(&Value, &Value)> = parents[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (&c["type"], &c["status"]))
        .collect();
    assert_eq!(
        conditions,
        [
            (&json!("Accepted"), &json!("True")),
            (&json!("ResolvedRefs"), &json!("True"))
        ]
    );
    let stored = api.object::<HttpRouteKind>("shop", "reviews").unwrap();
    assert_eq!(stored["status"]["parents"], patch["status"]["parents"]);
    // Nothing the chart's waypoint ClusterRole does not allow: reads of these, and route
    // status patches.
    let readable = [
        "/api/v1/namespaces",
        "/api/v1/pods",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/apis/weft.dev/v1alpha1/accesspolicies",
        "/apis/weft.dev/v1alpha1/peerauthentications",
        "/apis/weft.dev/v1alpha1/trafficpolicies",
        "/apis/weft.dev/v1alpha1/externalservices",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ];
    for request in api.requests() {
        let allowed = match request.strip_prefix("PATCH ") {
            Some(path) => path.ends_with("/status") && path.contains("routes/"),
            None => readable.contains(&request.split('?').next().unwrap_or_default()),
        };
        assert!(allowed, "{request} is not in the waypoint's RBAC");
    }
    assert_eq!(api.create_requests(), 0, "{:#?}", api.created());

    quit(bound.admin, task).await;
}

/// The shop: the waypoint `shop/waypoint` (one ready pod on the waypoint's node), the
/// Service `shop/reviews` bound to it and split 90/10 between `reviews-v1` and `reviews-v2`
/// by an HTTPRoute, their pods on other nodes. No AccessPolicy, no PeerAuthentication.
fn serve_shop(api: &FakeApi) {
    api.apply_value::<Namespace>(json!({
        "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}},
    }));
    let service = |name: &str, vip: &str, port: u16, labels: Value| {
        json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"clusterIP": vip, "clusterIPs": [vip],
                "ports": [{"port": port, "targetPort": port, "protocol": "TCP"}]},
        })
    };
    let slice = |service: &str, port: u16, ips: &[&str]| {
        let endpoints: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        json!({
            "metadata": {"name": format!("{service}-1"), "namespace": "shop",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"port": port, "protocol": "TCP"}],
        })
    };
    let pod = |name: &str, account: &str, node: &str, ip: &str, labels: Value| {
        json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    };
    api.apply_value::<Service>(service(
        "waypoint",
        "10.96.1.2",
        15008,
        json!({"weft.dev/role": "waypoint"}),
    ));
    api.apply_value::<EndpointSlice>(slice("waypoint", 15008, &["10.1.0.5"]));
    api.apply_value::<Pod>(pod(
        "waypoint-0",
        "waypoint",
        "node-w",
        "10.1.0.5",
        json!({"weft.dev/mesh": "disabled"}),
    ));
    api.apply_value::<Service>(service(
        "reviews",
        "10.96.1.10",
        9080,
        json!({"weft.dev/use-waypoint": "waypoint"}),
    ));
    api.apply_value::<EndpointSlice>(slice("reviews", 9080, &["10.2.0.11", "10.3.0.12"]));
    for (version, node, ip) in [("v1", "node-a", "10.2.0.11"), ("v2", "node-b", "10.3.0.12")] {
        let name = format!("reviews-{version}");
        api.apply_value::<Service>(service(
            &name,
            &format!("10.96.1.1{}", &version[1..]),
            9080,
            json!({}),
        ));
        api.apply_value::<EndpointSlice>(slice(&name, 9080, &[ip]));
        api.apply_value::<Pod>(pod(
            &format!("{name}-0"),
            &name,
            node,
            ip,
            json!({"app": "reviews", "version": version}),
        ));
    }
    api.apply_value::<HttpRouteKind>(json!({
        "metadata": {"name": "reviews", "namespace": "shop", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [{"backendRefs": [
                {"name": "reviews-v1", "port": 9080, "weight": 90},
                {"name": "reviews-v2", "port": 9080, "weight": 10},
            ]}],
        },
    }));
}

/// `POST /quitquitquit`, and `task` ends without an error.
async fn quit(admin: SocketAddr, task: tokio::task::JoinHandle<Result<(), Error>>) {
    // Without the admin header (what a web page could send) it is refused.
    assert_eq!(get(admin, "POST", "/quitquitquit").await.0, 403);
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "POST /quitquitquit HTTP/1.1\r\nhost: {admin}\r\nweft-admin: quit\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    tokio::time::timeout(weft_test_env::scaled(Duration::from_secs(5)), task)
        .await
        .expect("the waypoint returns after /quitquitquit")
        .unwrap()
        .unwrap();
}

async fn config_dump(admin: SocketAddr) -> Value {
    let (status, body) = get(admin, "GET", "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// How long anything here may take: the source's production backoff starts at 500 ms.
/// How long a wait for a condition may take: 20 s, scaled by `WEFT_TEST_PATIENCE_MS`.
fn patience() -> Duration {
    weft_test_env::scaled(Duration::from_secs(20))
}
