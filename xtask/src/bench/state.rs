//! The big state of the control-plane and policy rows: many remote workloads, services and
//! AccessPolicies added to a node's config, shaped like a mesh of many teams.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::plan::Plan;

/// Adds `cp_workloads` remote workloads (labelled `app`, `tier`; 50 namespaces, 200
/// service accounts) and `cp_services` services of 5 endpoints each to `config`.
pub fn add_big_state(plan: &Plan, config: &mut Value) -> Result<()> {
    let workloads = config["workloads"]
        .as_array_mut()
        .context("config has workloads")?;
    for i in 0..plan.cp_workloads {
        workloads.push(json!({
            "name": format!("w{i}"),
            "namespace": format!("ns{}", i % 50),
            "serviceAccount": format!("sa{}", i % 200),
            "ips": [big_ip(i)],
            "node": format!("remote-{}", i % 100),
            "enrolled": true,
            "labels": { "app": format!("app{}", (i / 50) % 20), "tier": TIERS[i % 3] },
        }));
    }
    let services = config["services"]
        .as_array_mut()
        .context("config has services")?;
    for i in 0..plan.cp_services {
        let endpoints: Vec<String> = (0..5)
            .map(|k| big_ip((i * 5 + k) % plan.cp_workloads.max(1)))
            .collect();
        services.push(json!({
            "name": format!("svc{i}"),
            "namespace": format!("ns{}", i % 50),
            "vips": [format!("10.96.{}.{}", i / 250, i % 250 + 1)],
            "ports": [{ "port": 80, "targetPort": 8080 }],
            "endpoints": endpoints,
        }));
    }
    Ok(())
}

fn big_ip(i: usize) -> String {
    format!(
        "10.{}.{}.{}",
        100 + i / 65_000,
        (i / 250) % 256,
        i % 250 + 2
    )
}

pub fn policy_list(config: &mut Value) -> Result<&mut Vec<Value>> {
    if config["policies"].is_null() {
        config["policies"] = json!([]);
    }
    config["policies"]
        .as_array_mut()
        .context("config has a policies list")
}

/// `n` AccessPolicies as a mesh of many teams would have them: in 50 namespaces, each
/// selecting one `app` of its namespace (one in ten the whole namespace); mostly ALLOW
/// (one in ten DENY); sources by principal, service account, namespace and IP block; port
/// lists and ranges. Policy `i` selects `app{(i / 50) % 20}` in `ns{i % 50}`, the workloads
/// of [`add_big_state`], ten of them each.
pub fn background_policies(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let ns = format!("ns{}", i % 50);
            let mut rules = vec![json!({
                "from": [
                    { "principals": [format!(
                        "spiffe://cluster.local/ns/ns{}/sa/sa{}", (i + 1) % 50, i % 200)] },
                    { "namespaces": [format!("ns{}", (i + 7) % 50), "monitoring"] },
                ],
                "toPorts": [8080, "9000-9100"],
            })];
            if i % 4 == 0 {
                rules.push(json!({
                    "from": [{ "ipBlocks": [{
                        "cidr": format!("10.{}.0.0/16", 100 + i % 50),
                        "except": [format!("10.{}.9.0/24", 100 + i % 50)],
                    }] }],
                    "toPorts": [443],
                }));
            }
            if i % 5 == 1 {
                rules.push(json!({
                    "from": [{ "serviceAccounts": [format!("ns{}/sa{}", (i + 3) % 50, i % 200)] }],
                }));
            }
            let mut policy = json!({
                "name": format!("policy-{i}"),
                "namespace": ns,
                "action": if i % 10 == 3 { "DENY" } else { "ALLOW" },
                "rules": rules,
            });
            if i % 10 != 9 {
                policy["selector"] =
                    json!({ "matchLabels": { "app": format!("app{}", (i / 50) % 20) } });
            }
            policy
        })
        .collect()
}

const TIERS: [&str; 3] = ["web", "api", "db"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_policies_select_the_big_state() {
        let policies = background_policies(1_000);
        assert_eq!(policies.len(), 1_000);
        let deny = policies.iter().filter(|p| p["action"] == "DENY").count();
        assert_eq!(deny, 100);
        // Policy i selects app{(i / 50) % 20} of ns{i % 50}: every pair once.
        let mut pairs: Vec<(String, String)> = policies
            .iter()
            .filter_map(|p| {
                let app = p["selector"]["matchLabels"]["app"].as_str()?;
                Some((p["namespace"].as_str()?.to_string(), app.to_string()))
            })
            .collect();
        let selecting = pairs.len();
        pairs.sort();
        pairs.dedup();
        assert_eq!((selecting, pairs.len()), (900, 900));
    }
}
