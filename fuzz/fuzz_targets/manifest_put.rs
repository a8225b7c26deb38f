//! Fuzz target: the store's manifest PUT. The input is a stored manifest and an offered
//! one (split at the first NUL); both are parsed as the store parses a PUT body for a
//! template id, and compared as the store compares them (same content is a no-op, other
//! content a conflict). Nothing panics; the comparison is symmetric and reflexive; a
//! manifest that parses under an id parses back from its own JSON under that id.
#![no_main]

use lazyblk_cache::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (stored, offered) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let Ok(offered) = Manifest::parse(offered, None) else {
        return;
    };
    // The PUT names the id in its path: the body must agree with it.
    let id = offered.template.clone();
    let under_id = Manifest::parse(&offered.to_json(), Some(&id))
        .unwrap_or_else(|e| panic!("a manifest does not parse under its own id: {e}"));
    assert!(under_id.same_content(&offered));
    assert!(offered.same_content(&offered), "not reflexive");
    if let Ok(stored) = Manifest::parse(stored, Some(&id)) {
        assert_eq!(
            stored.same_content(&offered),
            offered.same_content(&stored),
            "the comparison is not symmetric"
        );
    }
});
