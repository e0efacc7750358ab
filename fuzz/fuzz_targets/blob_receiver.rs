//! An untrusted outboard (chunk chaining values) followed by untrusted chunks: parsing and verification
//! give errors, never panics, and a receiver never reports more verified bytes than the blob has.
#![no_main]

use amity_protocol::blob::{BlobReceiver, Outboard, chunk_count, chunk_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (outboard, chunks) = data[2..].split_at(split);
    let Ok(ob) = Outboard::from_bytes(outboard) else {
        return;
    };
    // Outboards claiming huge blobs cannot carry their hash count, so they are refused above.
    assert!(chunk_count(ob.len) as usize * 32 + 8 <= outboard.len());
    // Any id: the fuzzer rarely forges one the outboard adds up to, so also the outboard's own
    // root, which lets chunk verification be reached.
    let id = amity_protocol::id::BlobId(ob.root());
    let Ok(mut rx) = BlobReceiver::new(ob, &id, 0, &mut &[][..]) else {
        return;
    };
    let (mut at, mut index) = (0usize, 0u64);
    while at < chunks.len() {
        // Chunks of the size the outboard expects (or the rest), so verification is reached.
        let n = chunk_len(rx.len(), index).min(chunks.len() - at).max(1);
        if rx.accept(&chunks[at..at + n]).is_err() {
            break;
        }
        at += n;
        index += 1;
    }
    assert!(rx.verified() <= rx.len());
    let _ = rx.finish();
});
