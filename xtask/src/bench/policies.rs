//! The policy rows, on node 1 after the data path: the new-connection rate through weft
//! with no policy and with many, and the time from a config write that denies the client
//! until its first connection is refused.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weft_tests::{TestAgent, TestNode, TestPod, bench as harness};

use super::{
    CLIENT_SLACK, PORT, SERVER_APP,
    agent::{apply, log_unix, unix_now},
    plan::Plan,
    probe::{args, f},
    report::Report,
    state::{add_big_state, background_policies, policy_list},
};

/// Policies on the data path, on node 1: the new-connection rate through weft with no
/// policy and with `cp_policies` of them in the state (a few select the server and allow
/// the client), over the same workloads and services; then the time from a config write
/// that denies the client until its first connection is refused.
pub fn run(
    plan: &Plan,
    node: &TestNode,
    agent: &TestAgent,
    client: &TestPod,
    server: &TestPod,
    report: &mut Report,
) -> Result<()> {
    println!("== policies on the data path ==");
    let key = "weft-l4";
    let to: SocketAddr = server.addr(PORT).into();
    let p = plan.cp_policies;
    let mut none = node.config();
    add_big_state(plan, &mut none)?;
    let mut many = none.clone();
    let list = policy_list(&mut many)?;
    list.extend(background_policies(p.saturating_sub(SERVER_POLICIES)));
    list.extend(server_policies(PORT));
    let mut deny = many.clone();
    policy_list(&mut deny)?.push(json!({
        "name": "deny-bench-client",
        "namespace": "default",
        "selector": { "matchLabels": { "app": SERVER_APP } },
        "action": "DENY",
        "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
    }));
    let with = format!("{p} policies, {SERVER_POLICIES} select the server");
    for rep in 0..plan.reps {
        println!("== policies: repetition {}/{} ==", rep + 1, plan.reps);
        report.sample_load();
        // Alternate which goes first, so a drift of the machine favours neither.
        let mut order = [(&none, "no policies"), (&many, with.as_str())];
        if rep % 2 == 1 {
            order.reverse();
        }
        let rate = |state: &Value, what: &str, report: &mut Report| -> Result<f64> {
            apply(agent, state)?;
            let v = harness::client(
                client,
                &args(&[
                    "crr",
                    "--to",
                    &to.to_string(),
                    "--secs",
                    &plan.crr_secs.to_string(),
                ]),
                Duration::from_secs_f64(plan.crr_secs) + CLIENT_SLACK,
            )?;
            if f(&v, "errors") > 0.0 {
                bail!("{} connections failed with {what}", v["errors"]);
            }
            let rate = f(&v, "rate_per_s");
            println!("  new connections with {what}: {rate:.0}/s");
            report.add(key, &format!("new connections, {what}"), "conn/s", rate);
            Ok(rate)
        };
        let mut rates = (0.0, 0.0);
        for (state, what) in order {
            match rate(state, what, report) {
                Ok(r) if std::ptr::eq(state, &none) => rates.0 = r,
                Ok(r) => rates.1 = r,
                Err(e) => report.fail(key, &format!("new connections, {what}"), &e),
            }
        }
        if rates.0 > 0.0 && rates.1 > 0.0 {
            report.add(
                key,
                &format!("new connections, {p} policies ÷ no policies"),
                "×",
                rates.1 / rates.0,
            );
        }

        // One policy change: the client connects in a loop (allowed by `many`), a config
        // that also denies it is written, and the loop stops at the first refusal.
        apply(agent, &many)?;
        let log_offset = agent.log().len();
        let looping = harness::until_denied(client, to, 60.0)?;
        let yaml = weft_tests::agent::config_yaml(&deny)?;
        let written = unix_now();
        agent.write_config_text(&yaml)?;
        match harness::result_of(looping, Duration::from_secs(90)) {
            Ok(v) => {
                let denied = f(&v, "denied_unix_s");
                let log = agent.log();
                let reloaded = log
                    .get(log_offset..)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.contains("config reloaded"))
                    .and_then(log_unix);
                println!(
                    "  policy change: denied {:.1} ms after the write ({}), agent reload at {}",
                    (denied - written) * 1e3,
                    v["error"],
                    reloaded.map_or("?".into(), |r| format!("+{:.1} ms", (r - written) * 1e3))
                );
                if denied < written {
                    report.fail(
                        key,
                        "one policy change",
                        &anyhow::anyhow!("the client was refused before the policy change: {v}"),
                    );
                } else {
                    let change = "one policy change to the data path";
                    report.add(
                        key,
                        &format!("{change}: config write → first denied connection"),
                        "ms",
                        (denied - written) * 1e3,
                    );
                    if let Some(r) = reloaded.filter(|r| *r >= written - 0.01) {
                        report.add(
                            key,
                            &format!("{change}: config write → agent log \"config reloaded\""),
                            "ms",
                            (r - written) * 1e3,
                        );
                        report.add(
                            key,
                            &format!("{change}: agent log, reload → first denied connection"),
                            "ms",
                            (denied - r) * 1e3,
                        );
                    }
                }
            }
            Err(e) => report.fail(key, "one policy change", &e),
        }
        apply(agent, &deny)?;
    }
    // Back to the node's own state.
    apply(agent, &node.config())
}

/// `SERVER_POLICIES` ALLOW policies selecting the server pod (label `app`), each admitting
/// other sources first and the client last, so every one is evaluated to its end.
fn server_policies(port: u16) -> Vec<Value> {
    (0..SERVER_POLICIES)
        .map(|i| {
            json!({
                "name": format!("server-allow-{i}"),
                "namespace": "default",
                "selector": { "matchLabels": { "app": SERVER_APP } },
                "action": "ALLOW",
                "rules": [
                    { "from": [{ "namespaces": [format!("ns{i}")] }], "toPorts": [9090] },
                    {
                        "from": [
                            { "principals": [format!("spiffe://cluster.local/ns/ns{i}/sa/sa{i}")] },
                            { "serviceAccounts": [format!("ns{}/sa{i}", i + 1)] },
                            { "principals": [CLIENT_ID] },
                        ],
                        "toPorts": [port, "9000-9100"],
                    },
                ],
            })
        })
        .collect()
}

const SERVER_POLICIES: usize = 10;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
