//! Transmission over a real socket, in raw bytes: every command, the errors the
//! protocol asks for, pipelining, and clients that break off mid-request.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_image::Op;
use lazyblk_nbd::{proto, ServerConfig};
use support::{
    chunk_error, fixture_bytes, Fault, MemoryExport, MemoryExports, RawClient, TestServer, HOLE,
    SIZE,
};

/// Opens `name` with simple replies.
async fn open(server: &TestServer, name: &str) -> RawClient {
    let mut client = RawClient::connect(server.addr).await;
    client.go(name).await;
    client
}

/// Opens `name` with structured replies and base:allocation; returns the context id.
async fn open_structured(server: &TestServer, name: &str) -> (RawClient, u32) {
    let mut client = RawClient::connect(server.addr).await;
    let context = client.structured_with_block_status(name).await;
    client.go(name).await;
    (client, context)
}

#[tokio::test(flavor = "multi_thread")]
async fn simple_read_returns_the_bytes() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client.request(0, proto::CMD_READ, 5, 8192, 65536).await;
    assert_eq!(client.simple_reply().await, (0, 5));
    assert_eq!(
        client.read_exact(65536).await,
        fixture_bytes()[8192..8192 + 65536]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_command_is_einval_and_the_connection_continues() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client.request(0, 42, 1, 0, 0).await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 1));
    client.request(0, proto::CMD_READ, 2, 0, 4).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    assert_eq!(client.read_exact(4).await, fixture_bytes()[..4]);
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_past_the_end_is_einval() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client
        .request(0, proto::CMD_READ, 1, SIZE - 512, 1024)
        .await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 1));
    client
        .request(0, proto::CMD_READ, 2, u64::MAX - 10, 512)
        .await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 2));
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_larger_than_the_maximum_is_einval() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client
        .request(0, proto::CMD_READ, 1, 0, (32 << 20) + 1)
        .await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 1));
    client.request(0, proto::CMD_READ, 2, 0, 512).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_to_read_only_is_eperm_and_its_payload_is_skipped() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client.request(0, proto::CMD_WRITE, 1, 0, 4096).await;
    client.send(&[0xee; 4096]).await;
    assert_eq!(client.simple_reply().await, (proto::EPERM, 1));
    client.request(0, proto::CMD_TRIM, 2, 0, 4096).await;
    assert_eq!(client.simple_reply().await, (proto::EPERM, 2));
    client.request(0, proto::CMD_READ, 3, 0, 4096).await;
    assert_eq!(client.simple_reply().await, (0, 3));
    assert_eq!(client.read_exact(4096).await, fixture_bytes()[..4096]);
    assert_eq!(server.exports.get("ro").bytes(), fixture_bytes());
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_past_the_end_is_enospc() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "rw").await;
    client.request(0, proto::CMD_WRITE, 1, SIZE - 10, 20).await;
    client.send(&[1; 20]).await;
    assert_eq!(client.simple_reply().await, (proto::ENOSPC, 1));
    client.request(0, proto::CMD_WRITE_ZEROES, 2, SIZE, 1).await;
    assert_eq!(client.simple_reply().await, (proto::ENOSPC, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_write_within_the_skip_limit_is_einval() {
    let config = ServerConfig {
        max_request: 64 << 10,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(MemoryExports::fixture(), config).await;
    let mut client = open(&server, "rw").await;
    client.request(0, proto::CMD_WRITE, 1, 0, 128 << 10).await;
    client.send(&vec![0xcd; 128 << 10]).await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 1));
    client.request(0, proto::CMD_READ, 2, 0, 16).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    assert_eq!(client.read_exact(16).await, fixture_bytes()[..16]);
}

#[tokio::test(flavor = "multi_thread")]
async fn write_beyond_any_limit_closes_the_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "rw").await;
    client.request(0, proto::CMD_WRITE, 1, 0, u32::MAX).await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_flush_and_zeroes_reach_the_export() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "rw").await;
    client
        .request(proto::CMD_FLAG_FUA, proto::CMD_WRITE, 1, 4096, 8192)
        .await;
    client.send(&[0xab; 8192]).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    client.request(0, proto::CMD_FLUSH, 2, 0, 0).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    client
        .request(0, proto::CMD_WRITE_ZEROES, 3, 8192, 4096)
        .await;
    assert_eq!(client.simple_reply().await, (0, 3));
    client
        .request(proto::CMD_FLAG_NO_HOLE, proto::CMD_WRITE_ZEROES, 4, 0, 100)
        .await;
    assert_eq!(client.simple_reply().await, (0, 4));
    client.request(0, proto::CMD_TRIM, 5, 65536, 4096).await;
    assert_eq!(client.simple_reply().await, (0, 5));
    client.request(0, proto::CMD_CACHE, 6, 0, 65536).await;
    assert_eq!(client.simple_reply().await, (0, 6));

    let mut expected = fixture_bytes();
    expected[4096..12288].fill(0xab);
    expected[8192..12288].fill(0);
    expected[..100].fill(0);
    expected[65536..69632].fill(0);
    let export = server.exports.get("rw");
    assert_eq!(export.bytes(), expected);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_read_is_one_offset_data_chunk() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let (mut client, _) = open_structured(&server, "ro").await;
    client
        .request(proto::CMD_FLAG_DF, proto::CMD_READ, 9, 1000, 3000)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 9)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 1000);
    assert_eq!(payload[8..], fixture_bytes()[1000..4000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_errors_carry_a_message() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let (mut client, _) = open_structured(&server, "ro").await;
    client.request(0, proto::CMD_READ, 3, SIZE, 1).await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(chunk_error(&payload), proto::EINVAL);
    let len = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
    assert_eq!(payload.len(), 6 + len);
    assert!(std::str::from_utf8(&payload[6..])
        .unwrap()
        .contains("past the end"));
}

#[tokio::test(flavor = "multi_thread")]
async fn block_status_reports_holes_and_honours_req_one() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let (mut client, context) = open_structured(&server, "ro").await;
    client
        .request(0, proto::CMD_BLOCK_STATUS, 1, 0, SIZE as u32)
        .await;
    let (flags, kind, _, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS)
    );
    assert_eq!(
        u32::from_be_bytes(payload[0..4].try_into().unwrap()),
        context
    );
    let extents: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let hole = proto::STATE_HOLE | proto::STATE_ZERO;
    let hole_len = (HOLE.end - HOLE.start) as u32;
    assert_eq!(
        extents,
        vec![
            (HOLE.start as u32, 0),
            (hole_len, hole),
            (SIZE as u32 - HOLE.end as u32 - (64 << 10), 0),
            (64 << 10, hole),
        ]
    );

    client
        .request(
            proto::CMD_FLAG_REQ_ONE,
            proto::CMD_BLOCK_STATUS,
            2,
            HOLE.start - 4096,
            1 << 19,
        )
        .await;
    let (_, _, _, payload) = client.chunk().await;
    assert_eq!(payload.len(), 12, "exactly one extent");
    assert_eq!(u32::from_be_bytes(payload[4..8].try_into().unwrap()), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn block_status_without_a_context_is_einval() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    client.request(0, proto::CMD_BLOCK_STATUS, 1, 0, 4096).await;
    assert_eq!(client.simple_reply().await, (proto::EINVAL, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_leave_in_completion_order() {
    let slow = MemoryExport::new(fixture_bytes(), true)
        .with_slow_range(0..4096, Duration::from_millis(300));
    let server = TestServer::start(MemoryExports::new().with("slow", "", slow)).await;
    let mut client = open(&server, "slow").await;
    // Both requests go out before any reply comes back.
    let mut both = lazyblk_nbd::proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode()
    .to_vec();
    let fast = lazyblk_nbd::proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 2,
        offset: 8192,
        length: 512,
    };
    both.extend_from_slice(&fast.encode());
    client.send(&both).await;
    assert_eq!(
        client.simple_reply().await,
        (0, 2),
        "the fast read answers first"
    );
    assert_eq!(client.read_exact(512).await, fixture_bytes()[8192..8704]);
    assert_eq!(client.simple_reply().await, (0, 1));
    assert_eq!(client.read_exact(512).await, fixture_bytes()[..512]);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_pipelined_requests_are_all_answered() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "rw").await;
    let count = 500u64;
    let mut burst = Vec::new();
    for cookie in 0..count {
        let header = proto::RequestHeader {
            flags: 0,
            kind: proto::CMD_READ,
            cookie,
            offset: cookie * 512,
            length: 512,
        };
        burst.extend_from_slice(&header.encode());
    }
    client.send(&burst).await;
    let fixture = fixture_bytes();
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let (error, cookie) = client.simple_reply().await;
        assert_eq!(error, 0);
        let data = client.read_exact(512).await;
        let offset = (cookie * 512) as usize;
        assert_eq!(data, fixture[offset..offset + 512]);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

#[tokio::test(flavor = "multi_thread")]
async fn disc_answers_in_flight_requests_then_closes() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "rw").await;
    let mut bytes = proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 4,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(b"DATA");
    let disc = proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_DISC,
        cookie: 2,
        offset: 0,
        length: 0,
    };
    bytes.extend_from_slice(&disc.encode());
    client.send(&bytes).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    client.assert_closed().await;
    assert_eq!(&server.exports.get("rw").bytes()[..4], b"DATA");
    let observed = server.exports.observed.lock().unwrap().clone();
    assert!(observed.contains(&(Op::Write, 4, true)));
    assert!(observed.contains(&(Op::Disconnect, 0, true)));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_request_magic_closes_the_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    let mut header = proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    header[0] = 0x12;
    client.send(&header).await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_request_ends_only_that_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = open(&server, "ro").await;
    let header = proto::RequestHeader {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    client.send(&header[..13]).await;
    drop(client);
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_leaving_mid_write_payload_ends_only_that_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let export = server.exports.get("rw");
    let baseline = Arc::strong_count(&export);
    let mut client = open(&server, "rw").await;
    client.request(0, proto::CMD_WRITE, 1, 0, 65536).await;
    client.send(&[0x55; 1000]).await;
    drop(client);
    server.assert_serving().await;
    // The connection's hold on the export is released once it is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&export) != baseline {
        assert!(tokio::time::Instant::now() < deadline, "export still held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        export.bytes(),
        fixture_bytes(),
        "a partial write never reaches the export"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_connections_and_returns() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut idle = open(&server, "ro").await;
    let mut negotiating = RawClient::connect(server.addr).await;
    server.stop().await.expect("clean stop");
    idle.assert_closed().await;
    negotiating.assert_closed().await;
}

/// Exports whose reads at offset 0 fail: "enospc" and "eacces" with those OS errors,
/// "panics" by panicking.
fn faulty_exports() -> MemoryExports {
    MemoryExports::new()
        .with(
            "enospc",
            "",
            MemoryExport::new(fixture_bytes(), true).with_fault(0, Fault::Error(28)),
        )
        .with(
            "panics",
            "",
            MemoryExport::new(fixture_bytes(), true).with_fault(0, Fault::Panic),
        )
        .with(
            "eacces",
            "",
            MemoryExport::new(fixture_bytes(), true).with_fault(0, Fault::Error(13)),
        )
        .with("ro", "", MemoryExport::new(fixture_bytes(), true))
}

#[tokio::test(flavor = "multi_thread")]
async fn export_errors_reach_the_client_as_nbd_errors() {
    let server = TestServer::start(faulty_exports()).await;
    let mut client = open(&server, "enospc").await;
    client.request(0, proto::CMD_READ, 1, 0, 512).await;
    assert_eq!(
        client.simple_reply().await,
        (proto::ENOSPC, 1),
        "no data follows"
    );
    client.request(0, proto::CMD_READ, 2, 512, 512).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    assert_eq!(client.read_exact(512).await, fixture_bytes()[512..1024]);

    let (mut client, _) = open_structured(&server, "eacces").await;
    client.request(0, proto::CMD_READ, 3, 0, 512).await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(chunk_error(&payload), proto::EPERM);
    let message = String::from_utf8_lossy(&payload[6..]).into_owned();
    assert!(message.contains("Permission denied"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_export_answers_eio_and_the_connection_continues() {
    let server = TestServer::start(faulty_exports()).await;
    let mut client = open(&server, "panics").await;
    client.request(0, proto::CMD_READ, 1, 0, 512).await;
    assert_eq!(client.simple_reply().await, (proto::EIO, 1));
    client.request(0, proto::CMD_READ, 2, 4096, 512).await;
    assert_eq!(client.simple_reply().await, (0, 2));
    assert_eq!(client.read_exact(512).await, fixture_bytes()[4096..4608]);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_connection_returns_once_the_export_is_released() {
    let exports = Arc::new(MemoryExports::fixture());
    let export = exports.get("rw");
    let baseline = Arc::strong_count(&export);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = {
        let exports = Arc::clone(&exports);
        tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            lazyblk_nbd::serve_connection(
                stream,
                peer.to_string(),
                exports,
                ServerConfig::default(),
            )
            .await
        })
    };
    let mut client = RawClient::connect(addr).await;
    client.go("rw").await;
    client.request(0, proto::CMD_FLUSH, 1, 0, 0).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    assert!(
        Arc::strong_count(&export) > baseline,
        "held while connected"
    );
    client.request(0, proto::CMD_DISC, 2, 0, 0).await;
    serving.await.unwrap().expect("clean disconnect");
    assert_eq!(Arc::strong_count(&export), baseline);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_connection_reports_protocol_violations() {
    let exports = Arc::new(MemoryExports::fixture());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        lazyblk_nbd::serve_connection(stream, peer.to_string(), exports, ServerConfig::default())
            .await
    });
    let mut client = RawClient::connect(addr).await;
    client.go("ro").await;
    client.send(&[0xff; 28]).await;
    let error = serving.await.unwrap().expect_err("bad magic");
    assert!(error.is_protocol_violation());
    assert!(error.to_string().contains("request magic"), "{error}");
}
