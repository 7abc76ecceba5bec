//! `cargo xtask demo`: a guided tour for a newcomer. Builds one simulated node with the
//! end-to-end harness (`weft-tests`), runs the real agent on it, sends traffic between
//! pods and explains, from the applications' and the proxy's points of view, which
//! connections went through the proxy and which did not. Cleans up and ends with
//! `demo: ok` (or fails, saying what did not behave as described).

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use weft_tests::{
    ConnRecord, Service, TestAgent, TestNode, TestPod,
    app::{self, Mode, SendReport, Server},
    bpf,
};

use crate::{cargo, setup};

pub fn run() -> Result<()> {
    setup::ensure()?;
    println!("== building the agent and the demo's test application ==");
    let agent_bin = cargo::build_agent()?;
    cargo::run(cargo::cargo().args(["build", "-p", "weft-tests", "--bins"]))?;
    if let Some(missing) = weft_tests::missing_requirement() {
        bail!("the demo cannot run here: {missing}");
    }
    let problems = tour(&agent_bin.display().to_string())?;
    // The node (and everything it created) is gone by now.
    println!("\n== cleaned up: namespaces, cgroups and pins of the demo node are removed ==");
    if !problems.is_empty() {
        for p in &problems {
            println!("PROBLEM: {p}");
        }
        bail!(
            "{} thing(s) did not behave as described above",
            problems.len()
        );
    }
    println!("demo: ok");
    Ok(())
}

