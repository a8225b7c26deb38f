//! `lazyblk evict ID [--force]`: drops a node's local replica of a template.

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;

#[derive(Args, Debug, Clone)]
pub struct EvictArgs {
    pub template: String,
    #[command(flatten)]
    pub node: NodeArg,
    /// Evict even if exports are using the template.
    #[arg(long)]
    pub force: bool,
    /// Print JSON ({"template", "removed_chunks", "phase"}).
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk evict ID`.
pub async fn run(args: EvictArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node)?;
    let r = node.evict(&args.template, args.force).await?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "evicted {}: {} chunks removed",
        args.template, r.removed_chunks
    );
    Ok(())
}
