//! Client of the store's HTTP API (stub; being written).
use crate::cli::TemplatesArgs;
pub async fn list_command(_args: TemplatesArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