/// The tour proper; returns what did not behave as expected.
fn tour(agent_bin: &str) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    println!("\n== 1. a node with four pods ==");
    let node = TestNode::new("demo", 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let legacy = node
        .pod("legacy")
        .service_account("legacy")
        .enrolled(false)
        .create()?;
    let batch = node
        .pod("batch")
        .service_account("batch")
        .enrolled(false)
        .create()?;
    node.add_service(Service {
        name: "echo".into(),
        namespace: "default".into(),
        vips: vec![VIP],
        ports: vec![(VIP_PORT, APP_PORT)],
        endpoints: vec![server.ip()],
    });
    println!(
        "The node is network namespace {} with a bridge at {}.",
        node.netns_name(),
        node.bridge_ip()
    );
    println!("Each pod is its own network namespace and cgroup, like a Kubernetes pod:");
    for pod in [&client, &server, &legacy, &batch] {
        println!(
            "  {:<7} {:<10} {}",
            pod.name(),
            pod.ip(),
            if pod.enrolled() {
                "in the mesh (enrolled)"
            } else {
                "NOT in the mesh"
            }
        );
    }
    println!(
        "  service default/echo: VIP {VIP}:{VIP_PORT} → server:{APP_PORT} (no kube-proxy here: \
         only the mesh can resolve it)"
    );

    println!("\n== 2. the agent ==");
    let mut agent = node.start_agent()?;
    agent.show_log_on_drop(false);
    println!(
        "`{agent_bin} agent --config {}` is ready.",
        agent.config_path().display()
    );
    println!(
        "It attached connect4/connect6/sock_ops to the pods' cgroup root\n  {}\nand an \
         sk_lookup program to the network namespace of each enrolled pod, and opened its\n\
         listeners (15001 outbound, 15006 inbound) inside those pods.",
        node.cgroup_root().display()
    );
    let attached = bpf::cgroup_attachments(&node.cgroup_root())?;
    let kinds: Vec<String> = attached
        .iter()
        .map(|a| format!("{} ({})", a.attach_type, a.name))
        .collect();
    println!("bpftool cgroup show: {}", kinds.join(", "));

    println!("\n== 3. traffic ==");
    let server_app = app::serve(&server, APP_PORT, Mode::Echo)?;
    let legacy_app = app::serve(&legacy, APP_PORT, Mode::Echo)?;
    println!("An echo application listens on port {APP_PORT} in `server` and in `legacy`.");
    let cases = [
        Case::new(
            "enrolled → enrolled",
            &client,
            server.ip(),
            APP_PORT,
            &server,
            &server_app,
            Expect::BOTH,
        ),
        Case::new(
            "enrolled → service VIP",
            &client,
            VIP,
            VIP_PORT,
            &server,
            &server_app,
            Expect::BOTH,
        ),
        Case::new(
            "enrolled → not enrolled",
            &client,
            legacy.ip(),
            APP_PORT,
            &legacy,
            &legacy_app,
            Expect::OUT,
        ),
        Case::new(
            "not enrolled → enrolled",
            &batch,
            server.ip(),
            APP_PORT,
            &server,
            &server_app,
            Expect::IN,
        ),
        Case::new(
            "not enrolled → not enrolled",
            &batch,
            legacy.ip(),
            APP_PORT,
            &legacy,
            &legacy_app,
            Expect::NONE,
        ),
    ];
    let mut table = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let seen = ids(&agent)?;
        let sent = app::send(case.from, case.to, 64 * 1024, i as u64 + 1)?;
        let records = new_records(&agent, &seen, case.expect.count())?;
        let verdict = explain(i + 1, case, &sent, &records, &mut problems);
        table.push((case, verdict));
    }
    println!("\nIn short:");
    println!(
        "  {:<30} {:<25} {:<9} inbound",
        "", "connection", "outbound"
    );
    for (case, (outbound, inbound)) in table {
        let yes_no = |b: bool| if b { "proxied" } else { "direct" };
        println!(
            "  {:<30} {:<25} {:<9} {}",
            case.what,
            format!("{} → {}", case.from.name(), case.to),
            yes_no(outbound),
            yes_no(inbound)
        );
    }

    println!("\n== 4. the eBPF maps, as the kernel holds them ==");
    let pods_pin = node.pin_root().join("PODS");
    println!("$ bpftool map dump pinned {}", pods_pin.display());
    match bpf::map_dump_text(&pods_pin) {
        Ok(text) => print!("{text}"),
        Err(e) => problems.push(format!("bpftool map dump: {e:#}")),
    }
    println!(
        "One entry per enrolled pod (client and server): the key is the pod's network \
         namespace cookie, the value its record. legacy and batch are absent."
    );

    println!("\n== 5. weft status (the agent's own account) ==");
    let mut status = node.spawn(
        {
            let mut cmd = Command::new(agent_bin);
            cmd.arg("status");
            cmd
        },
        "weft-status",
    )?;
    let done = status.wait(Duration::from_secs(20))?;
    print!("{}", done.output);
    if !done.status.success() {
        problems.push(format!("`weft status` failed ({})", done.status));
    }
    // The agent's own log helps only when something went wrong.
    agent.show_log_on_drop(!problems.is_empty());
    drop(agent);
    Ok(problems)
}

/// One connection of the tour.
struct Case<'a> {
    what: &'static str,
    from: &'a TestPod,
    to: SocketAddr,
    dest: &'a TestPod,
    dest_app: &'a Server,
    expect: Expect,
}

impl<'a> Case<'a> {
    fn new(
        what: &'static str,
        from: &'a TestPod,
        ip: Ipv4Addr,
        port: u16,
        dest: &'a TestPod,
        dest_app: &'a Server,
        expect: Expect,
    ) -> Self {
        Case {
            what,
            from,
            to: SocketAddr::from((ip, port)),
            dest,
            dest_app,
            expect,
        }
    }
}

/// Which proxy records a connection should produce.
#[derive(Clone, Copy)]
struct Expect {
    outbound: bool,
    inbound: bool,
}

impl Expect {
    const BOTH: Expect = Expect {
        outbound: true,
        inbound: true,
    };
    const OUT: Expect = Expect {
        outbound: true,
        inbound: false,
    };
    const IN: Expect = Expect {
        outbound: false,
        inbound: true,
    };
    const NONE: Expect = Expect {
        outbound: false,
        inbound: false,
    };

    fn count(self) -> usize {
        usize::from(self.outbound) + usize::from(self.inbound)
    }
}

