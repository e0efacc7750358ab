//! An untrusted update or state delta: `decode_parts` gives an error or exactly the values of
//! the parts asked for, all finite, never a panic; what decodes re-encodes densely and decodes
//! to the same values.
#![no_main]

use amity_shared::federated::codec::{CodecSpec, decode_parts, encode_parts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The first four bytes choose two part lengths (up to 4096 values each).
    let a = u16::from_le_bytes([data[0], data[1]]) as usize % 4097;
    let b = u16::from_le_bytes([data[2], data[3]]) as usize % 4097;
    let parts = [a, b];
    let Ok(values) = decode_parts(&data[4..], &parts) else {
        return;
    };
    assert_eq!(values.len(), a + b);
    assert!(values.iter().all(|v| v.is_finite()));
    let fp32: CodecSpec = "fp32".parse().expect("a codec");
    let again = decode_parts(&encode_parts(&fp32, &values, &parts), &parts).expect("round trip");
    assert_eq!(again, values);
});
