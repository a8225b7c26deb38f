//! `lazyblk commit SB --template NEWID`: a sandbox's overlay into a new template.

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;
use crate::daemon::api::CommitBody;
use crate::flags::{label_map, parse_label};

#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    pub sandbox: String,
    /// Id of the new template.
    #[arg(long)]
    pub template: String,
    /// A label KEY=VALUE for the new template (repeatable); the parent's labels are
    /// inherited unless overridden.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub node: NodeArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk commit SB --template NEWID`.
pub async fn run(args: CommitArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node)?;
    let body = CommitBody {
        template: args.template.clone(),
        labels: label_map(&args.labels),
    };
    let r = node.commit(&args.sandbox, &body).await?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "committed {} as {}: {} new chunks, {} shared with {}; durability {}",
        args.sandbox, args.template, r.new_chunks, r.shared_chunks, r.parent, r.durability
    );
    Ok(())
}
