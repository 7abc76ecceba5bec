//! The `weft` binary.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use weft::{
    app, ca,
    cli::{
        AgentArgs, CaArgs, CaCommand, CaInitArgs, Cli, CniCommand, CniDirs, CniInstallArgs,
        Command, StatusArgs, UninstallArgs,
    },
    cni,
    config::{Config, Overrides},
    settings, source, status, telemetry, uninstall,
};

fn main() -> ExitCode {
    // Runtimes exec `/opt/cni/bin/<type>` with no arguments: under that name, be the plugin.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new(cni::PLUGIN_TYPE)) {
        return cni_plugin();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent(args),
        Command::Waypoint(args) => l7_command(args.l7.log_format, args.settings()),
        Command::Gateway(args) => l7_command(args.l7.log_format, args.settings()),
        Command::Status(args) => status_command(&args),
        Command::Ca(args) => ca_command(args),
        Command::Uninstall(args) => uninstall_command(&args),
        Command::Cni(args) => match args.command {
            None => return cni_plugin(),
            Some(CniCommand::Install(args)) => cni_install(&args),
            Some(CniCommand::Uninstall(dirs)) => cni_uninstall(&dirs),
        },
    };
    // The last connections' access-log lines and the last logs may still be queued.
    telemetry::line_writer::flush_at_exit();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            // 2: the configuration is wrong (fix the file); 1: anything else.
            if e.downcast_ref::<settings::Error>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    raise_open_file_limit();
    let doc = match args.source {
        source::Kind::File => source::file::load(&args.config)?,
        source::Kind::Kubernetes => source::file::load_settings(&args.config)?,
    };
    let mut config = Config::new(
        &args.config,
        &doc.agent,
        Overrides {
            pin_root: args.pin_root,
            cgroup_root: args.cgroup_root,
            admin_addr: args.admin_addr,
            readiness_addr: args.readiness_addr,
            metrics_addr: args.metrics_addr,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            worker_threads: args.worker_threads,
            resolv_conf: args.resolv_conf,
            dns_servers: args.dns_servers,
        },
    )?;
    let source = match (args.source, args.node_name) {
        (source::Kind::File, _) => app::Source::File,
        (source::Kind::Kubernetes, Some(node)) => {
            config.node.clone_from(&node);
            app::Source::Kubernetes(source::kube::Config::new(node))
        }
        (source::Kind::Kubernetes, None) => {
            anyhow::bail!("--node-name (WEFT_NODE_NAME) is required with --source kubernetes")
        }
    };
    tracing::info!(component = "app", config = %serde_json::to_string(&config).unwrap_or_default(), "starting weft agent");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(config.worker_threads)
        .thread_name("weft")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(app::run(config, doc, source))?;
    Ok(())
}

/// `weft waypoint` and `weft gateway`: one L7 engine, facing the mesh or the outside.
fn l7_command(
    log_format: telemetry::LogFormat,
    settings: Result<app::waypoint::Settings, app::waypoint::Error>,
) -> anyhow::Result<()> {
    telemetry::init(log_format);
    raise_open_file_limit();
    let settings = settings?;
    let component = settings.face.component();
    tracing::info!(component = "app", config = %serde_json::to_string(&settings).unwrap_or_default(), "starting weft {component}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(format!("weft-{component}"))
        .build()
        .context("cannot start the async runtime")?;
    match (settings.source, settings.config_path.clone()) {
        (source::Kind::Kubernetes, settings_file) => {
            // In the cluster an optional file carries the mesh settings only.
            let mesh = match settings_file {
                Some(path) => source::file::load_settings(&path)?.snapshot.mesh,
                None => Default::default(),
            };
            runtime.block_on(app::waypoint::run_kubernetes(settings, mesh))?;
        }
        (source::Kind::File, Some(path)) => {
            let doc = source::file::load(&path)?;
            runtime.block_on(app::waypoint::run(settings, doc, None, None))?;
        }
        (source::Kind::File, None) => anyhow::bail!("--config <state file> is required"),
    }
    Ok(())
}

/// Every proxied connection holds two or three sockets, and the soft limit is often 1024:
/// take the hard limit, as proxies do, so a busy node runs out of memory before it runs
/// out of descriptors.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(
                component = "app",
                from = soft,
                to = hard,
                "raised the open-file limit"
            ),
            Err(e) => {
                tracing::warn!(component = "app", limit = soft, error = %e, "cannot raise the open-file limit")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(component = "app", error = %e, "cannot read the open-file limit"),
    }
}

