//! `lazyblk store` over real HTTP: chunks verified against their digest, manifests
//! immutable, tokens, traces, durability, delete and gc.

mod support;

use lazyblk_cache::{Digest, Manifest};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use support::StoreProc;

fn chunk(seed: u64) -> Vec<u8> {
    support::pattern(64 << 10, seed)
}

async fn put(client: &Client, url: String, body: Vec<u8>) -> (StatusCode, String) {
    let r = client.put(url).body(body).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn get(client: &Client, url: String) -> (StatusCode, Vec<u8>) {
    let r = client.get(url).send().await.unwrap();
    (r.status(), r.bytes().await.unwrap().to_vec())
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_string()
}

/// A manifest of `chunks` 64 KiB chunks (None = zero chunk).
fn manifest(id: &str, chunks: &[Option<&[u8]>]) -> Manifest {
    let mut m = Manifest::new(id, chunks.len() as u64 * 65536, 65536);
    for (i, c) in chunks.iter().enumerate() {
        m.chunks[i] = c.map(Digest::of);
    }
    m
}

#[tokio::test]
async fn chunks_are_verified_streamed_and_counted() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let data = chunk(1);
    let digest = Digest::of(&data);
    let url = format!("{base}/v1/chunks/{digest}");

    let (status, _) = put(&client, url.clone(), data.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = put(&client, url.clone(), data.clone()).await;
    assert_eq!(status, StatusCode::OK, "a present chunk is not rewritten");
    assert_eq!(store.metric("lazyblk_store_chunks_uploaded_total"), 1.0);
    assert_eq!(store.metric("lazyblk_store_bytes_uploaded_total"), 65536.0);

    // A body that does not hash to its digest is refused and not stored.
    let other = chunk(2);
    let other_digest = Digest::of(&other);
    let (status, body) = put(
        &client,
        format!("{base}/v1/chunks/{other_digest}"),
        data.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("digest mismatch"), "{body}");
    assert_eq!(store.metric("lazyblk_store_digest_mismatch_total"), 1.0);
    assert!(!store
        .root()
        .join("chunks")
        .join(other_digest.shard_path())
        .exists());
    let (status, _) = get(&client, format!("{base}/v1/chunks/{other_digest}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), Some(65536));
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    let r = client.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // reqwest's content_length() is the body's length, empty for HEAD: read the header.
    assert_eq!(r.headers()["content-length"], "65536");
    let r = client
        .head(format!("{base}/v1/chunks/{other_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total"),
        1.0,
        "HEAD serves nothing"
    );
    assert_eq!(store.metric("lazyblk_store_bytes_served_total"), 65536.0);

    let asked = serde_json::json!([digest, other_digest, other_digest]);
    let r = client
        .post(format!("{base}/v1/chunks/missing"))
        .json(&asked)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let missing: Vec<String> = r.json().await.unwrap();
    assert_eq!(missing, vec![other_digest.to_hex()]);

    for bad in ["xyz", &"A".repeat(64), &"a".repeat(63)] {
        let (status, body) = get(&client, format!("{base}/v1/chunks/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "GET {bad}");
        assert!(String::from_utf8_lossy(&body).contains("invalid chunk digest"));
        let (status, _) = put(&client, format!("{base}/v1/chunks/{bad}"), data.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "PUT {bad}");
    }
    let r = client
        .post(format!("{base}/v1/chunks/missing"))
        .json(&serde_json::json!(["nope"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let requests = store
        .metric("lazyblk_store_http_requests_total{route=\"/v1/chunks/{digest}\",status=\"201\"}");
    assert_eq!(requests, 1.0);
}

#[tokio::test]
async fn manifests_are_immutable_and_validated() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let url = format!("{base}/v1/templates/base/manifest");
    let m = manifest("base", &[Some(b"a"), None, Some(b"b")]);

    let (status, body) = put(&client, url.clone(), m.to_json()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = put(&client, url.clone(), m.to_json()).await;
    assert_eq!(status, StatusCode::OK, "identical content is a no-op");
    let mut other = m.clone();
    other.chunks[1] = Some(Digest::of(b"c"));
    let (status, body) = put(&client, url.clone(), other.to_json()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let message = error_of(&body);
    assert!(
        message.contains("already exists") && message.contains("chunk 1"),
        "{message}"
    );
    assert_eq!(store.metric("lazyblk_store_manifests_published_total"), 1.0);

    let (status, stored) = get(&client, url.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let stored = Manifest::parse(&stored, Some("base")).unwrap();
    assert!(stored.same_content(&m));
    assert!(
        stored.created_at.ends_with('Z'),
        "created_at set: {:?}",
        stored.created_at
    );

    let (status, body) = put(&client, url.clone(), b"{\"format\": 1".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("malformed manifest"), "{body}");
    let (status, body) = put(
        &client,
        format!("{base}/v1/templates/other/manifest"),
        m.to_json(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a manifest stored under another id"
    );
    assert!(error_of(&body).contains("expected \"other\""), "{body}");
    let (status, _) = put(
        &client,
        format!("{base}/v1/templates/Bad.Id/manifest"),
        m.to_json(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    for path in ["nosuch", "nosuch/manifest"] {
        let (status, body) = get(&client, format!("{base}/v1/templates/{path}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            error_of(&String::from_utf8_lossy(&body)),
            "unknown template nosuch"
        );
    }
}

#[tokio::test]
async fn durability_follows_uploads() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let (a, b, c) = (chunk(10), chunk(11), chunk(12));
    let parent = manifest("parent", &[Some(&a), Some(&b)]);
    let mut child = manifest("child", &[Some(&a), Some(&c), None]);
    child.parent = Some("parent".into());
    for m in [&parent, &child] {
        let url = format!("{base}/v1/templates/{}/manifest", m.template);
        assert_eq!(put(&client, url, m.to_json()).await.0, StatusCode::CREATED);
    }
    let durability = |id: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let (_, body) = get(&client, format!("{base}/v1/templates/{id}")).await;
            let v: Value = serde_json::from_slice(&body).unwrap();
            v["durability"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(durability("child").await, "ORIGIN_ONLY");
    put(
        &client,
        format!("{base}/v1/chunks/{}", Digest::of(&a)),
        a.clone(),
    )
    .await;
    assert_eq!(durability("parent").await, "UPLOADING");
    assert_eq!(
        durability("child").await,
        "ORIGIN_ONLY",
        "a is the parent's chunk"
    );
    put(
        &client,
        format!("{base}/v1/chunks/{}", Digest::of(&c)),
        c.clone(),
    )
    .await;
    assert_eq!(durability("child").await, "DURABLE");

    let (status, body) = get(&client, format!("{base}/v1/templates")).await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = list
        .iter()
        .map(|t| t["template"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["child", "parent"]);
    assert_eq!(list[0]["chunks"], 3);
    assert_eq!(list[0]["stored_chunks"], 2);
    assert_eq!(list[0]["parent"], "parent");
    assert_eq!(list[1]["durability"], "UPLOADING");
}

#[tokio::test]
async fn tokens_guard_writes_and_chunk_reads() {
    let store = StoreProc::start_with(&["--write-token", "wtok", "--read-token", "rtok"]);
    let (base, client) = (store.url(), Client::new());
    let data = chunk(3);
    let url = format!("{base}/v1/chunks/{}", Digest::of(&data));

    let r = client.put(&url).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(error_of(&r.text().await.unwrap()).contains("bearer token"));
    let r = client
        .put(&url)
        .bearer_auth("rtok")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the read token does not allow writes"
    );
    let r = client
        .put(&url)
        .bearer_auth("wtok")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client.head(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    for token in ["rtok", "wtok"] {
        let r = client.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET with {token}");
        assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    }
    let r = client
        .get(format!("{base}/v1/templates"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "listing needs no token");
    let r = client.post(format!("{base}/v1/gc")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .delete(format!("{base}/v1/templates/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn traces_are_checked_against_the_manifest() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let url = format!("{base}/v1/templates/t/trace");
    let trace = serde_json::json!({"template": "t", "chunks": [2, 0]});
    let (status, _) = put(&client, url.clone(), trace.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no manifest yet");

    let m = manifest("t", &[Some(b"a"), None, Some(b"b")]);
    put(
        &client,
        format!("{base}/v1/templates/t/manifest"),
        m.to_json(),
    )
    .await;
    let (status, _) = get(&client, url.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no trace recorded yet");
    let (status, body) = put(&client, url.clone(), trace.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get(&client, url.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let back: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(back, trace);

    let out_of_range = serde_json::json!({"template": "t", "chunks": [3]});
    let (status, body) = put(&client, url.clone(), out_of_range.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("out of range"), "{body}");
    let wrong = serde_json::json!({"template": "u", "chunks": [0]});
    assert_eq!(
        put(&client, url.clone(), wrong.to_string().into_bytes())
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put(&client, url.clone(), b"[1,2]".to_vec()).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn delete_and_gc_remove_only_unreferenced_chunks() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let (a, b, c) = (chunk(20), chunk(21), chunk(22));
    for data in [&a, &b, &c] {
        put(
            &client,
            format!("{base}/v1/chunks/{}", Digest::of(data)),
            data.clone(),
        )
        .await;
    }
    let keep = manifest("keep", &[Some(&a), Some(&b)]);
    let gone = manifest("gone", &[Some(&b), Some(&c)]);
    for m in [&keep, &gone] {
        put(
            &client,
            format!("{base}/v1/templates/{}/manifest", m.template),
            m.to_json(),
        )
        .await;
    }
    let trace = serde_json::json!({"template": "gone", "chunks": [1]});
    put(
        &client,
        format!("{base}/v1/templates/gone/trace"),
        trace.to_string().into_bytes(),
    )
    .await;

    let r = client
        .delete(format!("{base}/v1/templates/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        !store.root().join("traces/gone.json").exists(),
        "the trace goes with it"
    );
    let r = client
        .delete(format!("{base}/v1/templates/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (status, _) = get(&client, format!("{base}/v1/chunks/{}", Digest::of(&c))).await;
    assert_eq!(status, StatusCode::OK, "chunks stay until gc");

    // The default grace period keeps freshly written chunks.
    let r = client.post(format!("{base}/v1/gc")).send().await.unwrap();
    let report: Value = r.json().await.unwrap();
    assert_eq!(
        (
            report["chunks_deleted"].as_u64(),
            report["chunks_recent"].as_u64()
        ),
        (Some(0), Some(1))
    );

    let r = client
        .post(format!("{base}/v1/gc?grace_secs=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["chunks_deleted"], 1, "{report}");
    assert_eq!(report["bytes_freed"], 65536);
    assert_eq!(report["chunks_referenced"], 2);
    for (data, present) in [(&a, true), (&b, true), (&c, false)] {
        let path = store
            .root()
            .join("chunks")
            .join(Digest::of(data).shard_path());
        assert_eq!(path.exists(), present, "{}", path.display());
    }
}

/// A publisher asks `missing`, is told an old unreferenced chunk is present and so does
/// not upload it; an operator's gc runs before the publisher's manifest arrives. The
/// chunk must survive that gc (`missing` renews it under gc's lock), or the manifest
/// would name a chunk the store no longer has. An old chunk nobody asked for is swept by
/// the same gc, so the test sees gc really sweeping.
#[tokio::test]
async fn gc_keeps_a_chunk_missing_reported_present_to_a_publisher() {
    let store = StoreProc::start();
    let (base, client) = (store.url(), Client::new());
    let (asked, unasked, absent) = (chunk(30), chunk(31), chunk(32));
    for data in [&asked, &unasked] {
        let (status, _) = put(
            &client,
            format!("{base}/v1/chunks/{}", Digest::of(data)),
            data.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // Both chunks were written two hours ago and no manifest names them.
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for data in [&asked, &unasked] {
        let path = store
            .root()
            .join("chunks")
            .join(Digest::of(data).shard_path());
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(two_hours_ago))
            .unwrap();
    }

    let r = client
        .post(format!("{base}/v1/chunks/missing"))
        .json(&vec![
            Digest::of(&asked).to_hex(),
            Digest::of(&absent).to_hex(),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let missing: Vec<String> = r.json().await.unwrap();
    assert_eq!(missing, vec![Digest::of(&absent).to_hex()]);

    // The operator's gc, with a grace period of ten minutes.
    let r = client
        .post(format!("{base}/v1/gc?grace_secs=600"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["chunks_deleted"], 1, "{report}");
    assert_eq!(report["chunks_recent"], 1, "{report}");

    // The publisher uploads what it was told is missing, then its manifest.
    let (status, _) = put(
        &client,
        format!("{base}/v1/chunks/{}", Digest::of(&absent)),
        absent.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let m = manifest("raced", &[Some(&asked), Some(&absent)]);
    let (status, body) = put(
        &client,
        format!("{base}/v1/templates/raced/manifest"),
        m.to_json(),
    )
    .await;
    assert!(status.is_success(), "{status}: {body}");
    let (status, got) = get(&client, format!("{base}/v1/chunks/{}", Digest::of(&asked))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the chunk the publisher relied on was swept"
    );
    assert!(got == asked);
    let (status, _) = get(
        &client,
        format!("{base}/v1/chunks/{}", Digest::of(&unasked)),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "gc swept nothing");
}
