//! Commands that talk to a daemon (stub; being written).
use crate::cli::*;
pub async fn status(_a: StatusArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn warm(_a: WarmArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn evict(_a: EvictArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn overlay(_a: OverlayCommand) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn commit(_a: CommitArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
