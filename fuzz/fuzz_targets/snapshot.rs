//! An untrusted coordinator snapshot (a blob a damaged or hostile store could hold): an error
//! or a snapshot whose vectors have the lengths it records, never a panic.
#![no_main]

use amity_coordinator::core::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::from_bytes(data) {
        let [m, t, mo, r] = s.meta.lens;
        assert_eq!(s.params.model.len() as u64, m);
        assert_eq!(s.params.target.len() as u64, t);
        assert_eq!(s.momentum.len() as u64, mo);
        assert_eq!(s.down_residual.len() as u64, r);
        let again = Snapshot::from_bytes(&s.to_bytes()).expect("a parsed snapshot re-encodes");
        assert_eq!(again.meta.lens, s.meta.lens);
    }
});
