//! Fuzz target: arbitrary bytes as a manifest. Parsing never panics; a manifest that
//! parses serializes and parses back to the same manifest, and what a daemon computes
//! from it (chunk lengths, stored bytes) does not overflow.
#![no_main]

use lazyblk_cache::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::parse(data, None) else {
        return;
    };
    let json = manifest.to_json();
    let again = Manifest::parse(&json, Some(&manifest.template))
        .unwrap_or_else(|e| panic!("a parsed manifest does not parse back: {e}"));
    assert_eq!(again, manifest, "the manifest changed on a round trip");
    assert!(again.same_content(&manifest));
    let lengths: u64 = (0..manifest.chunk_count())
        .map(|i| manifest.chunk_len(i))
        .sum();
    assert_eq!(
        lengths, manifest.size,
        "chunk lengths do not add up to the size"
    );
    assert!(manifest.stored_bytes() <= manifest.size);
});