/// Says what happened to one connection; returns (outbound proxied, inbound proxied).
fn explain(
    n: usize,
    case: &Case<'_>,
    sent: &SendReport,
    records: &[ConnRecord],
    problems: &mut Vec<String>,
) -> (bool, bool) {
    let (what, to) = (case.what, case.to);
    println!(
        "\n{n}. {what}: `{}` connects to {to} and sends 64 KiB",
        case.from.name()
    );
    let intact = sent.received_sha256 == sent.sent_sha256 && sent.received_bytes == sent.sent_bytes;
    println!(
        "   client app: {} bytes echoed back {} (sha256 {}…)",
        sent.received_bytes,
        if intact { "intact" } else { "CORRUPTED" },
        &sent.sent_sha256[..12]
    );
    if !intact {
        problems.push(format!("{what}: payload not intact"));
    }
    if sent.peer == to {
        println!("   its socket is connected straight to {to}");
    } else {
        println!(
            "   its socket is connected to {} (connect4 rewrote {to} to the proxy's outbound \
             listener inside the pod; the app did not notice)",
            sent.peer
        );
    }
    match case
        .dest_app
        .closed()
        .into_iter()
        .find(|c| c.received_sha256 == sent.sent_sha256)
    {
        Some(c) => {
            let how = if c.peer.ip() == case.dest.ip() {
                " (that is the proxy, connecting from inside the pod)"
            } else {
                ""
            };
            println!(
                "   server app in `{}`: received the same {} bytes (same sha256), from {}{how}",
                case.dest.name(),
                c.received_bytes,
                c.peer
            );
        }
        None => {
            println!(
                "   server app in `{}`: has no record of these bytes",
                case.dest.name()
            );
            problems.push(format!("{what}: the server app did not record the payload"));
        }
    }
    let outbound = records.iter().find(|r| r.direction == "outbound");
    let inbound = records.iter().find(|r| r.direction == "inbound");
    match outbound {
        Some(r) => println!(
            "   proxy, outbound for {}: original destination {}, connected to {}, {} bytes \
             sent / {} received",
            r.pod,
            r.dst,
            r.upstream.as_deref().unwrap_or("?"),
            r.bytes_sent,
            r.bytes_received
        ),
        None => println!(
            "   no outbound proxy: `{}` is not in the mesh",
            case.from.name()
        ),
    }
    match inbound {
        Some(r) => println!(
            "   proxy, inbound for {}: sk_lookup steered the connection from {} to 15006; the \
             proxy delivered it to the app over the pod's loopback, {} bytes each way",
            r.pod, r.src, r.bytes_sent
        ),
        None => println!(
            "   no inbound proxy: `{}` is not in the mesh, its app got the connection directly",
            case.dest.name()
        ),
    }
    let (out, inb) = (outbound.is_some(), inbound.is_some());
    if out || inb {
        println!("   → went through the proxy");
    } else {
        println!("   → did NOT go through the proxy");
    }
    if out != case.expect.outbound || inb != case.expect.inbound {
        problems.push(format!(
            "{what}: expected outbound={} inbound={}, the proxy recorded {records:?}",
            case.expect.outbound, case.expect.inbound
        ));
    }
    (out, inb)
}

fn ids(agent: &TestAgent) -> Result<HashSet<u64>> {
    Ok(agent.connections()?.all().map(|r| r.id).collect())
}

/// Records that appeared since `seen`; waits (briefly) until `expected` of them are there.
fn new_records(agent: &TestAgent, seen: &HashSet<u64>, expected: usize) -> Result<Vec<ConnRecord>> {
    let deadline = Instant::now() + Duration::from_secs(if expected == 0 { 1 } else { 5 });
    loop {
        let all = agent.connections().context("GET /debug/connections")?;
        let new: Vec<ConnRecord> = all
            .recent
            .iter()
            .filter(|r| !seen.contains(&r.id))
            .cloned()
            .collect();
        if new.len() >= expected.max(1) || Instant::now() > deadline {
            return Ok(new);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

const APP_PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_PORT: u16 = 80;
