//! A short soak on every test run (examples/soak.rs has the full one, see
//! its docs): the `keygate` binary under load from several connections
//! while keys are created, disabled, re-enabled and deleted through the
//! admin API; no request may be wrongly accepted or wrongly refused, and
//! nothing may fail.
//!
//! Memory is not judged by RSS here (a short run of a debug build says
//! nothing about flatness; the example judges it). What can be checked
//! without timing is what keygate keeps per key: the per-key series stay
//! within `max_key_series`, and once the load stops the cache lets go of
//! every id that is not a live or disabled key.

#[path = "../examples/soak.rs"]
#[allow(dead_code)]
mod soak;

use std::time::Duration;

const MAX_KEY_SERIES: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_key_churn_judges_every_request_correct() {
    let report = soak::run(&soak::SoakOptions {
        duration: Duration::from_secs(15),
        connections: 8,
        keygate: env!("CARGO_BIN_EXE_keygate").into(),
        sample_every: Duration::from_secs(5),
        // Short lifetimes, so the cache's sweep runs every second here.
        extra_config: format!(
            "[cache]\nttl = \"1s\"\nnegative_ttl = \"1s\"\n\
             [metrics]\nmax_key_series = {MAX_KEY_SERIES}\n"
        ),
        settle: Some(Duration::from_secs(30)),
    })
    .await;
    soak::print(&report);
    assert!(report.passed(), "{report:#?}");
    // The run must have exercised both sides and the churn.
    assert!(report.accepted > 0 && report.refused > 0, "{report:#?}");
    assert!(report.disables > 0 && report.deletes > 0, "{report:#?}");
    // More keys were used than may have a series of their own.
    assert!(report.creates > MAX_KEY_SERIES, "{report:#?}");
    assert!(
        report.memory.iter().all(|s| s.key_series <= MAX_KEY_SERIES),
        "{report:#?}"
    );
    // Deleted and unknown ids leave the cache: only keys that still exist
    // (and the admin's) may stay.
    let (entries, kept) = report.settled.expect("settled");
    assert!(
        entries <= kept,
        "{entries} cache entries, {kept} keys: {report:#?}"
    );
}
