//! The deadlines of the store's and the daemon's HTTP servers answer or close cleanly,
//! never with a reset: a keep-alive connection may wait between requests longer than a
//! client has to send a request's headers; a request that waited in the socket while
//! the server itself was held up (stopped, starved) is answered when it runs again (it
//! was reset, "connection reset by peer", which once failed
//! commit_slow_store::sandbox_creates_are_not_delayed_by_a_commit_on_a_slow_store);
//! a request whose headers never finish is answered 408.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::node::DaemonProc;
use support::StoreProc;

/// Past the servers' header timeout (10 s) and well short of their idle timeout (60 s).
const PAST_HEADER_TIMEOUT: Duration = Duration::from_secs(13);
/// A generous bound for an answer from a server that is running.
const ANSWER_BOUND: Duration = Duration::from_secs(45);

/// Sends `GET path` on `s` (keep-alive) and reads one answer: its status line, or the
/// error (a reset, a close) the client got instead.
fn get(s: &mut TcpStream, path: &str) -> Result<String, String> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: lazyblk\r\n\r\n").map_err(|e| e.to_string())?;
    read_answer(s)
}

/// Reads one answer with a `content-length` off `s`: its status line, or what went wrong.
fn read_answer(s: &mut TcpStream) -> Result<String, String> {
    s.set_read_timeout(Some(ANSWER_BOUND)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(head.lines().next().unwrap_or_default().to_string());
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed without an answer after {got:?}")),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {got:?}")),
        }
    }
}

/// A process stopped (SIGSTOP) until dropped (SIGCONT), even when the test fails.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {which} {pid}");
}

#[test]
fn a_keep_alive_connection_may_wait_past_the_header_timeout() {
    let store = StoreProc::start();
    let mut s = TcpStream::connect(store.url().trim_start_matches("http://")).unwrap();
    assert_eq!(get(&mut s, "/healthz").as_deref(), Ok("HTTP/1.1 200 OK"));
    std::thread::sleep(PAST_HEADER_TIMEOUT);
    assert_eq!(
        get(&mut s, "/healthz").as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "the second request on a connection idle for {PAST_HEADER_TIMEOUT:?}"
    );
}

#[test]
fn a_request_that_waited_while_the_daemon_was_stopped_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let node = DaemonProc::start(&store.url(), &dir.path().join("n"), &[]);
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", node.http_port)).unwrap();
    // Served once: the daemon has accepted the connection and waits for the next request.
    assert_eq!(get(&mut s, "/healthz").as_deref(), Ok("HTTP/1.1 200 OK"));
    {
        let _stopped = Stopped::new(node.pid());
        write!(s, "GET /v1/overlays HTTP/1.1\r\nHost: lazyblk\r\n\r\n").unwrap();
        std::thread::sleep(PAST_HEADER_TIMEOUT);
        // The daemon runs again here; the request has been in its socket all along.
    }
    assert_eq!(
        read_answer(&mut s).as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "the request sent while the daemon was stopped"
    );
    // And a client that connects afresh is served as ever.
    let mut fresh = TcpStream::connect(format!("127.0.0.1:{}", node.http_port)).unwrap();
    assert_eq!(
        get(&mut fresh, "/healthz").as_deref(),
        Ok("HTTP/1.1 200 OK")
    );
}

#[test]
fn a_request_whose_headers_never_finish_is_answered_408() {
    let store = StoreProc::start();
    let mut s = TcpStream::connect(store.url().trim_start_matches("http://")).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: lazy").unwrap();
    assert_eq!(
        read_answer(&mut s).as_deref(),
        Ok("HTTP/1.1 408 Request Timeout"),
        "a request head left unfinished"
    );
    // The store answers other clients meanwhile and after.
    let mut other = TcpStream::connect(store.url().trim_start_matches("http://")).unwrap();
    assert_eq!(
        get(&mut other, "/healthz").as_deref(),
        Ok("HTTP/1.1 200 OK")
    );
}
