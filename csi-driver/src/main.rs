//! `shoal-csi`: the CSI driver binary (node DaemonSet, controller Deployment, or both).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shoal_csi::driver::{Config, Driver, Mode};
use shoal_csi::metrics::Metrics;
use shoal_csi::mounter::{JuiceFsMounter, Mounter};
use shoal_csi::mountpod::{KubeMountPodApi, MountPodConfig, PodMounter};
use shoal_csi::service;
use tracing::{info, warn};

/// CSI v1 driver `csi.shoal.dev`: volumes are directories of a JuiceFS filesystem.
///
/// CreateVolume makes a directory per volume in the filesystem named by the provisioner
/// secret (JuiceFS CSI field names: name, metaurl, storage, bucket, access-key, secret-key,
/// format-options). NodeStageVolume runs one `juicefs mount` per volume per node: with
/// `--mount-mode pod` in a mount pod of its own (it outlives this container), with `process` in
/// this container; NodePublishVolume bind-mounts the volume's directory into the pod. A watchdog
/// remounts dead mounts (ENOTCONN) and re-binds targets.
#[derive(Debug, Parser)]
#[command(
    name = "shoal-csi",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// What a mount pod runs: clears a dead mount left at the mount point by a crashed client
    /// (lazy unmount), then execs the given `juicefs mount ...` in the foreground, so signals
    /// reach juicefs. Credentials come from the environment (the pod's Secret).
    MountPod {
        /// The staging path the client mounts.
        #[arg(long)]
        mount_point: PathBuf,
        /// The command to exec: the juicefs binary and its arguments.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<std::ffi::OsString>,
    },
}

/// Where the node plugin runs its `juicefs mount` clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MountMode {
    /// In this process's container (its own session): a restart of the container kills them.
    Process,
    /// One mount pod per staged filesystem: they outlive the plugin's container.
    Pod,
}

#[derive(Debug, clap::Args)]
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
    /// NodeGetInfo's max_volumes_per_node: how many csi.shoal.dev volumes the scheduler puts on
    /// one node. Must be positive (the kubelet rejects 0 as an attach limit).
    #[arg(long, default_value_t = shoal_csi::driver::DEFAULT_MAX_VOLUMES_PER_NODE,
          value_parser = clap::value_parser!(i64).range(1..))]
    max_volumes_per_node: i64,
    /// Where staged filesystems' `juicefs mount` clients run: `process` (this container) or
    /// `pod` (one mount pod each, created through the Kubernetes API; they survive a restart
    /// of this container).
    #[arg(
        long,
        value_enum,
        env = "SHOAL_CSI_MOUNT_MODE",
        default_value = "process"
    )]
    mount_mode: MountMode,
    /// Pod mode: the namespace of mount pods and their Secrets (this pod's own).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Pod mode: the mount pods' image (shoal-csi's own: it carries shoal-csi and juicefs).
    #[arg(long, env = "SHOAL_CSI_MOUNT_POD_IMAGE")]
    mount_pod_image: Option<String>,
    /// Pod mode: the mount pods' imagePullPolicy.
    #[arg(
        long,
        env = "SHOAL_CSI_MOUNT_POD_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    mount_pod_image_pull_policy: String,
    /// Pod mode: the mount pods' priorityClassName ("" for none).
    #[arg(long, default_value = "system-node-critical")]
    mount_pod_priority_class: String,
    /// Pod mode: the host directory of the JuiceFS cache (default: <state-dir>/cache, right
    /// when the state dir is the same path on the host).
    #[arg(long)]
    mount_pod_cache_dir: Option<PathBuf>,
    /// Pod mode: shoal-csi inside the mount pod image.
    #[arg(long, default_value = "/usr/local/bin/shoal-csi")]
    mount_pod_shoal_csi: PathBuf,
    /// The kubelet root dir; mounted at the same path, Bidirectional, in this container and
    /// the mount pods. Staging paths under it are served by mount pods in pod mode.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MountPod {
            mount_point,
            command,
        }) => mount_pod(&mount_point, &command),
        None => tokio::runtime::Runtime::new()
            .context("starting the async runtime")?
            .block_on(plugin(cli.serve)),
    }
}

/// `shoal-csi mount-pod`: returns only when the exec failed.
fn mount_pod(mount_point: &Path, command: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let found = shoal_csi::mounter::prepare_mount_point(mount_point)
        .with_context(|| format!("readying {}", mount_point.display()))?;
    if let shoal_csi::mounter::MountState::Dead(_) = found {
        warn!(mount_point = %mount_point.display(), "detached the dead mount a previous client left");
    }
    let (program, args) = command
        .split_first()
        .context("mount-pod needs a command after --")?;
    info!(mount_point = %mount_point.display(), program = %Path::new(program).display(), "starting the client");
    let err = std::process::Command::new(program).args(args).exec();
    Err(anyhow::Error::new(err).context(format!("exec {}", Path::new(program).display())))
}

