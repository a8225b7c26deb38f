//! `lazyblk store`'s arguments (every flag also a `--config` key and a commented line
//! of packaging/store.toml).

use std::path::PathBuf;

use clap::Args;

use crate::http_server::HttpArgs;

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
    #[arg(long, default_value_t = super::nodes::DEFAULT_MAX_MEMBERS)]
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
