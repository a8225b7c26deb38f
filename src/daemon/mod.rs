//! The node daemon (stub; being written).
use crate::cli::DaemonArgs;
pub async fn run(_args: DaemonArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
