//! The command line: one subcommand per row of DESIGN.md section 7.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::commands::args::{parse_label, DEFAULT_STORE};
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
    /// Connect the kernel's NBD client (/dev/nbdN) to an export of a node; prints the device.
    Attach(AttachArgs),
    /// Disconnect a kernel NBD device attached with `lazyblk attach`.
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
pub struct StoreArgs {
    /// Directory that holds manifests, chunks and traces.
    #[arg(long, default_value = "./lazyblk-store")]
    pub root: PathBuf,
    /// Keep manifests, chunks and traces in object storage instead of --root:
    /// s3://BUCKET/PREFIX?endpoint=URL[&region=REGION] (region defaults to "garage";
    /// credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY),
    /// az://CONTAINER/PREFIX?account=NAME[&emulator=true] (AZURE_STORAGE_* variables) or
    /// gs://BUCKET/PREFIX (GOOGLE_* variables).
    #[arg(long, conflicts_with = "root", value_name = "URL")]
    pub backend: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Bearer token required for writes (PUT, DELETE); also the member and admin token
    /// when those are not set.
    #[arg(long, env = "LAZYBLK_WRITE_TOKEN", hide_env_values = true)]
    pub write_token: Option<String>,
    /// Bearer token required for chunk reads.
    #[arg(long, env = "LAZYBLK_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Bearer token required, besides the node's key, for leases (joining the fleet);
    /// the write token when unset. Give daemons this one instead of the write token.
    #[arg(long, env = "LAZYBLK_MEMBER_TOKEN", hide_env_values = true)]
    pub member_token: Option<String>,
    /// Bearer token required for wishes, policy, deletes, gc and scrub (give it to those
    /// commands in place of the write token); the write token when unset.
    #[arg(long, env = "LAZYBLK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Only nodes whose public key (or id) this file lists may be members: one per
    /// line, as `lazyblk node-key` prints them; `#` starts a comment. Read again when
    /// the file changes.
    #[arg(long, value_name = "FILE")]
    pub member_keys: Option<PathBuf>,
    /// Publish only manifests signed by a key this file lists (hex public keys, one a
    /// line, as `lazyblk keygen` and `lazyblk node-key` print them; `#` comments), so a
    /// write token alone cannot publish. Read again on SIGHUP.
    #[arg(long)]
    pub trusted_keys: Option<PathBuf>,
    /// Networks a member's advertised address must be in (CIDRs, comma-separated); a
    /// host name must resolve into them.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub member_networks: Vec<String>,
    /// The most nodes the store keeps leases for; more are refused (503).
    #[arg(long, default_value_t = crate::store::nodes::DEFAULT_MAX_MEMBERS)]
    pub max_members: usize,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Share the backend with other store servers: any number of `lazyblk store
    /// --shared` over one bucket (or directory) answer alike. Checks at start that the
    /// backend honours conditional writes (refuses to start otherwise), and shares the
    /// node leases through it.
    #[arg(long)]
    pub shared: bool,
    /// This server's name among the --shared servers (its lease view is
    /// center/leases/NAME.json); defaults to HOSTNAME-PORT. Letters, digits, '.', '_', '-'.
    #[arg(long, value_name = "NAME", requires = "shared")]
    pub replica_name: Option<String>,
    /// Read flags from this TOML file first. Each key is a flag's long name
    /// (`cache = "/var/lib/lazyblk/cache"`, `nbd-max-connections = 256`); flags on the
    /// command line and environment variables win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (from the flags, the environment, --config and the
    /// defaults) as a config file, each with its source, and exit. Tokens are not shown.
    #[arg(long)]
    pub print_config: bool,
}

/// The bounds of an HTTP server's clients (the store's and the daemon's).
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// HTTP connections served at once (at most a quarter of the descriptor limit); more wait in
    /// the listen backlog until one ends, so slow clients cannot take every descriptor.
    #[arg(long, default_value = "1024")]
    pub http_max_connections: usize,
    /// Seconds a request body may take to arrive in full; a later one is cut off and
    /// its connection closed.
    #[arg(long, default_value = "60")]
    pub http_body_timeout: f64,
    /// Bytes per second a request body must average after its first 5 seconds (e.g.
    /// 64K); a slower one (a client that sends a byte now and then) is cut off.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub http_min_body_rate: u64,
}

