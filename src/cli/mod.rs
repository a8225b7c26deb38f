//! The command line: one subcommand per row of DESIGN.md section 7. The client
//! commands' arguments live with their code in [`crate::commands`]; the servers'
//! (`store`, `daemon`) in [`servers`]; the pipelines' (`publish`, `build`) and the
//! local tools' here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod servers;

pub use crate::commands::args::{parse_label, parse_size, DEFAULT_STORE};
pub use crate::commands::attach::AttachArgs;
pub use crate::commands::commit::CommitArgs;
pub use crate::commands::delete::DeleteArgs;
pub use crate::commands::detach::DetachArgs;
pub use crate::commands::evict::EvictArgs;
pub use crate::commands::gc::GcArgs;
pub use crate::commands::nodes::NodesArgs;
pub use crate::commands::overlay::OverlayCommand;
pub use crate::commands::policy::PolicyCommand;
pub use crate::commands::resize::ResizeArgs;
pub use crate::commands::scrub::ScrubArgs;
pub use crate::commands::status::StatusArgs;
pub use crate::commands::templates::TemplatesArgs;
pub use crate::commands::unwarm::UnwarmArgs;
pub use crate::commands::warm::WarmArgs;
pub use servers::{DaemonArgs, StoreArgs};

/// lazyblk: microVM sandbox templates as lazily fetched, content-addressed block devices.
///
/// A template (an ext4 image) is published once to a store as a manifest plus
/// sha256-named chunks. Every node runs `lazyblk daemon`, which serves each template
/// over NBD and as a FUSE file and fetches chunks on demand.
#[derive(Parser, Debug)]
#[command(name = "lazyblk", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (colour only on a terminal) or as one JSON object per line,
    /// for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `--tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    On,
    Require,
}

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the artifact store: manifests, chunks and traces over HTTP.
    Store(StoreArgs),
    /// Run the node daemon: NBD and FUSE exports of every template, fetched lazily.
    Daemon(Box<DaemonArgs>),
    /// Chunk an image, upload the chunks the store lacks, publish its manifest.
    Publish(PublishArgs),
    /// Make an ext4 image from a directory or a container image (OCI layout, docker
    /// save) and publish it.
    Build(BuildArgs),
    /// List the store's templates and their durability.
    Templates(TemplatesArgs),
    /// Show replica phase, progress, bytes by source and exports in use on a node.
    Status(StatusArgs),
    /// Fill a node's replica of a template to READY in the background.
    Warm(WarmArgs),
    /// Drop a node's replica of a template (its local chunks).
    Evict(EvictArgs),
    /// Create or delete a sandbox's copy-on-write overlay.
    #[command(subcommand)]
    Overlay(OverlayCommand),
    /// Commit a sandbox's overlay into a new template.
    Commit(CommitArgs),
    /// Grow a template into a new template (e2fsck and resize2fs on an overlay, then a commit).
    Resize(ResizeArgs),
    /// Attach an export of a node as a kernel block device (/dev/nbdN, or /dev/ublkbN with --kind ublk); prints the device.
    Attach(AttachArgs),
    /// Disconnect a kernel block device (/dev/nbdN or /dev/ublkbN) attached with `lazyblk attach`.
    Detach(DetachArgs),
    /// Remove a template (manifest and trace) from the store; its chunks stay until gc.
    Delete(DeleteArgs),
    /// Delete the store's chunks that no manifest references.
    Gc(GcArgs),
    /// Verify every chunk a node caches (or a store holds) against its sha256; drop the
    /// bad ones (a node fetches them again on demand; a store gets them back from the
    /// next publish or upload of that content).
    Scrub(ScrubArgs),
    /// List the live nodes of a store's fleet (their leases, replicas, cache).
    Nodes(NodesArgs),
    /// Print this node's id and public key (made on first use, kept in the cache
    /// directory as node.key): what a store's --member-keys file lists.
    NodeKey(NodeKeyArgs),
    /// Make an ed25519 key for signing templates (`publish`/`build --signing-key FILE`)
    /// and print its public key, the line a `--trusted-keys` file lists.
    Keygen(KeygenArgs),
    /// Remove a fleet wish recorded by `warm --all-nodes|--nodes|--min-replicas`; the
    /// nodes unpin the template at their next heartbeat.
    Unwarm(UnwarmArgs),
    /// The store's label policy: minimum versions; templates below them are STALE.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `lazyblk completions bash > /etc/bash_completion.d/lazyblk`.
    Completions(CompletionsArgs),
    /// Write man pages for lazyblk and each of its commands into a directory
    /// (lazyblk.1, lazyblk-daemon.1, ...).
    Manpages(ManpagesArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug, Clone)]
pub struct ManpagesArgs {
    /// Where to write the pages (made if missing).
    pub dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Where to write the private key (PKCS#8 PEM, mode 0600); an existing file is
    /// never replaced.
    pub file: PathBuf,
    /// Print {"public_key", "file"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct NodeKeyArgs {
    /// The node's cache directory (the daemon's --cache), where node.key is kept.
    #[arg(long, default_value = "./lazyblk-cache")]
    pub cache: PathBuf,
    /// Print {"node_id", "public_key"} as JSON.
    #[arg(long)]
    pub json: bool,
}

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
    pub token: crate::commands::args::TokenArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

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
    pub token: crate::commands::args::TokenArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument read from the environment hides its value in `--help` (they are
    /// the tokens); tests/cli_hygiene.rs checks the pages themselves.
    #[test]
    fn environment_values_are_hidden() {
        use clap::CommandFactory;
        let mut todo = vec![Cli::command()];
        let mut checked = 0;
        while let Some(mut command) = todo.pop() {
            command.build();
            for arg in command.get_arguments() {
                if arg.get_env().is_some() {
                    assert!(
                        arg.is_hide_env_values_set(),
                        "{} --{}",
                        command.get_name(),
                        arg.get_id()
                    );
                    checked += 1;
                }
            }
            todo.extend(command.get_subcommands().cloned());
        }
        assert!(checked >= 14, "{checked}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
