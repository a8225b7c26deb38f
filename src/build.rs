//! `lazyblk build`: an ext4 image made from a directory with `mkfs.ext4 -d` (4 KiB
//! blocks, so the kernel can mount it from a block device), then published.

use anyhow::{bail, Context};

use crate::cli::{BuildArgs, PublishArgs};
use crate::publish;

/// Chunks uploaded at once, as `publish` does by default.
const UPLOAD_CONCURRENCY: usize = 8;

pub async fn run(args: BuildArgs) -> anyhow::Result<()> {
    lazyblk_cache::validate_id(&args.template)?;
    if !args.from_dir.is_dir() {
        bail!("--from-dir {}: not a directory", args.from_dir.display());
    }
    if args.size == 0 || !args.size.is_multiple_of(4096) {
        bail!(
            "--size {}: the image size must be a non-zero multiple of 4096",
            args.size
        );
    }
    let work = tempfile::Builder::new()
        .prefix("lazyblk-build-")
        .tempdir_in(&args.work_dir)
        .with_context(|| format!("making a work directory in {}", args.work_dir.display()))?;
    let image = work.path().join(format!("{}.img", args.template));
    make_ext4(&args, &image).await?;
    publish::run(PublishArgs {
        image,
        template: args.template,
        store: args.store,
        chunk_size: args.chunk_size,
        parent: None,
        labels: args.labels,
        concurrency: UPLOAD_CONCURRENCY,
        write_token: args.write_token,
        json: args.json,
    })
    .await
}

async fn make_ext4(args: &BuildArgs, image: &std::path::Path) -> anyhow::Result<()> {
    // The volume label is at most 16 bytes.
    let label: String = args.template.chars().take(16).collect();
    let output = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", &label, "-d"])
        .arg(&args.from_dir)
        .arg(image)
        .arg(format!("{}k", args.size / 1024))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("Could not allocate") || stderr.contains("No space") {
            " (the files do not fit: raise --size)"
        } else {
            ""
        };
        bail!(
            "mkfs.ext4 -d {} failed{hint}: {}",
            args.from_dir.display(),
            stderr.trim()
        );
    }
    Ok(())
}
