//! Process-wide allocator tuning.

/// Makes large allocations (argon2's 19 MiB blocks) go straight to the
/// kernel and back when freed. glibc otherwise raises its mmap threshold
/// after the first such free, and later blocks land in per-thread arenas
/// that keep the memory: with hashes running on changing blocking threads,
/// resident memory grew to hundreds of MiB (measured: a 200-login storm
/// peaked near 1 GiB; with this, 85 MiB). The price, fresh pages for every
/// hash, is paid only when hashes come one at a time: under load the
/// password hasher reuses its working memory. Call once, early in `main`.
pub fn release_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; a fixed threshold
    // also turns off glibc's dynamic adjustment of it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}