impl HttpArgs {
    /// The limits the HTTP server applies.
    pub fn limits(&self) -> crate::http_server::HttpLimits {
        crate::http_server::HttpLimits {
            max_connections: self.http_max_connections.max(1),
            body_timeout: std::time::Duration::from_secs_f64(self.http_body_timeout.max(0.1)),
            min_body_rate: self.http_min_body_rate.max(1),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Directory of the node's chunk cache, overlays and state database.
    #[arg(long, default_value = "./lazyblk-cache")]
    pub cache: PathBuf,
    /// Bytes the chunk cache may take (e.g. 20G, 512M; 0 = no limit).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub cache_size: u64,
    /// The artifact store: a store server (http://HOST:PORT), or an object store read
    /// directly (no store process needed): s3://BUCKET/PREFIX?endpoint=URL[&region=R]
    /// (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), az://CONTAINER/PREFIX?account=NAME
    /// (AZURE_STORAGE_* variables; &emulator=true for Azurite) or gs://BUCKET/PREFIX.
    /// Several store servers over one bucket (`lazyblk store --shared`):
    /// http://S1:7070,http://S2:7070, tried in turn when one does not answer.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// HTTP address for the daemon's API, /metrics and chunk serving to peers.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub listen: String,
    /// The URL other nodes reach this daemon at (put in manifests as origin);
    /// defaults to http://<--listen>. Given, it makes the daemon a member of its
    /// store's fleet: it renews a lease with the store server and serves and asks
    /// peers by chunk ownership.
    #[arg(long)]
    pub advertise: Option<String>,
    /// The fleet's nodes without a store server's membership: URL,URL,... or
    /// dns:NAME:PORT (re-resolved every few seconds; a headless service, Consul DNS).
    #[arg(long, value_name = "URLS|dns:NAME:PORT")]
    pub peers: Option<String>,
    /// NBD address: unix:PATH (the default is unix:<--cache>/nbd.sock, mode 0660) or
    /// HOST:PORT for TCP. TCP NBD has no access control of its own: beyond loopback,
    /// firewall it.
    #[arg(long)]
    pub nbd: Option<String>,
    /// NBD over TLS: the server's certificate chain (PEM). With --tls-key, TLS is
    /// offered through NBD_OPT_STARTTLS (libnbd's nbds:// URIs).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); others are refused.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// off: no TLS; on: offered (plain clients are served too); require: plain clients
    /// get NBD_REP_ERR_TLS_REQD. Defaults to on when --tls-cert is given.
    #[arg(long, value_enum)]
    pub tls: Option<TlsMode>,
    /// Group that owns the NBD unix socket (name or gid); members may connect.
    #[arg(long, value_name = "GROUP")]
    pub nbd_group: Option<String>,
    /// NBD connections served at once; more are refused (closed at once, logged).
    #[arg(long, default_value = "1024")]
    pub nbd_max_connections: usize,
    /// Seconds a kernel block device (`lazyblk attach`) waits for a new connection once
    /// the daemon is gone: a restarted daemon reconnects it within this time and the
    /// I/O queued meanwhile completes; after it, the device fails its I/O. Long enough
    /// for a restart or a package upgrade.
    #[arg(long, default_value = "120")]
    pub device_dead_timeout: u64,
    /// Attach kernel block devices through the nbd driver's ioctls even where its
    /// netlink interface exists (such devices do not outlive the daemon).
    #[arg(long)]
    pub device_ioctl: bool,
    /// Keep the FUSE mount and the listening sockets (HTTP, NBD) in systemd's file
    /// descriptor store (the unit's FileDescriptorStoreMax=), so that a restarted
    /// daemon (kill -9, `systemctl restart`, an upgrade) serves the same mount and
    /// sockets: open files go on, requests in flight are answered, clients wait in the
    /// sockets' backlogs. On by default when systemd announces a store ($FDSTORE,
    /// systemd 254+); needs $NOTIFY_SOCKET. With it, SIGTERM leaves the mount in place.
    #[arg(
        long,
        env = "LAZYBLK_FD_STORE",
        hide_env_values = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub fd_store: bool,
    /// Seconds a client gets to finish the NBD handshake before it is dropped.
    #[arg(long, default_value = "10")]
    pub nbd_handshake_timeout: f64,
    /// Bytes of read and write payloads in flight over all NBD connections (e.g. 128M);
    /// past it, no more requests are read until replies go out.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub nbd_max_bytes_in_flight: u64,
    /// Mount the FUSE filesystem (templates/<id>, sandboxes/<sb>) here.
    #[arg(long)]
    pub fuse: Option<PathBuf>,
    /// Seconds one source gets to deliver one chunk before the next source is tried.
    #[arg(long, default_value = "8")]
    pub source_deadline: f64,
    /// Seconds a demand read may take over all its attempts (every source, retries)
    /// before it fails with EIO; keep it under the kernel NBD client's 30 s timeout.
    #[arg(long, default_value = "20")]
    pub read_deadline: f64,
    /// Chunks fetched at once by a background fill.
    #[arg(long, default_value = "8")]
    pub fill_concurrency: usize,
    /// Bandwidth cap of background fills in bytes per second of chunk bytes, decoded
    /// (e.g. 200M; 0 = none); compressed chunks cross the network in fewer.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub fill_rate: u64,
    /// Seconds after a template's first read on this node during which first reads are
    /// recorded as its boot trace.
    #[arg(long, default_value = "60")]
    pub trace_window: f64,
    /// Seconds without a new chunk read after which a trace is published early.
    #[arg(long, default_value = "10")]
    pub trace_quiet: f64,
    /// Seconds a commit's upload to the store waits before it starts (the template is
    /// served from this node meanwhile).
    #[arg(long, default_value = "0")]
    pub upload_delay: f64,
    /// Bearer token sent with chunk reads to the store (and only to the store).
    #[arg(long, env = "LAZYBLK_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Bearer token between daemons: sent with chunk reads to origins, and required on
    /// this daemon's own chunk endpoints, when set. A fleet member (--advertise or
    /// --peers) with --read-token refuses to start without one.
    #[arg(long, env = "LAZYBLK_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Bytes of chunk responses to peers in flight at once, over all of them (e.g. 32M):
    /// responses stream from the chunk files, and a piece waits for room; a request that
    /// finds none for a moment gets 503 with Retry-After (the peer then asks the store).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub peer_max_bytes_in_flight: u64,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Bearer token sent with writes to the store (commit uploads, traces), and required
    /// on this daemon's own changing requests (warm, evict, overlays, commit, attach).
    #[arg(long, env = "LAZYBLK_WRITE_TOKEN", hide_env_values = true)]
    pub write_token: Option<String>,
    /// Bearer token sent with this node's leases (the store's --member-token); the
    /// write token when unset. Leases are also signed with the node's key.
    #[arg(long, env = "LAZYBLK_MEMBER_TOKEN", hide_env_values = true)]
    pub member_token: Option<String>,
    /// Serve only templates whose manifest is signed by a key this file lists (hex
    /// public keys, one a line, as `lazyblk keygen` and `lazyblk node-key` print them;
    /// `#` comments); others are refused with an error naming the template and its key.
    /// Read again on SIGHUP (add a key, then remove the old one, to rotate).
    #[arg(long)]
    pub trusted_keys: Option<PathBuf>,
    /// Read flags from this TOML file first. Each key is a flag's long name
    /// (`cache = "/var/lib/lazyblk/cache"`, `nbd-max-connections = 256`); flags on the
    /// command line and environment variables win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (from the flags, the environment, --config and the
    /// defaults) as a config file, each with its source, and exit. Tokens are not shown.
    #[arg(long)]
    pub print_config: bool,
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

/// Parses sizes such as `4096`, `64K`, `1M`, `20G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K, M, G or T")
    })?;
    let shift = match unit
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
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
