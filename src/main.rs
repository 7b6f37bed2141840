//! The `keygate` binary: parses arguments, binds sockets, and hands over to
//! the library (`keygate::app::run` for the server, `keygate::cli` for the
//! client commands).

// One exception, `hold_glibc_malloc_in`, and nowhere else.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    hold_glibc_malloc_in();
    let cli = keygate::cli::Cli::parse();
    keygate::cli::main(cli)
}

/// Two malloc arenas and a fixed mmap threshold (128 KiB), set before any
/// other thread exists. Left to itself, glibc gives each thread that
/// allocates an arena of its own and raises the mmap threshold after every
/// large free, and keeps what is freed in both: under a soak of key churn
/// keygate's RSS crept up 4-12 MiB in ten minutes with no live data behind
/// it, and was flat with these two settings (SECURITY.md, soak). The same
/// as `GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072`,
/// which only works when set by whoever starts keygate.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn hold_glibc_malloc_in() {
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // first thing in main, before any other thread could allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn hold_glibc_malloc_in() {}
