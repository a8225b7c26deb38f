//! Resize: a template grown into a new template that shares every untouched chunk.
//!
//! The grown base is the template's manifest with zero chunks appended (never
//! published). A scratch overlay over it is registered as a sandbox, so it appears in the
//! daemon's FUSE mount; `e2fsck -f` and `resize2fs` run on that file; the overlay is
//! committed as the new template with the old one as parent. Only the chunks resize2fs
//! wrote (superblocks, group descriptors, the new groups' metadata) are new. Growing is
//! supported; shrinking is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lazyblk_cache::manifest::{BLOCK_SIZE, MAX_TEMPLATE_SIZE};
use lazyblk_cache::overlay::Overlay;
use lazyblk_cache::{validate_id, Manifest};
use serde::Serialize;

use crate::daemon::commit::{CommitError, CommitOutcome, Commits};
use crate::daemon::sandboxes::SandboxError;
use crate::daemon::templates::TemplateError;

/// How much of a failing tool's output goes into the error.
const TOOL_OUTPUT_LIMIT: usize = 2000;

/// Why a resize was refused or failed. Nothing is published unless it succeeds.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("invalid template id: {0}")]
    InvalidId(String),
    #[error("template {0:?} already exists; resize into a new id")]
    Exists(String),
    #[error("cannot resize {template:?} to {size} bytes: {reason}")]
    BadSize {
        template: String,
        size: u64,
        reason: String,
    },
    #[error("resize needs the daemon's FUSE mount (start it with --fuse DIR): e2fsck and resize2fs run on the overlay's file")]
    NoFuse,
    #[error("{tool} on the grown {template:?} failed ({status}): {output}")]
    Tool {
        tool: &'static str,
        template: String,
        status: String,
        output: String,
    },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Commit(#[from] Box<CommitError>),
}

/// What a resize did.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ResizeOutcome {
    pub template: String,
    pub parent: String,
    pub old_size: u64,
    pub new_size: u64,
    pub seconds: f64,
    pub commit: CommitOutcome,
}

/// Grows templates into new ones: a service over the templates, the sandboxes and
/// commit.
pub struct Resizes {
    commits: Arc<Commits>,
    /// Scratch overlays of resizes under way; emptied at start (an interrupted resize
    /// publishes nothing and is simply abandoned).
    scratch_dir: PathBuf,
    /// The daemon's FUSE mount, if any: e2fsprogs run on its files.
    fuse_dir: Option<PathBuf>,
}

impl Resizes {
    /// Resizes that keep their scratch overlays in `scratch_dir`, the node state's
    /// (what an earlier run left there is removed).
    pub fn open(
        commits: Arc<Commits>,
        scratch_dir: &Path,
        fuse_dir: Option<PathBuf>,
    ) -> std::io::Result<Resizes> {
        let scratch_dir = scratch_dir.to_path_buf();
        if scratch_dir.exists() {
            std::fs::remove_dir_all(&scratch_dir)?;
        }
        std::fs::create_dir_all(&scratch_dir)?;
        Ok(Resizes {
            commits,
            scratch_dir,
            fuse_dir,
        })
    }

