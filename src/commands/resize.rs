//! `lazyblk resize ID --size SIZE --template NEWID`: a grown copy of a template.

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::{human_bytes, print_json};
use crate::daemon::api::ResizeBody;
use crate::flags::{label_map, parse_label, parse_size};

#[derive(Args, Debug, Clone)]
pub struct ResizeArgs {
    /// The template to grow.
    pub template: String,
    /// The new size (e.g. 4G); larger than the template's.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Id of the new template.
    #[arg(long = "template")]
    pub new_template: String,
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

/// `lazyblk resize ID --size SIZE --template NEWID`.
pub async fn run(args: ResizeArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node)?;
    let body = ResizeBody {
        size: args.size,
        template: args.new_template.clone(),
        labels: label_map(&args.labels),
    };
    let r = node.resize(&args.template, &body).await?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "resized {} ({}) into {} ({}): {} new chunks, {} shared; durability {}",
        args.template,
        human_bytes(r.old_size),
        args.new_template,
        human_bytes(r.new_size),
        r.commit.new_chunks,
        r.commit.shared_chunks,
        r.commit.durability
    );
    Ok(())
}
