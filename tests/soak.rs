//! A short soak on every test run (examples/soak.rs has the full one, see
//! its docs): load from several connections while keys are created,
//! disabled, re-enabled and deleted through the admin API; no request may be
//! wrongly accepted or wrongly refused, and nothing may fail.

#[path = "../examples/soak.rs"]
#[allow(dead_code)]
mod soak;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_key_churn_judges_every_request_correct() {
    let report = soak::run(&soak::SoakOptions {
        duration: Duration::from_secs(15),
        connections: 8,
    })
    .await;
    soak::print(&report);
    assert!(report.passed(), "{report:#?}");
    // The run must have exercised both sides and the churn.
    assert!(report.accepted > 0 && report.refused > 0, "{report:#?}");
    assert!(report.disables > 0 && report.deletes > 0, "{report:#?}");
    // Memory: a loose bound for a debug build; the example reports the
    // real numbers.
    assert!(
        report.rss_end_kib < report.rss_start_kib + 256 * 1024,
        "{report:#?}"
    );
}
