//! `lazyblk warm ID`: fill a node's replica to READY (`--wait` follows it); with a
//! fleet flag (`--all-nodes`, `--nodes A,B`, `--min-replicas K`, `--failed`) and
//! `--store`, record the fleet's wish instead (DESIGN section 10): nodes pull it at
//! their next heartbeat.

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;
use crate::daemon::state::Phase;
use crate::printable::printable;
use crate::progress::Progress;
use crate::store::center::Placement;
use crate::store::client::StoreClient;

/// How often `warm --wait` polls the daemon.
const WAIT_POLL: Duration = Duration::from_millis(50);

#[derive(Args, Debug, Clone)]
pub struct WarmArgs {
    pub template: String,
    #[command(flatten)]
    pub node: NodeArg,
    /// Wait until the replica is READY (or FAILED), showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Restart a FAILED fill.
    #[arg(long)]
    pub redo: bool,
    /// Fleet: keep the template READY on every live node, and on nodes that join later
    /// (recorded in the store given by --store; nodes pull it at their next heartbeat).
    #[arg(long, requires = "store", conflicts_with_all = ["nodes", "min_replicas", "failed"])]
    pub all_nodes: bool,
    /// Fleet: keep it READY on these nodes (ids or addresses, comma-separated).
    #[arg(long, value_delimiter = ',', requires = "store", conflicts_with_all = ["min_replicas", "failed"])]
    pub nodes: Vec<String>,
    /// Fleet: keep it READY on at least K live nodes.
    #[arg(long, value_name = "K", requires = "store", conflicts_with = "failed")]
    pub min_replicas: Option<usize>,
    /// Fleet: retry the nodes where the template FAILED.
    #[arg(long, requires = "store")]
    pub failed: bool,
    /// The store server holding the fleet's desired state (with the fleet flags).
    #[arg(long)]
    pub store: Option<String>,
    /// Print JSON: the replica's status (at the end with --wait), or the wish recorded.
    #[arg(long)]
    pub json: bool,
}

impl WarmArgs {
    /// Whether this warm is a wish for the fleet rather than one node's fill.
    pub fn is_fleet(&self) -> bool {
        self.all_nodes || !self.nodes.is_empty() || self.min_replicas.is_some() || self.failed
    }
}

/// `lazyblk warm ID [--wait] [--redo]`, or a fleet wish.
pub async fn run(args: WarmArgs) -> anyhow::Result<()> {
    if args.is_fleet() {
        return fleet(args).await;
    }
    let node = NodeClient::new(&args.node)?;
    let id = &args.template;
    let started = node.warm(id, args.redo).await?;
    if !args.wait {
        if args.json {
            return print_json(&started);
        }
        println!("{id}: {}", started.phase);
        return Ok(());
    }
    let progress = Progress::new(&format!("warming {id}"), started.stored_bytes);
    loop {
        let r = node.replica(id).await?;
        progress.set(r.local_bytes);
        match r.phase {
            Phase::Ready => {
                progress.finish(&format!("{id} READY ({} chunks local)", r.local_chunks));
                return if args.json { print_json(&r) } else { Ok(()) };
            }
            Phase::Failed => {
                progress.finish(&format!("{id} FAILED"));
                bail!(
                    "fill of {id} FAILED: {} (reads are still served lazily; retry with `lazyblk warm {id} --redo`)",
                    printable(r.last_error.as_deref().unwrap_or(""))
                );
            }
            stopped @ (Phase::Pending | Phase::Cleaning) => {
                bail!("fill of {id} stopped (phase {stopped})")
            }
            Phase::Distributing => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// `lazyblk warm ID` with a fleet flag: records (or retries) a wish.
async fn fleet(args: WarmArgs) -> anyhow::Result<()> {
    let Some(store) = &args.store else {
        bail!("the fleet flags need --store URL (the store server)");
    };
    let client = StoreClient::new(store, args.node.token.resolve()?, None);
    let id = &args.template;
    if args.failed {
        let wish = client.redo_wish(id).await?;
        if args.json {
            return print_json(&wish);
        }
        println!(
            "{id}: nodes where it FAILED retry it at their next heartbeat (redo {})",
            wish.redo
        );
        return Ok(());
    }
    let placement = if args.all_nodes {
        Placement::AllNodes
    } else if let Some(k) = args.min_replicas {
        Placement::MinReplicas(k)
    } else {
        Placement::Nodes(args.nodes.clone())
    };
    let wish = client.put_wish(id, placement).await?;
    if args.json {
        return print_json(&wish);
    }
    println!(
        "{id}: wish recorded ({}); nodes warm it at their next heartbeat",
        serde_json::to_string(&wish.placement)?
    );
    Ok(())
}
