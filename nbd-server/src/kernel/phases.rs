//! The phases of an attach or a reconnect, timed and logged.

use std::time::{Duration, Instant};

use super::Device;

/// A phase of an attach or a reconnect, as logged and measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The client handshake on the device's sockets.
    Handshake,
    /// `NBD_CMD_CONNECT` (or the ioctls and `NBD_DO_IT` up to the device's pid).
    Connect,
    /// From the connect until the device shows its size.
    SizeVisible,
    /// `NBD_CMD_RECONFIGURE` of a device a restarted daemon takes back.
    Reconfigure,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Connect => "connect",
            Phase::SizeVisible => "size_visible",
            Phase::Reconfigure => "reconfigure",
        }
    }
}

/// Times the phases of one attach and logs each at debug level.
pub(super) struct PhaseClock {
    device: Device,
    started: Instant,
    pub(super) phases: Vec<(Phase, Duration)>,
}

impl PhaseClock {
    pub(super) fn new(device: Device) -> PhaseClock {
        PhaseClock {
            device,
            started: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends `phase` now.
    pub(super) fn done(&mut self, phase: Phase) {
        let now = Instant::now();
        let took = now - self.started;
        self.started = now;
        tracing::debug!(device = %self.device, phase = phase.name(), ms = took.as_secs_f64() * 1000.0, "kernel device phase done");
        self.phases.push((phase, took));
    }
}
