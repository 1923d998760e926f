//! What the memory store allocates for uploads, measured by a counting global allocator
//! (this test binary's own), so the claim "allocate as data arrives" is checked, not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lre_server::metrics::StoreMetrics;
use lre_server::store::{BlobStore, MemStore};

/// Bytes currently allocated through the global allocator, by anyone in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test]
async fn uploads_declaring_64_mib_allocate_only_what_arrived() {
    let store = MemStore::new(1 << 40, StoreMetrics::default());
    let before = LIVE.load(Ordering::Relaxed);
    let mut writers = Vec::new();
    for _ in 0..16 {
        let mut w = store.writer(Some(64 << 20)).await.unwrap();
        w.write(&[7u8; 1024]).await.unwrap();
        writers.push(w);
    }
    let grown = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    // 16 uploads that sent 1 KiB each: a few KiB each, not the 1 GiB they declared.
    assert!(
        grown < 4 << 20,
        "16 uploads of 1 KiB hold {grown} bytes of allocations"
    );
    drop(writers);
}
