//! The `keygate` binary: parses arguments, binds sockets, and hands over to
//! the library (`keygate::app::run` for the server, `keygate::cli` for the
//! client commands).

// One exception, `limit_glibc_arenas`, and nowhere else.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    limit_glibc_arenas();
    match keygate::cli::Cli::try_parse() {
        Ok(cli) => keygate::cli::main(cli),
        Err(refused) => keygate::cli::arguments_refused(&refused),
    }
}

/// At most two malloc arenas, set before any other thread exists. Left to
/// itself glibc hands threads arenas of their own (up to eight per core:
/// runtime workers, the blocking pool, SQLite's connection threads, the log
/// flusher) and keeps what is freed in each: under the soak's key churn
/// keygate's peak RSS rose 5-12 MiB over ten minutes with no live data
/// behind it (2 of 3 runs). With two arenas the soak was flat (+56 KiB) and
/// the load bench's CPU per request unchanged (SECURITY.md). The same as
/// `GLIBC_TUNABLES=glibc.malloc.arena_max=2`, which only works when set by
/// whoever starts keygate. Not the fixed mmap threshold tried with it: that
/// cost about 20% per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_glibc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called first
    // thing in main, before any other thread could allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_glibc_arenas() {}
