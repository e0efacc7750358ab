//! An untrusted shard file (hash-verified bytes can still be hostile: anyone can hash what they
//! make): an error or a view whose every clip lies inside the file, never a panic.
#![no_main]

use amity_shared::corpus::shard::ShardView;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(view) = ShardView::parse(data) {
        for i in 0..view.len() {
            assert!(view.clip(i).len() <= data.len());
        }
    }
});
