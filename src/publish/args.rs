//! `lazyblk publish`'s arguments; `lazyblk build` fills the same struct to publish
//! the image it made.

use std::path::PathBuf;

use clap::Args;

use crate::flags::{parse_label, parse_size, TokenArg, DEFAULT_STORE};

#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// The image file (ext4 with 4 KiB blocks; size a multiple of 4096).
    pub image: PathBuf,
    /// Template id: [a-z0-9][a-z0-9._-]{0,127}.
    #[arg(long)]
    pub template: String,
    /// The artifact store: a store server (http://...) or an object store written
    /// directly, s3://, az:// or gs:// as for the daemon (the manifest is created only if
    /// absent).
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Chunk size: a power of two from 64K to 16M.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// The template this one derives from (recorded in the manifest).
    #[arg(long)]
    pub parent: Option<String>,
    /// A label KEY=VALUE for the manifest (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Chunks uploaded at once.
    #[arg(long, default_value = "8")]
    pub concurrency: usize,
    /// Upload chunks raw and write a format-1 manifest without a block index. By
    /// default a chunk is stored as a zstd frame per 8 KiB block when that makes it
    /// smaller, and the block index (the sha256 of every block, so a small read fetches
    /// only its blocks) is uploaded with the chunks (format 3). Chunks the store already
    /// holds are not uploaded again, so builds before compressed chunks can read the
    /// template only from a store whose chunks were all uploaded raw.
    #[arg(long)]
    pub no_compress: bool,
    /// Sign the manifest with this ed25519 key (PKCS#8 PEM: `lazyblk keygen FILE` or
    /// `openssl genpkey -algorithm ed25519 -out FILE`), for daemons and stores with
    /// --trusted-keys.
    #[arg(long, env = "LAZYBLK_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<PathBuf>,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}
