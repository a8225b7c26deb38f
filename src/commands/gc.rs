//! `lazyblk gc`: sweeps the store's chunks that no manifest references.

use anyhow::Context;
use clap::Args;
use indicatif::HumanBytes;

use super::output::print_json;
use crate::flags::{TokenArg, DEFAULT_STORE};
use crate::store::client::StoreClient;

#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// URL of the artifact store.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Keep unreferenced chunks written or confirmed more recently than this (e.g. 10m,
    /// 0s): a publish uploads its chunks before its manifest, and gc must not delete
    /// them in between.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk gc`.
pub async fn run(args: GcArgs) -> anyhow::Result<()> {
    let client = StoreClient::new(&args.store, args.token.resolve()?, None);
    let report = client
        .gc(args.grace)
        .await
        .with_context(|| format!("gc of store {}", client.url()))?;
    if args.json {
        return print_json(&report);
    }
    println!(
        "gc: deleted {} chunks ({}), kept {} referenced and {} recent",
        report.chunks_deleted,
        HumanBytes(report.bytes_freed),
        report.chunks_referenced,
        report.chunks_recent
    );
    Ok(())
}
