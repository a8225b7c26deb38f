//! Issue 11: a fleet. Daemons with `--advertise` renew leases with the store server and
//! serve each other by chunk ownership, so a launch wave of nodes reading one new
//! template costs the store about one copy of it, even with a node killed mid-wave.
//! Peers that lie or are not lazyblk are passed over, and every byte is verified.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

fn live_nodes(store: &StoreProc) -> Vec<Value> {
    let (ok, out, err) = run(&["nodes", "--store", &store.url(), "--json"]);
    assert!(ok, "lazyblk nodes: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// How many peers a daemon sees (`GET /v1/node`).
fn peers_seen(url: &str) -> usize {
    let Ok((200, body)) = http_get(&format!("{url}/v1/node")) else {
        return 0;
    };
    let info: Value = serde_json::from_str(&body).unwrap_or_default();
    info["peers"].as_array().map_or(0, Vec::len)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_wave_of_six_nodes_costs_the_store_about_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 64, &[("f", pattern(48 << 20, 31))]);
    let expected = std::fs::read(&image).unwrap();
    publish(&store.url(), &image, "wave");
    let stored_bytes = {
        let (_, body) = http_get(&format!("{}/v1/templates/wave", store.url())).unwrap();
        let summary: Value = serde_json::from_str(&body).unwrap();
        summary["stored_bytes"].as_u64().unwrap()
    };
    let mut nodes: Vec<DaemonProc> = (0..6)
        .map(|i| DaemonProc::start_member(&store.url(), &dir.path().join(format!("n{i}")), &[]))
        .collect();
    wait_for("six live nodes", Duration::from_secs(20), || {
        live_nodes(&store).len() == 6
    });
    // Every node sees the five others (its next heartbeat's answer; later when loaded).
    wait_for(
        "every node to see the five others",
        Duration::from_secs(60),
        || nodes.iter().all(|n| peers_seen(&n.url()) == 5),
    );
    let served_before = store.metric("lazyblk_store_bytes_served_total");
    let copies: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let uri = n.nbd_uri("wave");
            let out = dir.path().join(format!("copy{i}"));
            std::thread::spawn(move || {
                let (ok, _, err) = sh("nbdcopy", &[&uri, out.to_str().unwrap()]);
                (ok, err, out)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    if std::env::var_os("FLEET_NO_KILL").is_none() {
        nodes[5].kill9();
    }
    let mut good = 0;
    for (i, c) in copies.into_iter().enumerate() {
        let (ok, err, out) = c.join().unwrap();
        if i == 5 {
            continue;
        }
        assert!(ok, "node {i}: nbdcopy: {err}");
        assert!(
            std::fs::read(out).unwrap() == expected,
            "node {i} read wrong bytes"
        );
        good += 1;
    }
    assert_eq!(good, 5);
    let served = store.metric("lazyblk_store_bytes_served_total") - served_before;
    let ratio = served / stored_bytes as f64;
    let from_peers: f64 = nodes[..5]
        .iter()
        .map(|n| n.metric("lazyblk_peer_bytes_served_total"))
        .sum();
    eprintln!(
        "wave of 6 (one killed): the store sent {:.1} MiB for {:.1} MiB stored ({ratio:.2}x); peers served {:.1} MiB",
        served / 1048576.0,
        stored_bytes as f64 / 1048576.0,
        from_peers / 1048576.0
    );
    assert!(
        ratio <= 1.2,
        "the store sent {ratio:.2}x the template's stored bytes"
    );
    // The killed node drops out after its lease.
    wait_for("the killed node to leave", Duration::from_secs(20), || {
        live_nodes(&store).len() == 5
    });
}

/// A fake peer: answers `/v1/node` with an id, and every chunk with wrong bytes.
fn lying_peer() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(500) {
            let Ok(mut s) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let answer: Vec<u8> = if head.starts_with("GET /v1/node ") {
                let body = br#"{"node_id":"ffffffffffffffff"}"#;
                let mut a = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
                a.extend_from_slice(body);
                a
            } else if let Some(len) = head
                .split("len=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                let mut a = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                )
                .into_bytes();
                a.extend(std::iter::repeat_n(0x5au8, len));
                a
            } else {
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
            };
            let _ = s.write_all(&answer);
        }
    });
    url
}

#[test]
fn peers_that_lie_or_are_not_lazyblk_are_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(8 << 20, 32))]);
    publish(&store.url(), &image, "t");
    let liar = lying_peer();
    // Not lazyblk at all: answers nothing useful.
    let stranger = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming().take(200) {
                let _ = s.map(|mut s| {
                    s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                });
            }
        });
        url
    };
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let peers = format!("{liar},{stranger},{dead}");
    let node = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache"),
        &["--peers", &peers],
    );
    std::thread::sleep(Duration::from_secs(1));
    let out = dir.path().join("out");
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap(),
        "a peer's bad bytes were served"
    );
    assert!(
        node.metric("lazyblk_verify_failures_total{source=\"peers\",class=\"peer\"}") >= 1.0,
        "the liar was asked and caught"
    );
}
