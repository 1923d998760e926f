//! How the process allocates: one tuning call for the binaries that run a server (`lre-server`
//! and `lre up`), made first thing in `main`.

/// Every ByteStream message is a fresh buffer of up to a few MiB. glibc serves a buffer that
/// large from a new mmap and returns it with munmap, so each one was page-faulted and zeroed
/// again: a quarter of the server's CPU in a profile of 1 MiB writes. Serving them from the
/// heap, and keeping up to 64 MiB of what is freed there for the next message, removes that.
/// (mimalloc, tried instead, halved read throughput: its cross-thread frees of large
/// buffers.) Call before any thread is started.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's thresholds, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
