//! `lazyblk scrub [--node URL | --store URL]`: verify every chunk, drop the bad ones
//! (a node refetches them). On a node it follows the scrub with a progress bar.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lazyblk_cache::ScrubReport;

use super::args::{NodeArg, DEFAULT_NODE};
use super::node_client::NodeClient;
use super::output::{human_bytes, print_json};
use crate::flags::TokenArg;
use crate::printable::printable;
use crate::progress::Progress;
use crate::store::client::StoreClient;

/// How often a node's scrub is polled.
const POLL: Duration = Duration::from_millis(50);

#[derive(Args, Debug, Clone)]
pub struct ScrubArgs {
    /// Scrub this store instead of a node (needs the store's write token when set).
    #[arg(long, conflicts_with = "node")]
    pub store: Option<String>,
    /// The daemon's HTTP URL.
    #[arg(long, default_value = DEFAULT_NODE)]
    pub node: String,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk scrub`.
pub async fn run(args: ScrubArgs) -> anyhow::Result<()> {
    let report = match &args.store {
        Some(url) => StoreClient::new(url, args.token.resolve()?, None)
            .scrub()
            .await
            .with_context(|| format!("scrub of store {url}"))?,
        None => on_node(&args).await?,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "scrub: checked {} chunks ({}), dropped {} corrupt, {} unreadable",
        report.checked,
        human_bytes(report.bytes),
        report.dropped.len(),
        report.unreadable.len()
    );
    for d in &report.dropped {
        println!("dropped {}", printable(d));
    }
    for d in &report.unreadable {
        println!("unreadable {}", printable(d));
    }
    Ok(())
}

/// Starts the node's scrub (or joins the one running) and waits for its report.
async fn on_node(args: &ScrubArgs) -> anyhow::Result<ScrubReport> {
    let node = NodeClient::new(&NodeArg {
        node: args.node.clone(),
        token: args.token.clone(),
    })?;
    let started = node.start_scrub().await?;
    let bar = Progress::new("scrub", started.total.max(1));
    loop {
        let p = node.scrub_progress().await?;
        bar.set(p.done);
        if !p.running {
            bar.finish("done");
            return Ok(p.report.unwrap_or_default());
        }
        tokio::time::sleep(POLL).await;
    }
}
