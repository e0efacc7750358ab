//! The binary's allocator: mimalloc, with a count of heap bytes that `amity bench scale` turns
//! on to measure the coordinator core's peak memory exactly (page-granular RSS would blur a
//! model of a few MiB).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// mimalloc, counting bytes once [`start`] was called (one relaxed load per call until then).
pub struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed since [`start`] (negative when more was freed than
/// allocated since: memory from before).
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn add(bytes: usize) {
    let now = LIVE.fetch_add(bytes as isize, Relaxed) + bytes as isize;
    PEAK.fetch_max(now, Relaxed);
}

fn sub(bytes: usize) {
    LIVE.fetch_sub(bytes as isize, Relaxed);
}

// SAFETY: every call is forwarded unchanged to mimalloc, a correct allocator; the counting
// touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() && ON.load(Relaxed) {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() && ON.load(Relaxed) {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        if ON.load(Relaxed) {
            sub(layout.size());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() && ON.load(Relaxed) {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

/// Starts counting from zero (again): [`live`] and [`peak`] are relative to now.
pub fn start() {
    LIVE.store(0, Relaxed);
    PEAK.store(0, Relaxed);
    ON.store(true, Relaxed);
}

/// Heap bytes allocated and not freed since [`start`].
pub fn live() -> isize {
    LIVE.load(Relaxed)
}

/// The most [`live`] has been since [`start`] or the last [`reset_peak`].
pub fn peak() -> isize {
    PEAK.load(Relaxed)
}

/// Restarts the peak from the current [`live`].
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_what_is_allocated_and_freed() {
        super::start();
        let before = super::live();
        let v = vec![0u8; 1 << 20];
        assert!(super::live() - before >= 1 << 20);
        drop(v);
        // Other test threads allocate too: only this bound holds whatever they do.
        assert!(super::peak() - before >= 1 << 20);
    }
}
