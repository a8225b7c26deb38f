//! Fuzz target: a valid handshake (its shape picked by the first input byte), then the
//! rest of the input as transmission-phase requests. Any panic, a request the server
//! passes to the export outside the contract (past the end, a write to a read-only
//! export), or a connection that stays open after the client closes, is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, requests)) = data.split_first() else {
        return;
    };
    let mut bytes = lazyblk_fuzz::handshake_prefix(choice);
    bytes.extend_from_slice(requests);
    lazyblk_fuzz::run_connection(&bytes);
});
