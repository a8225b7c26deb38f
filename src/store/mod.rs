//! The artifact store (stub; being written).
pub mod client;
use crate::cli::StoreArgs;
pub async fn run(_args: StoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
