//! `shoal-operator`: `run` reconciles VectorClusters (in-cluster config or `KUBECONFIG`);
//! `crd` prints the CustomResourceDefinition YAML that `crds/` holds; `crd-docs` prints (or
//! updates the README's copy of) the configuration reference generated from it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_operator::{controller, crd, crd_docs, leader::LeaderElector, metrics};

#[derive(Parser)]
#[command(
    name = "shoal-operator",
    version,
    about = "Kubernetes operator for Shoal VectorClusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the VectorCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print the VectorCluster configuration reference (Markdown), generated from the CRD schema.
    CrdDocs {
        /// Rewrite the generated section of this Markdown file (between the crd-reference markers)
        /// instead of printing.
        #[arg(long, value_name = "FILE")]
        update: Option<std::path::PathBuf>,
    },
    /// Reconcile VectorClusters in every namespace (in-cluster config, or KUBECONFIG).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics and /healthz server.
    #[arg(long, env = "SHOAL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "SHOAL_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "shoal-operator")]
    lease_name: String,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds; renewed every third of it.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Run without leader election (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml().context("serialising the CRD")?);
            Ok(())
        }
        Command::CrdDocs { update } => {
            let md = crd_docs::markdown().context("generating the CRD reference")?;
            match update {
                None => print!("{md}"),
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let new = crd_docs::splice(&text, &md, &path.display().to_string())?;
                    std::fs::write(&path, new)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster service account or KUBECONFIG)")?;
    let metrics = Arc::new(metrics::Metrics::default());
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    tracing::info!(addr = %args.metrics_addr, "serving /metrics and /healthz");

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("shoal-operator-{}", std::process::id()));
    if args.no_leader_election {
        metrics.leader.store(true, Ordering::Relaxed);
        tokio::select! {
            () = controller::run(client, metrics, Some(identity)) => Ok(()),
            r = server => Err(anyhow::anyhow!("metrics server stopped: {r:?}")),
        }
    } else {
        let elector = LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_duration.max(3)),
        );
        tracing::info!(lease = %args.lease_name, %identity, "waiting for leadership");
        elector.acquire().await?;
        metrics.leader.store(true, Ordering::Relaxed);
        tracing::info!(%identity, "became leader");
        tokio::select! {
            () = controller::run(client, metrics, Some(identity)) => Ok(()),
            lost = elector.hold() => Err(anyhow::Error::new(lost).context("stepping down")),
            r = server => Err(anyhow::anyhow!("metrics server stopped: {r:?}")),
        }
    }
}
