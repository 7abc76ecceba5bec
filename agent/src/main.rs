//! The `weft` binary.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use weft::{
    app,
    cli::{AgentArgs, Cli, Command, StatusArgs},
    config::{self, Config, Overrides},
    source, status, telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent(args),
        Command::Status(args) => status_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            // 2: the configuration is wrong (fix the file); 1: anything else.
            if e.downcast_ref::<config::Error>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let doc = source::file::load(&args.config)?;
    let config = Config::new(
        &args.config,
        &doc.agent,
        Overrides {
            pin_root: args.pin_root,
            cgroup_root: args.cgroup_root,
            admin_addr: args.admin_addr,
            readiness_addr: args.readiness_addr,
        },
    )?;
    tracing::info!(component = "app", config = %serde_json::to_string(&config).unwrap_or_default(), "starting weft agent");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(app::run(config, doc))?;
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
