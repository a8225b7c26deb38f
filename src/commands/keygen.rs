//! `lazyblk keygen FILE`: a signing key for templates (`publish`/`build --signing-key`).

use std::path::PathBuf;

use clap::Args;

use crate::identity::NodeKey;

#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Where to write the private key (PKCS#8 PEM, mode 0600); an existing file is
    /// never replaced.
    pub file: PathBuf,
    /// Print {"public_key", "file"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk keygen FILE`: makes a signing key for templates (PKCS#8 PEM, mode 0600; the
/// form `openssl genpkey -algorithm ed25519` writes) and prints its public key, the line
/// a `--trusted-keys` file lists.
pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let key = NodeKey::create_new(&args.file)?;
    if args.json {
        let doc = serde_json::json!({ "public_key": key.public_hex(), "file": args.file });
        println!("{doc}");
    } else {
        println!("{}", key.public_hex());
    }
    Ok(())
}
