//! Fuzz target: arbitrary bytes as a client's side of the NBD handshake (its flags,
//! then options), served from memory. Any panic, or a connection that stays open
//! after the client closes, is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lazyblk_fuzz::run_connection(data);
});
