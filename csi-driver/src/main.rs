//! `shoal-csi`: the CSI driver binary (node DaemonSet, controller Deployment, or both).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shoal_csi::driver::{Config, Driver, Mode};
use shoal_csi::metrics::Metrics;
use shoal_csi::mounter::JuiceFsMounter;
use shoal_csi::service;
use tracing::{info, warn};

/// CSI v1 driver `csi.shoal.dev`: volumes are directories of a JuiceFS filesystem.
///
/// CreateVolume makes a directory per volume in the filesystem named by the provisioner
/// secret (JuiceFS CSI field names: name, metaurl, storage, bucket, access-key, secret-key,
/// format-options). NodeStageVolume runs one `juicefs mount` per volume per node (in its own
/// session, so restarting shoal-csi keeps it); NodePublishVolume bind-mounts the volume's
/// directory into the pod. A watchdog remounts dead mounts (ENOTCONN) and re-binds targets.
#[derive(Debug, Parser)]
#[command(name = "shoal-csi", version, about, long_about)]
struct Args {
    /// gRPC endpoint, a unix socket.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id, returned by NodeGetInfo (required for --mode node|all).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Services to serve: node (DaemonSet), controller (provisioner), or all.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// Durable state (staged volumes, 0600), mount logs, caches and controller mounts.
    #[arg(
        long,
        env = "SHOAL_CSI_STATE_DIR",
        default_value = "/var/lib/shoal-csi"
    )]
    state_dir: PathBuf,
    /// The `juicefs` client binary (a name is looked up in PATH).
    #[arg(long, env = "JUICEFS_BIN", default_value = "juicefs")]
    juicefs: PathBuf,
    /// Address for the Prometheus `/metrics` endpoint; "off" disables it.
    #[arg(long, default_value = "0.0.0.0:9810")]
    metrics_listen: String,
    /// Watchdog period in milliseconds (it also wakes at once when a mount process exits).
    #[arg(long, default_value_t = 2000)]
    watchdog_interval_ms: u64,
    /// Serve gRPC on the socket directly, without the HTTP/2 front that replaces the socket-path
    /// `:authority` kubelets before 1.26 send (which tonic's h2 rejects). Only for clusters whose
    /// kubelets are all 1.26 or newer.
    #[arg(long)]
    no_authority_shim: bool,
}

fn resolve_binary(p: &Path) -> PathBuf {
    if p.components().count() > 1 {
        return p.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .unwrap_or_else(|| p.to_path_buf())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let node_id = match (args.mode.node(), args.node_id) {
        (true, None) => anyhow::bail!("--node-id (or NODE_ID) is required with --mode node|all"),
        (_, id) => id.unwrap_or_default(),
    };
    let socket = service::socket_path(&args.endpoint)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    let juicefs = resolve_binary(&args.juicefs);
    let mounter = Arc::new(JuiceFsMounter::new(juicefs.clone(), args.state_dir.clone()));
    let wake = mounter.exit_notify();
    let metrics = Arc::new(Metrics::new());
    let config = Config {
        node_id,
        state_dir: args.state_dir.clone(),
        mode: args.mode,
        watchdog_interval: Duration::from_millis(args.watchdog_interval_ms.max(50)),
    };
    let driver = Arc::new(Driver::new(config, mounter, metrics.clone())?);
    info!(
        version = shoal_csi::VERSION,
        driver = shoal_csi::DRIVER_NAME,
        juicefs = %juicefs.display(),
        state_dir = %args.state_dir.display(),
        "starting"
    );

    if args.mode.node() {
        // Re-adopt what a previous run staged: healthy mounts are kept, dead ones healed.
        let d = driver.clone();
        let remounted = tokio::task::spawn_blocking(move || d.reconcile()).await?;
        info!(
            staged = driver.staged_snapshot().len(),
            remounted, "re-adopted staged volumes"
        );
        tokio::spawn(service::watchdog(driver.clone(), wake));
    }
    if args.metrics_listen != "off" {
        let addr: SocketAddr = args
            .metrics_listen
            .parse()
            .with_context(|| format!("--metrics-listen {:?}", args.metrics_listen))?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = shoal_csi::metrics::serve(addr, m).await {
                warn!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot watch SIGTERM: {e}");
                    return std::future::pending().await;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Mounts are left in place on purpose: pods keep their volumes across a plugin restart.
        info!("shutting down; JuiceFS mounts stay up");
    };
    let front = if args.no_authority_shim {
        service::Front::Direct
    } else {
        service::Front::AuthorityShim
    };
    service::serve(driver, &socket, front, shutdown).await?;
    Ok(())
}
