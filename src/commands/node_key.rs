//! `lazyblk node-key`: the node's id and public key, what a store's `--member-keys`
//! file lists. The key itself is [`crate::identity::NodeKey`], kept by
//! [`crate::daemon::node_state`].

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct NodeKeyArgs {
    /// The node's cache directory (the daemon's --cache), where node.key is kept.
    #[arg(long, default_value = "./lazyblk-cache")]
    pub cache: PathBuf,
    /// Print {"node_id", "public_key"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk node-key`: prints the node's id and public key, making the key if the cache
/// directory has none yet (so a store's --member-keys can list a node before it starts).
pub fn run(args: NodeKeyArgs) -> anyhow::Result<()> {
    let key = crate::daemon::node_state::load_key(&args.cache)?;
    if args.json {
        let doc = serde_json::json!({ "node_id": key.id(), "public_key": key.public_hex() });
        println!("{doc}");
    } else {
        println!("node id     {}", key.id());
        println!("public key  {}", key.public_hex());
    }
    Ok(())
}
