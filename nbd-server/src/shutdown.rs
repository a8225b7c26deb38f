//! The signal that tells a connection the server is shutting down: it stops reading
//! new requests, answers the ones in flight, and closes.

use std::future::pending;

use tokio::sync::watch;

/// A connection's view of the server's shutdown; cloned into every connection.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// `None` for a connection served on its own ([`crate::serve_connection`]), which
    /// is never told to shut down.
    signal: Option<watch::Receiver<bool>>,
}

impl Shutdown {
    /// A signal that never fires.
    pub fn never() -> Self {
        Self { signal: None }
    }

    /// Fires once `true` is sent on the channel's sender.
    pub fn new(signal: watch::Receiver<bool>) -> Self {
        Self {
            signal: Some(signal),
        }
    }

    /// Resolves once shutdown has begun; never, if the sender is dropped without
    /// sending. Cancel-safe.
    pub async fn wait(&mut self) {
        if let Some(signal) = &mut self.signal {
            if signal.wait_for(|&down| down).await.is_ok() {
                return;
            }
        }
        pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_once_sent() {
        let (tx, rx) = watch::channel(false);
        let mut shutdown = Shutdown::new(rx);
        tx.send(true).expect("receiver alive");
        tokio::time::timeout(Duration::from_secs(1), shutdown.wait())
            .await
            .expect("fired");
    }

    #[tokio::test]
    async fn a_dropped_sender_is_not_a_shutdown() {
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let mut shutdown = Shutdown::new(rx);
        let waited = tokio::time::timeout(Duration::from_millis(50), shutdown.wait()).await;
        assert!(waited.is_err());
    }
}
