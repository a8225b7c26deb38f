//! `lazyblk daemon`'s arguments (every flag also a `--config` key and a commented line
//! of packaging/daemon.toml).

use std::path::PathBuf;

use clap::Args;

use crate::flags::{parse_size, DEFAULT_STORE};
use crate::http_server::HttpArgs;

/// `--tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    On,
    Require,
}

/// `--ublk-mount-namespace`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UblkMountNamespace {
    /// Move into a private namespace when ublk is offered and the daemon is not in the
    /// host's (a container's, or one made by unshare); with --fuse, refuse ublk there.
    Auto,
    /// Always move into a private namespace at start (not with --fuse: the FUSE mount
    /// would be the daemon's alone).
    Private,
    /// Stay where started: the operator sees to it that no process mounts the
    /// daemon's devices in its namespace.
    Shared,
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
    /// Kernels (a release as `uname -r` prints it, or a series such as 6.6) to offer
    /// `attach --kind ublk` on besides those the project's churn test passed on (6.12):
    /// for operators who have run the guest test on their own kernel. ublk's control
    /// commands wedge on some kernels, so elsewhere `--kind ublk` is refused.
    #[arg(long, value_name = "RELEASE,...", value_delimiter = ',')]
    pub ublk_kernel: Vec<String>,
    /// Seconds each ublk control command (add, start, recovery, stop, delete) may take;
    /// a device whose command misses it is reported and the daemon goes on. Covers
    /// START_USER_RECOVERY, which waits until the kernel has seen the old daemon die.
    #[arg(long, default_value = "45")]
    pub ublk_control_deadline: u64,
    /// Where the daemon's mount namespace stands for ublk. A daemon that is the last
    /// process of a mount namespace in which one of its devices is mounted cannot
    /// finish exiting (the unmount's writes go to the device it no longer serves). In
    /// the host's namespace that cannot happen; elsewhere (a container) auto moves the
    /// daemon into a private namespace at start, which mounts made later do not reach.
    #[arg(long, value_enum, default_value = "auto")]
    pub ublk_mount_namespace: UblkMountNamespace,
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
    /// Do not replay boot traces: a node that opens a template without a READY replica
    /// then fetches only what its reads ask for (and its fill, if warmed).
    #[arg(long)]
    pub no_replay: bool,
    /// Runs of a boot trace fetched at once by its replay (each also takes one of the
    /// node's prefetch slots, never a demand read's). Enough to keep a link with 20-60 ms
    /// per request busy.
    #[arg(long, default_value = "8")]
    pub replay_in_flight: usize,
    /// Bandwidth cap of a boot trace replay in bytes per second (e.g. 100M; 0 = none),
    /// so that a replay on a storage- or network-bound host leaves room for demand reads
    /// and other nodes.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub replay_rate: u64,
    /// Largest run of a boot trace fetched in one request by its replay (e.g. 4M): a cap
    /// so one run does not hold a slot for long; runs never cross a chunk's end.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub replay_max_run: u64,
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
