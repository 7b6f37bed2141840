//! A bounded pass of the credential fuzzer (examples/fuzz_credentials.rs) on
//! every test run: a fixed seed, so a failure here replays exactly with
//! `cargo run --release --example fuzz_credentials -- --seed 20240611
//! --iterations 150000`. Longer runs are in the example's docs.

#[path = "../examples/fuzz_credentials.rs"]
#[allow(dead_code)]
mod fuzz_credentials;

use fuzz_credentials::{run, FuzzOptions};

#[test]
fn credential_parser_and_rewrite_survive_a_bounded_fuzz_run() {
    let options = FuzzOptions {
        iterations: Some(150_000),
        duration: None,
        seed: 20_240_611,
        corpus: None,
    };
    match run(&options) {
        Ok(report) => {
            assert_eq!(report.iterations, 150_000);
            // The mutations must sometimes keep a token valid, or the run
            // never exercised the accepting side.
            assert!(report.accepted > 0, "{report:?}");
        }
        Err(failure) => panic!("{failure:#?}"),
    }
}
