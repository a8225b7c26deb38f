//! `lazyblk build`'s arguments.

use std::path::PathBuf;

use clap::Args;

use crate::flags::{parse_label, parse_size, TokenArg, DEFAULT_STORE};

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_dir", "from_oci"])))]
pub struct BuildArgs {
    /// The directory that becomes the file system's root.
    #[arg(long)]
    pub from_dir: Option<PathBuf>,
    /// A container image: an OCI image layout (a directory with index.json, or a tar of
    /// one), a `docker save` archive, or an image in a registry,
    /// docker://HOST[:PORT]/REPO:TAG (or @sha256:DIGEST). Its layers are applied in order
    /// (whiteouts, opaque directories) with their owners, modes, links, device nodes and
    /// extended attributes, without root; the image's digest, reference and config
    /// labels become labels.
    #[arg(long)]
    pub from_oci: Option<PathBuf>,
    /// --from-oci docker://: the registry's credentials, USER:PASS or @FILE (a file
    /// holding USER:PASS). Default: the registry's entry in $REGISTRY_AUTH_FILE,
    /// $XDG_RUNTIME_DIR/containers/auth.json or ~/.docker/config.json, else anonymous.
    #[arg(long, env = "LAZYBLK_REGISTRY_AUTH", hide_env_values = true)]
    pub registry_auth: Option<String>,
    /// --from-oci docker://: a PEM file of CA certificates the registry's TLS certificate
    /// may chain to, besides the system's.
    #[arg(long)]
    pub registry_ca: Option<PathBuf>,
    /// --from-oci docker://: talk plain HTTP to the registry (credentials and images
    /// travel unencrypted; for a registry on a trusted network only).
    #[arg(long)]
    pub registry_insecure_http: bool,
    /// --from-oci docker://: give up when the registry sends nothing for this long (a
    /// stalled download fails instead of hanging the build).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub registry_timeout: std::time::Duration,
    /// --from-oci docker://: where pulled layers are kept by digest, so a rebuild from a
    /// new tag downloads only new layers. Default: $XDG_CACHE_HOME/lazyblk/layers, else
    /// ~/.cache/lazyblk/layers. Nothing removes old layers: delete files to reclaim space.
    #[arg(long)]
    pub layer_cache: Option<PathBuf>,
    /// The image's size (e.g. 2G). Default: the content plus a quarter, plus room for
    /// ext4's metadata, journal and reserved blocks, rounded up to 64 MiB.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
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
    /// A label KEY=VALUE for the manifest (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where the image is made before it is published (removed after, whether the build
    /// succeeds or fails).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
    /// --from-oci: refuse an archive entry whose GNU long name, long link or PAX records
    /// pass this size (they are read into memory whole; real ones are a few KiB).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub max_header: u64,
    /// --from-oci: refuse an image whose merged tree has more entries than this (each is
    /// held in memory until the image is made; distributions have a few hundred
    /// thousand).
    #[arg(long, default_value_t = 2_000_000)]
    pub max_entries: u64,
    /// --from-oci: refuse an image with more entries than this in one directory
    /// (mkfs.ext4 -d scans a directory to add each name to it: 20,000 names in one
    /// directory take it 18 s here, 100,000 eight minutes).
    #[arg(long, default_value_t = 50_000)]
    pub max_dir_entries: u64,
    /// --from-oci: refuse a path more directories deep than this; at most 1000
    /// (mkfs.ext4 1.47.0 aborts with heap corruption on a tree 1,024 deep, and builds one
    /// 1,000 deep).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_depth: u16,
    /// --from-oci: refuse an image whose files hold more than this (e.g. 50G: the
    /// largest template lazyblk is made for), and never more than --size; a small
    /// compressed layer can unpack to any size.
    #[arg(long, default_value = "50G", value_parser = parse_size)]
    pub max_content: u64,
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
