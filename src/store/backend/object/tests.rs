//! Unit tests of the object backend over an in-memory object store (the real bucket
//! is tested in tests/s3_store.rs and tests/azure_store.rs).

use super::*;
use crate::store::backend::ChunkPut;
use crate::store::Durability;
use bytes::Bytes;
use futures::Stream;
use object_store::memory::InMemory;

fn backend() -> ObjectBackend {
    ObjectBackend::new(Arc::new(InMemory::new()), "pre/fix")
}

fn body(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    futures::stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))])
}

fn manifest_json(id: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut m = Manifest::new(id, chunks.len() as u64 * 65536, 65536);
    for (i, c) in chunks.iter().enumerate() {
        m.chunks[i] = Some(Digest::of(c));
    }
    m.to_json()
}

#[test]
fn keys_follow_the_store_layout() {
    let b = backend();
    let d = Digest::of(b"x");
    let hex = d.to_string();
    assert_eq!(
        b.chunk_key(&d).to_string(),
        format!("pre/fix/chunks/{}/{hex}", &hex[..2])
    );
    assert_eq!(b.manifest_key("t").to_string(), "pre/fix/manifests/t.json");
    let root = ObjectBackend::new(Arc::new(InMemory::new()), "");
    assert_eq!(root.trace_key("t").to_string(), "traces/t.json");
}

#[tokio::test]
async fn chunks_are_verified_before_they_are_stored() {
    let b = backend();
    let (data, other) = (vec![7u8; 4096], vec![8u8; 4096]);
    let digest = Digest::of(&data);
    let wrong = b.put_chunk(Digest::of(&other), body(&data)).await;
    assert!(matches!(wrong, Err(BackendError::DigestMismatch { .. })));
    assert_eq!(b.chunk_len(&Digest::of(&other)).await.unwrap(), None);
    let put = b.put_chunk(digest, body(&data)).await.unwrap();
    assert_eq!(put, ChunkPut::Stored(4096));
    let again = b.put_chunk(digest, body(&data)).await.unwrap();
    assert_eq!(again, ChunkPut::Present);
    let missing = b.missing(vec![digest, Digest::of(&other), digest]).await;
    assert_eq!(missing.unwrap(), vec![Digest::of(&other)]);
}

#[tokio::test]
async fn manifests_are_immutable_and_durability_follows_the_bucket() {
    let b = backend();
    let (c1, c2): (&[u8], &[u8]) = (b"one", b"two");
    let json = manifest_json("t", &[c1, c2]);
    assert_eq!(
        b.put_manifest("t", &json, None).await.unwrap(),
        ManifestPut::Created
    );
    assert_eq!(
        b.put_manifest("t", &json, None).await.unwrap(),
        ManifestPut::Unchanged
    );
    let other = manifest_json("t", &[c1, b"three"]);
    assert!(matches!(
        b.put_manifest("t", &other, None).await,
        Err(BackendError::Conflict { .. })
    ));
    assert_eq!(
        b.summary("t").await.unwrap().durability,
        Durability::OriginOnly
    );
    b.put_chunk(Digest::of(c1), body(c1)).await.unwrap();
    assert_eq!(
        b.summary("t").await.unwrap().durability,
        Durability::Uploading
    );
    b.put_chunk(Digest::of(c2), body(c2)).await.unwrap();
    assert_eq!(b.ids().await.unwrap(), vec!["t".to_string()]);
    assert_eq!(
        b.summary("t").await.unwrap().durability,
        Durability::Durable
    );
    b.delete("t").await.unwrap();
    assert!(matches!(
        b.summary("t").await,
        Err(BackendError::UnknownTemplate(_))
    ));
    assert!(b.ids().await.unwrap().is_empty());
}
