//! `lazyblk node-key`: the node's id and public key, what a store's `--member-keys`
//! file lists. The key itself is [`crate::identity::NodeKey`].

use std::path::PathBuf;

use clap::Args;

use crate::identity::NodeKey;

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
    std::fs::create_dir_all(&args.cache)?;
    let key = NodeKey::load_or_create(&args.cache)?;
    if args.json {
        let doc = serde_json::json!({ "node_id": key.id(), "public_key": key.public_hex() });
        println!("{doc}");
    } else {
        println!("node id     {}", key.id());
        println!("public key  {}", key.public_hex());
    }
    Ok(())
}
