//! Untrusted bytes as either direction's message: an error or a valid message, never a panic.
//! A message that decodes must re-encode to bytes that decode to the same message.
#![no_main]

use amity_protocol::message::{ClientMsg, ServerMsg, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ClientMsg>(data) {
        let again: ClientMsg = decode(&encode(&m)).expect("a decoded client message re-encodes");
        assert_eq!(again, m);
    }
    if let Ok(m) = decode::<ServerMsg>(data) {
        let again: ServerMsg = decode(&encode(&m)).expect("a decoded server message re-encodes");
        assert_eq!(again, m);
    }
});
