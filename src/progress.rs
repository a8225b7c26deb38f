//! Progress of long work in bytes: a bar on a terminal, a few plain lines otherwise
//! (DESIGN.md section 7), so logs of scripted runs stay short.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// Plain mode prints a line each time progress crosses another quarter ...
const PLAIN_STEPS: u64 = 4;
/// ... or when this long has passed since the last line, so a slow run still shows life.
const PLAIN_INTERVAL: Duration = Duration::from_secs(30);
/// How the bar looks: label, bar, bytes done of total, rate, time left.
const BAR_TEMPLATE: &str =
    "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}";

/// Progress of one piece of work measured in bytes. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

enum Inner {
    /// stderr is a terminal: indicatif draws and rate-limits the bar itself.
    Bar(ProgressBar),
    /// stderr is a file or pipe.
    Plain(Plain),
}

struct Plain {
    label: String,
    total: u64,
    pos: AtomicU64,
    /// The quarter last reported and when; guarded together so lines are not doubled.
    last: Mutex<(u64, Instant)>,
}

impl Progress {
    /// Progress of `label` over `total_bytes`.
    pub fn new(label: &str, total_bytes: u64) -> Progress {
        let inner = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_bytes).with_prefix(label.to_string());
            if let Ok(style) = ProgressStyle::with_template(BAR_TEMPLATE) {
                bar.set_style(style.progress_chars("=> "));
            }
            Inner::Bar(bar)
        } else {
            Inner::Plain(Plain {
                label: label.to_string(),
                total: total_bytes,
                pos: AtomicU64::new(0),
                last: Mutex::new((0, Instant::now())),
            })
        };
        Progress {
            inner: Arc::new(inner),
        }
    }

    /// Sets the bytes done.
    #[allow(dead_code, reason = "for commands that poll a total (warm --wait)")]
    pub fn set(&self, pos: u64) {
        match &*self.inner {
            Inner::Bar(bar) => bar.set_position(pos),
            Inner::Plain(plain) => {
                plain.pos.store(pos, Ordering::Relaxed);
                plain.report(pos);
            }
        }
    }

    /// Adds `n` bytes done.
    pub fn inc(&self, n: u64) {
        match &*self.inner {
            Inner::Bar(bar) => bar.inc(n),
            Inner::Plain(plain) => {
                let pos = plain.pos.fetch_add(n, Ordering::Relaxed) + n;
                plain.report(pos);
            }
        }
    }

    /// A short note shown beside the bar (plain mode shows none).
    #[allow(dead_code, reason = "for commands that poll a phase (warm --wait)")]
    pub fn set_message(&self, msg: &str) {
        if let Inner::Bar(bar) = &*self.inner {
            bar.set_message(msg.to_string());
        }
    }

    /// Ends the work: removes the bar and prints `msg` on stderr.
    pub fn finish(&self, msg: &str) {
        match &*self.inner {
            Inner::Bar(bar) => {
                bar.finish_and_clear();
                eprintln!("{}: {msg}", bar.prefix());
            }
            Inner::Plain(plain) => eprintln!("{}: {msg}", plain.label),
        }
    }
}

impl Plain {
    fn report(&self, pos: u64) {
        let step = match self.total {
            0 => PLAIN_STEPS,
            total => (pos.min(total) as u128 * PLAIN_STEPS as u128 / total as u128) as u64,
        };
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let (last_step, last_at) = *last;
        if step > last_step || (step < PLAIN_STEPS && last_at.elapsed() >= PLAIN_INTERVAL) {
            *last = (step.max(last_step), Instant::now());
            let percent = match self.total {
                0 => 100,
                total => pos.min(total) as u128 * 100 / total as u128,
            };
            eprintln!(
                "{}: {} of {} ({percent}%)",
                self.label,
                HumanBytes(pos),
                HumanBytes(self.total)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_reports_quarters_once() {
        let plain = Plain {
            label: "t".into(),
            total: 100,
            pos: AtomicU64::new(0),
            last: Mutex::new((0, Instant::now())),
        };
        plain.report(30);
        assert_eq!(plain.last.lock().unwrap().0, 1);
        plain.report(40);
        assert_eq!(plain.last.lock().unwrap().0, 1);
        plain.report(100);
        assert_eq!(plain.last.lock().unwrap().0, 4);
    }
}
