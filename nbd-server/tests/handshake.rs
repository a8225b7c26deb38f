//! The handshake over a real socket, in raw bytes: what a client sees for good and bad
//! options, and that a misbehaving client never disturbs the next one.

mod support;

use lazyblk_nbd::proto;
use support::{info_payload, meta_payload, MemoryExports, RawClient, TestServer, SIZE};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread")]
async fn go_reports_size_flags_and_block_sizes() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    let requests = [
        proto::INFO_NAME,
        proto::INFO_DESCRIPTION,
        proto::INFO_BLOCK_SIZE,
    ];
    client
        .option(proto::OPT_GO, &info_payload("ro", &requests))
        .await;
    let replies = client.option_replies().await;
    let info = |kind: u16| {
        replies
            .iter()
            .find(|(_, reply, p)| *reply == proto::REP_INFO && p[0..2] == kind.to_be_bytes())
            .map(|(_, _, p)| p[2..].to_vec())
            .unwrap_or_else(|| panic!("NBD_INFO {kind} missing from {replies:?}"))
    };
    let export = info(proto::INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(export[0..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(flags & proto::FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & proto::FLAG_SEND_TRIM, 0);
    assert_eq!(
        flags & proto::FLAG_SEND_DF,
        0,
        "DF needs structured replies"
    );
    assert_eq!(info(proto::INFO_NAME), b"ro");
    assert_eq!(info(proto::INFO_DESCRIPTION), b"read-only template");
    let sizes = info(proto::INFO_BLOCK_SIZE);
    let size = |i: usize| u32::from_be_bytes(sizes[i..i + 4].try_into().unwrap());
    assert_eq!((size(0), size(4), size(8)), (1, 4096, 32 << 20));
    assert_eq!(replies.last().unwrap().1, proto::REP_ACK);
}

#[tokio::test(flavor = "multi_thread")]
async fn writable_export_advertises_write_commands() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(client.option_reply().await.1, proto::REP_ACK);
    let (_, flags) = client.go("rw").await;
    for flag in [
        proto::FLAG_HAS_FLAGS,
        proto::FLAG_SEND_FLUSH,
        proto::FLAG_SEND_FUA,
        proto::FLAG_SEND_TRIM,
        proto::FLAG_SEND_WRITE_ZEROES,
        proto::FLAG_SEND_CACHE,
        proto::FLAG_SEND_DF,
    ] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} in {flags:#x}");
    }
    assert_eq!(
        flags & (proto::FLAG_READ_ONLY | proto::FLAG_CAN_MULTI_CONN),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_client_flags_close_the_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect_with_flags(server.addr, 1 << 7).await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_option_magic_closes_the_connection() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    let mut bytes = b"IHAVEOPX".to_vec();
    bytes.extend_from_slice(&proto::OPT_LIST.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    client.send(&bytes).await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_option_gets_unsup_and_the_session_continues() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(0x4242, b"some data the server skips").await;
    let (option, reply, _) = client.option_reply().await;
    assert_eq!((option, reply), (0x4242, proto::REP_ERR_UNSUP));
    client.go("ro").await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_export_gets_err_unknown_and_the_session_continues() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    let (reply, export) = client.try_go("no-such-template").await;
    assert_eq!(reply, proto::REP_ERR_UNKNOWN);
    assert_eq!(export, None);
    let (reply, _) = client.try_go("busy").await;
    assert_eq!(reply, proto::REP_ERR_UNKNOWN);
    client
        .option(proto::OPT_INFO, &info_payload("busy", &[]))
        .await;
    let (_, reply, message) = client.option_reply().await;
    assert_eq!(reply, proto::REP_ERR_UNKNOWN);
    assert_eq!(message, b"export busy: being evicted");
    assert_eq!(client.go("ro").await.0, SIZE);
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_export_by_export_name_closes() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client
        .option(proto::OPT_EXPORT_NAME, b"no-such-template")
        .await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn export_name_honours_no_zeroes() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_EXPORT_NAME, b"ro").await;
    let reply = client.read_exact(10).await;
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
    client.request(0, proto::CMD_READ, 1, 0, 16).await;
    assert_eq!(
        client.simple_reply().await,
        (0, 1),
        "no padding before the reply"
    );

    let mut padded =
        RawClient::connect_with_flags(server.addr, proto::CLIENT_FLAG_FIXED_NEWSTYLE).await;
    padded.option(proto::OPT_EXPORT_NAME, b"ro").await;
    let reply = padded.read_exact(10 + 124).await;
    assert!(reply[10..].iter().all(|&b| b == 0));
    padded.request(0, proto::CMD_READ, 2, 0, 16).await;
    assert_eq!(padded.simple_reply().await, (0, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_names_every_export_with_its_description() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_LIST, &[]).await;
    let replies = client.option_replies().await;
    let listed: Vec<(String, String)> = replies
        .iter()
        .filter(|(_, reply, _)| *reply == proto::REP_SERVER)
        .map(|(_, _, p)| {
            let len = u32::from_be_bytes(p[0..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(p[4..4 + len].to_vec()).unwrap(),
                String::from_utf8(p[4 + len..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("ro".to_owned(), "read-only template".to_owned()),
            ("rw".to_owned(), "writable sandbox".to_owned())
        ]
    );
    assert_eq!(replies.last().unwrap().1, proto::REP_ACK);

    client.option(proto::OPT_LIST, b"junk").await;
    assert_eq!(client.option_reply().await.1, proto::REP_ERR_INVALID);
    client.go("ro").await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_is_acknowledged_then_closed() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_ABORT, &[]).await;
    assert_eq!(
        client.option_reply().await,
        (proto::OPT_ABORT, proto::REP_ACK, vec![])
    );
    client.assert_closed().await;

    // A client that aborts and hangs up without reading the ACK is fine too.
    let mut rude = RawClient::connect(server.addr).await;
    rude.option(proto::OPT_ABORT, &[]).await;
    rude.stream.shutdown().await.unwrap();
    drop(rude);
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_is_refused_by_policy() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_STARTTLS, &[]).await;
    assert_eq!(client.option_reply().await.1, proto::REP_ERR_POLICY);
    client.go("ro").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_options_are_too_big_and_skipped() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.option(proto::OPT_GO, &vec![0u8; 1 << 20]).await;
    assert_eq!(client.option_reply().await.1, proto::REP_ERR_TOO_BIG);
    client.go("ro").await;

    // An NBD_OPT_EXPORT_NAME cannot be answered with an error: the server hangs up.
    let mut client = RawClient::connect(server.addr).await;
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header).await;
    client.assert_closed().await;
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_go_is_invalid_and_the_session_continues() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    let mut payload = info_payload("ro", &[]);
    payload[3] = 200; // name length past the end of the option
    client.option(proto::OPT_GO, &payload).await;
    assert_eq!(client.option_reply().await.1, proto::REP_ERR_INVALID);
    client.go("ro").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn meta_contexts_need_structured_replies_and_know_base_allocation() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    client
        .option(
            proto::OPT_SET_META_CONTEXT,
            &meta_payload("ro", &["base:allocation"]),
        )
        .await;
    assert_eq!(client.option_reply().await.1, proto::REP_ERR_INVALID);

    client.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(client.option_reply().await.1, proto::REP_ACK);
    client
        .option(
            proto::OPT_LIST_META_CONTEXT,
            &meta_payload("ro", &["base:", "qemu:x"]),
        )
        .await;
    let replies = client.option_replies().await;
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].1, proto::REP_META_CONTEXT);
    assert_eq!(&replies[0].2[4..], b"base:allocation");

    client
        .option(
            proto::OPT_SET_META_CONTEXT,
            &meta_payload("ro", &["qemu:dirty-bitmap:x"]),
        )
        .await;
    assert_eq!(
        client.option_replies().await.len(),
        1,
        "nothing selected, just the ACK"
    );
    client.structured_with_block_status("ro").await;
    client.go("ro").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_option_does_not_disturb_others() {
    let server = TestServer::start(MemoryExports::fixture()).await;
    let mut client = RawClient::connect(server.addr).await;
    let mut bytes = b"IHAVEOPT".to_vec();
    bytes.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&100u32.to_be_bytes());
    bytes.extend_from_slice(&[0; 10]);
    client.send(&bytes).await;
    drop(client);
    server.assert_serving().await;
}