/// The CNI plugin: stdout is the runtime's (result or CNI error JSON), stderr its log.
fn cni_plugin() -> ExitCode {
    let outcome = cni::plugin::run(
        std::io::stdin().lock(),
        &cni::plugin::ProcessEnv,
        &mut std::io::stderr(),
    );
    print!("{}", outcome.stdout);
    if outcome.code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cni_install(args: &CniInstallArgs) -> anyhow::Result<()> {
    use cni::install::{self, Change};
    telemetry::init(args.log_format);
    let exe = std::env::current_exe().context("cannot find this binary to install it")?;
    let binary = install::install_binary(&exe, &args.dirs.bin_dir)?;
    tracing::info!(component = "cni", binary = %binary.display(), "installed the CNI plugin binary");
    let plugin = install::Plugin {
        socket: args.socket.clone(),
        mesh_namespaces_file: args.mesh_namespaces_file.clone(),
    };
    loop {
        match install::ensure(&args.dirs.conf_dir, &plugin) {
            Ok(Change::Unchanged(_)) => {}
            Ok(Change::Inserted(path)) => {
                tracing::info!(component = "cni", config = %path.display(), "weft-cni appended to the primary CNI config")
            }
            Ok(Change::Converted { from, to }) => {
                tracing::info!(component = "cni", from = %from.display(), to = %to.display(), "primary CNI config converted to a conflist ending with weft-cni")
            }
            Err(e) if args.watch => {
                tracing::warn!(component = "cni", error = %e, "cannot insert weft-cni yet; retrying")
            }
            Err(e) => return Err(e.into()),
        }
        if !args.watch {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}

fn cni_uninstall(dirs: &CniDirs) -> anyhow::Result<()> {
    let changed = cni::install::uninstall(&dirs.conf_dir, &dirs.bin_dir)?;
    for path in changed {
        println!("removed weft-cni from {}", path.display());
    }
    println!("removed {}", dirs.bin_dir.join(cni::PLUGIN_TYPE).display());
    Ok(())
}

fn status_command(args: &StatusArgs) -> anyhow::Result<()> {
    let status = status::fetch(args.admin_addr)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status::render(&status));
    }
    Ok(())
}

fn ca_command(args: CaArgs) -> anyhow::Result<()> {
    match (args.command, args.config) {
        (Some(CaCommand::Init(init)), _) => ca_init(&init),
        (None, Some(path)) => ca_serve(&path, args.log_format),
        (None, None) => anyhow::bail!("`weft ca` needs --config <ca.yaml> (or `weft ca init`)"),
    }
}

fn ca_init(args: &CaInitArgs) -> anyhow::Result<()> {
    let paths = ca::init(&args.out, &args.trust_domain)?;
    println!(
        "created the root CA of trust domain {}:\n  certificate {}\n  key         {} (mode 0600: keep it on the CA host only)",
        args.trust_domain,
        paths.cert.display(),
        paths.key.display()
    );
    Ok(())
}

fn ca_serve(path: &std::path::Path, log_format: telemetry::LogFormat) -> anyhow::Result<()> {
    telemetry::init(log_format);
    let config = ca::Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft-ca")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = ca::Server::bind(config).await?;
        tracing::info!(component = "ca", listen = %server.local_addr()?, "CA server listening");
        if let Some(metrics) = server.metrics_addr() {
            tracing::info!(component = "ca", listen = %metrics, "CA metrics listening");
        }
        server.run(shutdown_signal()).await;
        tracing::info!(component = "ca", "CA server stopped");
        anyhow::Ok(())
    })
}

fn uninstall_command(args: &UninstallArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.wait_for_agent {
        println!("waiting until no agent answers on {addr}");
        uninstall::wait_for_agent_gone(addr, args.timeout, std::time::Duration::from_secs(1))?;
    }
    match uninstall::remove_pins(&args.pin_root)? {
        uninstall::Removed::PinRoot(root) => println!(
            "removed every weft link and map pinned under {} (programs detached)",
            root.display()
        ),
        uninstall::Removed::Nothing(root) => {
            println!("nothing to remove: {} does not exist", root.display())
        }
    }
    Ok(())
}

/// SIGTERM or ctrl-c.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(component = "ca", error = %e, "cannot watch SIGTERM; stopping on ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
