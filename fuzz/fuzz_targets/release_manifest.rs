//! An untrusted release manifest (what `amity fetch` reads from a server or a mirror before it
//! checks the signature): an error or a manifest whose file paths are all safe, never a panic.
#![no_main]

use amity_release::{Manifest, valid_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data, "fuzz") {
        // Every file name stays inside the release folder: no separator, no leading dot.
        for f in &m.files {
            assert!(valid_name(&f.path) && !f.path.contains('/'));
        }
        let again = Manifest::parse(&m.to_bytes(), "fuzz").expect("a parsed manifest re-encodes");
        assert_eq!(again.files.len(), m.files.len());
    }
});
