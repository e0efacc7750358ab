//! Untrusted stream bytes, cut into pushes of fuzzer-chosen sizes, through the frame decoder and
//! each frame's payload through the message decoder: errors end the stream, nothing panics, and
//! the decoder never hands out more bytes than it was given.
#![no_main]

use amity_protocol::frame::FrameDecoder;
use amity_protocol::message::{ClientMsg, ServerMsg, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let piece = (cut as usize % 64) + 1;
    let mut dec = FrameDecoder::new();
    let mut handed_out = 0usize;
    'stream: for chunk in rest.chunks(piece) {
        dec.push(chunk);
        let _ = dec.wanted();
        loop {
            match dec.next_frame() {
                Ok(Some((_, payload))) => {
                    handed_out += payload.len() + 5;
                    let _ = decode::<ClientMsg>(&payload);
                    let _ = decode::<ServerMsg>(&payload);
                }
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    assert!(handed_out + dec.buffered() <= rest.len());
    let _ = dec.finish();
});
