//! `tether`: live-migrate stateful services between hosts with CRIU.

use clap::{Parser, Subcommand};

mod cli;

/// Live migration of stateful edge services with CRIU, keeping client connections open.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about, long_about = None)]
struct Args {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info`, `tether_migrator=debug`.
    #[arg(long, global = true, env = "TETHER_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // No doc comment here: it would replace the long help of `CertsArgs` with one line.
    Certs(cli::certs::CertsArgs),
    // No doc comment here: it would replace the long help of `AgentArgs` with one line.
    Agent(cli::agent::AgentArgs),
    // No doc comment here: it would replace the long help of `MigrateArgs` with one line.
    Migrate(cli::migrate::MigrateArgs),
    // No doc comment here: it would replace the long help of `PlanArgs` with one line.
    Plan(cli::plan::PlanArgs),
    // No doc comment here: it would replace the long help of `CalibrateArgs` with one line.
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Measure how fast a running process tree writes memory.
    DirtyRate(cli::dirty_rate::DirtyRateArgs),
    /// Run the L4 proxy that keeps client flows open across migrations.
    Proxy(cli::proxy::ProxyArgs),
    /// Control a running proxy: status, flows, pause, redirect, resume.
    Proxyctl(cli::proxyctl::ProxyctlArgs),
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::debug!(soft, hard, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit to its hard limit: {e}"),
    }
    let result = match args.command {
        Command::Certs(a) => cli::certs::run(a),
        Command::Agent(a) => cli::runtime().and_then(|rt| rt.block_on(cli::agent::run(a))),
        Command::Migrate(a) => cli::runtime().and_then(|rt| rt.block_on(cli::migrate::run(a))),
        Command::Plan(a) => cli::plan::run(a),
        Command::Calibrate(a) => cli::calibrate::run(a),
        Command::DirtyRate(a) => cli::dirty_rate::run(a),
        Command::Proxy(a) => cli::runtime().and_then(|rt| rt.block_on(cli::proxy::run(a))),
        Command::Proxyctl(a) => cli::runtime().and_then(|rt| rt.block_on(cli::proxyctl::run(a))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
