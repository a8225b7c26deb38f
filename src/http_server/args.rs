//! The flags that bound an HTTP server's clients, shared by `lazyblk store` and
//! `lazyblk daemon`.

use clap::Args;

use crate::flags::parse_size;

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
    pub fn limits(&self) -> super::HttpLimits {
        super::HttpLimits {
            max_connections: self.http_max_connections.max(1),
            body_timeout: std::time::Duration::from_secs_f64(self.http_body_timeout.max(0.1)),
            min_body_rate: self.http_min_body_rate.max(1),
        }
    }
}
