//! `shoal-engine` binary: parses the command line, sets up logging and starts a role.

mod bench_insert;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_engine::cli::Role;
use shoal_engine::config::LogFormat;

#[derive(Parser)]
#[command(name = "shoal-engine", version, about = "Shoal vector search engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// The engine's roles (`shoal_engine::cli::Role`, the parser the operator is tested against).
    #[command(flatten)]
    Role(Role),
    /// Insert benchmark client: stream an .fvecs file into a running server through REST.
    BenchInsert(bench_insert::BenchInsertArgs),
    /// Search benchmark: build an index in-process from .fvecs/.ivecs files, sweep, print JSON lines.
    Bench(shoal_engine::bench::BenchArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Role(Role::Standalone(args)) => {
            let cfg = args.resolve().context("invalid configuration")?;
            init_logging(cfg.log_format);
            shoal_engine::memory::tune_allocator();
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(shoal_engine::roles::standalone::run(cfg, shutdown_signal()))
                .context("standalone server failed")?;
            Ok(())
        }
        Command::Role(Role::Writer(args)) => {
            let cfg = args.resolve().context("invalid configuration")?;
            init_logging(cfg.log_format);
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(shoal_engine::roles::writer::run(cfg, shutdown_signal()))
                .context("writer failed")?;
            Ok(())
        }
        Command::Role(Role::Reader(args)) => {
            let cfg = args.resolve().context("invalid configuration")?;
            init_logging(cfg.log_format);
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(shoal_engine::roles::reader::run(cfg, shutdown_signal()))
                .context("reader failed")?;
            Ok(())
        }
        Command::Role(Role::Router(args)) => {
            let cfg = args.resolve().context("invalid configuration")?;
            init_logging(cfg.log_format);
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(shoal_engine::roles::router::run(cfg, shutdown_signal()))
                .context("router failed")?;
            Ok(())
        }
        Command::BenchInsert(args) => {
            init_logging(LogFormat::Text);
            bench_insert::run(args)
        }
        Command::Bench(args) => shoal_engine::bench::run(args),
    }
}
