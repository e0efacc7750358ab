//! An untrusted MP4 through the built-in decoder (what `amity corpus ingest` reads from a
//! corpus): an error or decoded frames, never a panic or a runaway allocation.
#![no_main]

use amity_shared::corpus::h264::decode_mp4;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The decoder reads a path: one scratch file per fuzzing process.
    let path = std::env::temp_dir().join(format!("amity-fuzz-{}.mp4", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(v) = decode_mp4(&path, 16, 4.0, 8) {
        assert_eq!(v.pixels.len(), v.frames * 16 * 16 * 3);
    }
});
