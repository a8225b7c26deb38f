//! `lazyblk nodes`: the live nodes of a store's fleet.

use anyhow::Context;
use clap::Args;

use super::output::{aligned, print_json};
use crate::flags::DEFAULT_STORE;
use crate::printable::printable;
use crate::store::client::connect;

#[derive(Args, Debug, Clone)]
pub struct NodesArgs {
    /// URL of the store server.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk nodes`.
pub async fn run(args: NodesArgs) -> anyhow::Result<()> {
    let client = connect(&args.store, None, None)?;
    let nodes = client
        .nodes()
        .await
        .with_context(|| format!("listing the nodes of {}", client.url()))?;
    if args.json {
        return print_json(&nodes);
    }
    if nodes.is_empty() {
        println!("no live nodes (daemons with --advertise register with their store)");
        return Ok(());
    }
    let mut rows = vec![["NODE", "ADDRESS", "VERSION", "LAST SEEN"].map(String::from)];
    // What a node says of itself in its lease: shown without control characters.
    for n in nodes {
        rows.push([
            printable(&n.id).into_owned(),
            printable(&n.url).into_owned(),
            printable(&n.version).into_owned(),
            format!("{:.1}s", n.last_seen_secs),
        ]);
    }
    print!("{}", aligned(&rows));
    Ok(())
}
