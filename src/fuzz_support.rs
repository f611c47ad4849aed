//! Shared set-up of the property-based fuzz tests (`cargo test --lib fuzz`,
//! one `mod fuzz` per parser): the case count comes from `SLUICE_FUZZ_CASES`
//! (a short default otherwise, so CI runs them all in seconds), and failures
//! are never persisted as files in the repository.

use proptest::test_runner::Config;

/// Cases per property for a long run, e.g. `SLUICE_FUZZ_CASES=200000`.
pub const CASES_ENV: &str = "SLUICE_FUZZ_CASES";

/// `default` cases, or `SLUICE_FUZZ_CASES / divisor` (at least 1) when the
/// variable is set: a property far slower per case than the rest (gzip,
/// big inputs) runs a fraction of a long run's cases.
pub fn config(default: u32, divisor: u32) -> Config {
    let cases = std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(default, |n| (n / divisor.max(1)).max(1));
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// The topic-name rule restated independently of `validate_topic_name`, so
/// properties check the code against the rule rather than against itself.
pub fn topic_rule_ok(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
