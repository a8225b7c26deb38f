//! Arguments several client commands share: the daemon they talk to and the token they
//! send. The flag grammar below them (sizes, labels, the token file) is
//! [`crate::flags`], which the servers and pipelines share too.

use clap::Args;

use crate::flags::TokenArg;

/// The daemon's default HTTP address (`--node` of the client commands).
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7071";

/// The daemon a command talks to, and the token it sends.
#[derive(Args, Debug, Clone)]
pub struct NodeArg {
    /// The daemon's HTTP URL.
    #[arg(long, default_value = DEFAULT_NODE)]
    pub node: String,
    #[command(flatten)]
    pub token: TokenArg,
}
