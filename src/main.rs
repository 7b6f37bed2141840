//! The `keygate` binary: parses arguments, binds sockets, and hands over to
//! the library (`keygate::app::run` for the server, `keygate::cli` for the
//! client commands).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keygate::cli::Cli::parse();
    keygate::cli::main(cli)
}