    /// Grows template `id` to `size` bytes as template `new_id`.
    pub async fn resize(
        &self,
        id: &str,
        size: u64,
        new_id: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<ResizeOutcome, ResizeError> {
        let started = Instant::now();
        validate_id(new_id).map_err(|e| ResizeError::InvalidId(e.to_string()))?;
        let templates = &self.commits.templates;
        let sandboxes = &self.commits.sandboxes;
        if sandboxes.get(new_id).is_some() || templates.exists(new_id).await {
            return Err(ResizeError::Exists(new_id.to_string()));
        }
        let fuse = self.fuse_dir.clone().ok_or(ResizeError::NoFuse)?;
        let base = templates.replica(id).await?;
        let grown = grown_manifest(base.manifest(), size)?;
        let scratch_id = format!("resize-{}", &new_id[..new_id.len().min(100)]);
        let replica = templates.new_replica(grown);
        let dir = self.scratch_dir.join(&scratch_id);
        // The id check and the registration are one step, as a sandbox create's are.
        let one_at_a_time = sandboxes.exclusive().await;
        if sandboxes.get(&scratch_id).is_some() {
            return Err(ResizeError::Exists(scratch_id));
        }
        let overlay = Overlay::create(&dir, &scratch_id, replica.image.clone())
            .await
            .map_err(SandboxError::from)?;
        let sandbox = sandboxes.register(&replica, overlay);
        drop(one_at_a_time);
        let result = self.resize_in(&fuse, &scratch_id, id, new_id, labels).await;
        sandboxes.unregister(&scratch_id);
        drop(sandbox);
        if let Err(e) = Overlay::remove_dir(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a resize's scratch overlay");
        }
        let commit = result?;
        tracing::info!(template = new_id, parent = id, size, "resized");
        Ok(ResizeOutcome {
            template: new_id.to_string(),
            parent: id.to_string(),
            old_size: base.manifest().size,
            new_size: size,
            seconds: started.elapsed().as_secs_f64(),
            commit,
        })
    }

    async fn resize_in(
        &self,
        fuse: &Path,
        scratch: &str,
        id: &str,
        new_id: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<CommitOutcome, ResizeError> {
        let file = fuse.join("sandboxes").join(scratch);
        // e2fsck exits 1 when it corrected something: resize2fs wants a checked file
        // system, not necessarily a clean one.
        run_tool("e2fsck", &["-f", "-y"], &file, id, &[0, 1]).await?;
        run_tool("resize2fs", &[], &file, id, &[0]).await?;
        Ok(self
            .commits
            .commit(scratch, new_id, labels)
            .await
            .map_err(Box::new)?)
    }
}

/// The manifest of `base` grown to `size` bytes with zero chunks; still named as
/// `base`, so the commit records it as the parent.
fn grown_manifest(base: &Manifest, size: u64) -> Result<Manifest, ResizeError> {
    let refuse = |reason: &str| ResizeError::BadSize {
        template: base.template.clone(),
        size,
        reason: reason.to_string(),
    };
    if size < base.size {
        return Err(refuse(&format!(
            "shrinking is not supported (the template has {} bytes)",
            base.size
        )));
    }
    if size == base.size {
        return Err(refuse("that is its size already"));
    }
    if !size.is_multiple_of(BLOCK_SIZE) || size > MAX_TEMPLATE_SIZE {
        return Err(refuse("sizes are multiples of 4096 up to 16 TiB"));
    }
    let chunk_size = base.chunk_size as u64;
    if !base.size.is_multiple_of(chunk_size) {
        return Err(refuse("the template's size is not a whole number of chunks (republish it with a size that is)"));
    }
    let mut grown = base.clone();
    grown.size = size;
    let count = size.div_ceil(chunk_size) as usize;
    grown.chunks.resize(count, None);
    grown.blocks = base
        .blocks
        .as_ref()
        .map(|b| b.grown(base.chunks.len(), count));
    Ok(grown)
}

async fn run_tool(
    tool: &'static str,
    args: &[&str],
    file: &Path,
    template: &str,
    ok: &[i32],
) -> Result<(), ResizeError> {
    let output = tokio::process::Command::new(tool)
        .args(args)
        .arg(file)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ResizeError::Tool {
            tool,
            template: template.to_string(),
            status: "not run".into(),
            output: format!("{e} (is e2fsprogs installed?)"),
        })?;
    if output.status.code().is_some_and(|c| ok.contains(&c)) {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    let tail_start = text.len().saturating_sub(TOOL_OUTPUT_LIMIT);
    let tail_start = (tail_start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    Err(ResizeError::Tool {
        tool,
        template: template.to_string(),
        status: output.status.to_string(),
        output: text[tail_start..].trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_zero_chunks_and_refuses_the_rest() {
        let mut base = Manifest::new("t", 4 << 20, 1 << 20);
        base.chunks[1] = Some(lazyblk_cache::Digest::of(b"x"));
        let grown = grown_manifest(&base, 6 << 20).unwrap();
        assert_eq!(grown.chunk_count(), 6);
        assert_eq!(grown.chunks[1], base.chunks[1]);
        assert!(grown.chunks[4..].iter().all(Option::is_none));
        assert_eq!(grown.template, "t");
        for bad in [2 << 20, 4 << 20, (6 << 20) + 1] {
            assert!(grown_manifest(&base, bad).is_err(), "{bad}");
        }
        let odd = Manifest::new("o", (4 << 20) + 4096, 1 << 20);
        let err = grown_manifest(&odd, 8 << 20).unwrap_err().to_string();
        assert!(err.contains("whole number of chunks"), "{err}");
    }
}
