//! HBONE between weft and a real Istio ztunnel (issue "Data path v2", ztunnel interop), so
//! that the wire format cannot drift: a pod behind weft's agent on one node and a pod
//! served by ztunnel (dedicated mode) on another, both under one root (ztunnel's CA signs
//! with `../shared/tools/ztunnel/ca/`, and weft's agent is given that root). Each side
//! verifies the other's SPIFFE identity; the applications' bytes are hashed at both ends,
//! and both proxies' own records say who they talked to.
//!
//! Needs root and the ztunnel binary (`WEFT_ZTUNNEL`, see `weft_tests::ztunnel`); without the
//! binary the tests are reported as skipped, in CI too.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, test_name,
    ztunnel::{self, Ztunnel},
};

#[test]
fn weft_and_ztunnel_pods_talk_hbone_in_both_directions() -> Result<()> {
    privileged!();
    let Some(pair) = Pair::new(test_name!())? else {
        return Ok(());
    };
    let Pair {
        wpod,
        zpod,
        agent,
        zt,
        ..
    } = &pair;
    let _wserver = app::serve(wpod, PORT, Mode::Hash)?;
    let _zserver = app::serve(zpod, PORT, Mode::Hash)?;

    // weft → ztunnel: weft's outbound dials zpod's 15008, ztunnel's inbound terminates.
    let to = SocketAddr::V4(zpod.addr(PORT));
    whole(app::send(wpod, to, SENT, 1)?)?;
    let record = agent.expect_record("weft's outbound record", |r| {
        r.direction == "outbound" && r.dst == to.to_string() && r.bytes_sent == SENT
    });
    ensure!(
        record.dst_identity.as_deref() == Some(ZPOD_ID),
        "weft did not verify ztunnel's identity: {record:?}"
    );
    ztunnel_counted(zt, "destination", &[("source_principal", WPOD_ID)])?;

    // ztunnel → weft: ztunnel's outbound dials wpod's 15008, weft's HBONE inbound terminates.
    let to = SocketAddr::V4(wpod.addr(PORT));
    whole(app::send(zpod, to, SENT, 2)?)?;
    let record = agent.expect_record("weft's HBONE inbound record", |r| {
        r.direction == "hbone" && r.bytes_sent == SENT
    });
    ensure!(
        record.src_identity.as_deref() == Some(ZPOD_ID),
        "weft did not verify ztunnel's client identity: {record:?}"
    );
    ztunnel_counted(zt, "source", &[("destination_principal", WPOD_ID)])?;
    Ok(())
}

#[test]
fn a_connection_weft_revokes_is_reset_for_the_ztunnel_pods_app() -> Result<()> {
    privileged!();
    let Some(pair) = Pair::new(test_name!())? else {
        return Ok(());
    };
    let _wserver = app::serve(&pair.wpod, PORT, Mode::Hash)?;
    let to = SocketAddr::V4(pair.wpod.addr(PORT));
    let running = app::start_send_paced(&pair.zpod, to, 4 << 20, 3, Duration::from_secs(30))?;
    pair.agent.expect_record("the open connection", |r| {
        r.direction == "hbone" && r.src_identity.as_deref() == Some(ZPOD_ID)
    });

    // weft's end is cut (RST_STREAM, CONNECT_ERROR); ztunnel must pass it on as a reset.
    pair.weft_node.set_policies(json!([{
        "name": "deny-ztunnel-pod", "action": "DENY",
        "rules": [{ "from": [{ "principals": [ZPOD_ID] }] }],
    }]));
    pair.agent.reload_and_wait(&pair.weft_node)?;
    let result = running.finish();
    let Err(e) = result else {
        bail!("the transfer should have been cut: {result:?}");
    };
    ensure!(app::is_reset(&e), "the app saw no reset: {e:#}");
    pair.agent.expect_record("the revoked connection", |r| {
        r.direction == "hbone" && r.error.as_deref() == Some("policy_revoked")
    });
    Ok(())
}

/// A weft node with one pod, and a node with one pod served by ztunnel; linked, under
/// ztunnel's root.
struct Pair {
    // Dropped first: the processes before the namespaces they run in.
    zt: Ztunnel,
    agent: TestAgent,
    wpod: TestPod,
    zpod: TestPod,
    weft_node: TestNode,
    _ztunnel_node: TestNode,
}

impl Pair {
    /// None (skipped) where ztunnel cannot run.
    fn new(test: &str) -> Result<Option<Self>> {
        let binary = match ztunnel::available() {
            Ok(binary) => binary,
            Err(missing) => {
                // The binary comes from outside this repository: no setup step installs
                // it, so its absence is a reported skip, in CI too.
                weft_test_env::skip_optional(test, &missing);
                return Ok(None);
            }
        };
        let weft_node = TestNode::new(test, 1)?;
        let ztunnel_node = TestNode::new(test, 2)?;
        weft_node.use_ca(ztunnel::ca(&binary));
        weft_node.connect(&ztunnel_node)?;
        let wpod = weft_node.pod("wpod").service_account("wsa").create()?;
        let zpod = ztunnel_node.pod("zpod").service_account("zsa").create()?;
        let agent = weft_node.start_agent()?;
        let zt = Ztunnel::start(&binary, &zpod, &[&wpod])?;
        Ok(Some(Pair {
            zt,
            agent,
            wpod,
            zpod,
            weft_node,
            _ztunnel_node: ztunnel_node,
        }))
    }
}

/// The hash server received exactly what was sent.
fn whole(report: app::SendReport) -> Result<()> {
    let reply = report.reply.clone().context("no reply")?;
    ensure!(
        reply.starts_with(&format!("bytes={SENT} sha256={} ", report.sent_sha256)),
        "the server received other bytes than were sent: {reply:?} vs {report:?}"
    );
    Ok(())
}

/// ztunnel counted a mutual-TLS connection as `reporter` with `labels`.
fn ztunnel_counted(zt: &Ztunnel, reporter: &str, labels: &[(&str, &str)]) -> Result<()> {
    let mut want = vec![
        ("reporter", reporter),
        ("connection_security_policy", "mutual_tls"),
    ];
    want.extend_from_slice(labels);
    eventually(Duration::from_secs(10), || {
        let scrape = Scrape::parse(&zt.metrics()?);
        ensure!(
            scrape.sum("istio_tcp_connections_opened_total", &want) >= 1.0,
            "ztunnel has no {want:?} connection: {:#?}",
            scrape
                .matching("istio_tcp_connections_opened_total", &[])
                .collect::<Vec<_>>()
        );
        Ok(())
    })
}

const PORT: u16 = 8080;
const SENT: u64 = 3 * 1024 * 1024 + 5;
const WPOD_ID: &str = "spiffe://cluster.local/ns/default/sa/wsa";
const ZPOD_ID: &str = "spiffe://cluster.local/ns/default/sa/zsa";