async fn plugin(args: Args) -> anyhow::Result<()> {
    let node_id = match (args.mode.node(), args.node_id.clone()) {
        (true, None) => anyhow::bail!("--node-id (or NODE_ID) is required with --mode node|all"),
        (_, id) => id.unwrap_or_default(),
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    let juicefs = resolve_binary(&args.juicefs);
    let host = JuiceFsMounter::new(juicefs.clone(), args.state_dir.clone());
    let wake = host.exit_notify();
    let config = Config {
        node_id: node_id.clone(),
        state_dir: args.state_dir.clone(),
        mode: args.mode,
        watchdog_interval: Duration::from_millis(args.watchdog_interval_ms.max(50)),
        max_volumes_per_node: args.max_volumes_per_node,
    };
    info!(
        version = shoal_csi::VERSION,
        driver = shoal_csi::DRIVER_NAME,
        juicefs = %juicefs.display(),
        state_dir = %args.state_dir.display(),
        mount_mode = ?args.mount_mode,
        "starting"
    );
    match args.mount_mode {
        MountMode::Process => run(args, config, Arc::new(host), wake).await,
        MountMode::Pod => {
            let namespace = args
                .namespace
                .clone()
                .context("--mount-mode pod needs --namespace (or POD_NAMESPACE)")?;
            let image = args.mount_pod_image.clone().context(
                "--mount-mode pod needs --mount-pod-image (or SHOAL_CSI_MOUNT_POD_IMAGE)",
            )?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (pod mount mode)")?;
            let api = KubeMountPodApi::new(client, &namespace, tokio::runtime::Handle::current());
            let cfg = MountPodConfig {
                namespace,
                node_name: node_id,
                image,
                image_pull_policy: args.mount_pod_image_pull_policy.clone(),
                kubelet_dir: args.kubelet_dir.clone(),
                cache_host_dir: args
                    .mount_pod_cache_dir
                    .clone()
                    .unwrap_or_else(|| args.state_dir.join("cache")),
                priority_class: Some(args.mount_pod_priority_class.clone())
                    .filter(|p| !p.is_empty()),
                shoal_csi: args.mount_pod_shoal_csi.clone(),
                juicefs: juicefs.clone(),
                mount_timeout: Duration::from_secs(60),
                termination_grace_seconds: 30,
                poll: Duration::from_millis(100),
            };
            run(
                args,
                config,
                Arc::new(PodMounter::new(api, host, cfg)),
                wake,
            )
            .await
        }
    }
}

async fn run<M: Mounter>(
    args: Args,
    config: Config,
    mounter: Arc<M>,
    wake: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let socket = service::socket_path(&args.endpoint)?;
    let metrics = Arc::new(Metrics::new());
    let driver = Arc::new(Driver::new(config, mounter, metrics.clone())?);
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
    let controller_dir = args.state_dir.join("controller");
    let unmount_controller = matches!(args.mode, Mode::Controller);
    service::serve(driver, &socket, front, shutdown).await?;
    if unmount_controller {
        release_controller_mounts(&controller_dir);
    }
    Ok(())
}

/// The controller's own mounts (the whole filesystem, for CreateVolume/DeleteVolume) serve no
/// pod: they are unmounted for good before the controller exits, and it waits for its juicefs
/// clients to exit, so the container's teardown never kills one mid-request
/// ([`shoal_csi::release`] says why that matters).
fn release_controller_mounts(dir: &Path) {
    let table = match shoal_csi::mountinfo::read_self() {
        Ok(m) => m,
        Err(e) => {
            warn!("cannot read the mount table to release controller mounts: {e}");
            return;
        }
    };
    let (released, children_gone) =
        shoal_csi::release::release_mounts_under(&table, dir, Duration::from_secs(10));
    for (path, outcome) in released {
        match outcome {
            shoal_csi::release::Released::Failed(why) => {
                warn!(path = %path.display(), "cannot release controller mount: {why}")
            }
            ok => info!(path = %path.display(), ?ok, "released controller mount"),
        }
    }
    if !children_gone {
        warn!(
            children = ?shoal_csi::release::live_children(),
            "juicefs clients still running 10 s after their mounts were released"
        );
    }
}
