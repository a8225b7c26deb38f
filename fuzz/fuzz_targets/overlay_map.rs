//! Fuzz target: an overlay's block map recovered from a torn or damaged map file, as
//! `Overlay::open` reads it. A map of valid states is recovered with counts that add
//! up; any other byte is refused with its block index, never accepted or a panic.
#![no_main]

use lazyblk_cache::overlay::recover_block_map;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match recover_block_map(data) {
        Ok(summary) => {
            assert_eq!(summary.blocks, data.len() as u64);
            assert!(summary.data_blocks + summary.zero_blocks <= summary.blocks);
            assert!(
                data.iter().all(|&b| b <= 2),
                "an invalid state was accepted"
            );
        }
        Err((block, byte)) => {
            assert_eq!(
                data[block as usize], byte,
                "the refusal names the wrong block"
            );
            assert!(byte > 2);
        }
    }
});
