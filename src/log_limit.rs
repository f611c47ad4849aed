//! `RateLimit`: keeps a repeating log line from flooding the log. Each call
//! site of [`log_limited!`] has its own limit: the first line is logged at
//! once, then at most one per [`PERIOD_MS`], saying how many were suppressed
//! in between. Lock-free; calls only the clock and `log`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// At most one line per call site per this many milliseconds.
pub const PERIOD_MS: u64 = 5_000;

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    /// When the last line was logged (Unix ms; 0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when this line may be
    /// logged at `now_ms`; `None` (and counted) when it must not.
    pub fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < PERIOD_MS {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another thread logged this line just now.
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        self.admit_at(now)
    }
}

/// `log_limited!(Level, "format", args…)`: logs like `log::log!`, rate-limited
/// per call site, appending the count of suppressed lines when there were any.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static SITE: $crate::log_limit::RateLimit = $crate::log_limit::RateLimit::new();
        if let Some(suppressed) = SITE.admit() {
            if suppressed > 0 {
                log::log!($level, "{} ({} similar lines suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::log!($level, $($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_then_one_per_period_with_the_suppressed_count() {
        let l = RateLimit::new();
        assert_eq!(l.admit_at(1_000), Some(0));
        for t in 1_001..1_100 {
            assert_eq!(l.admit_at(t), None);
        }
        assert_eq!(l.admit_at(1_000 + PERIOD_MS - 1), None);
        assert_eq!(l.admit_at(1_000 + PERIOD_MS), Some(100));
        assert_eq!(l.admit_at(1_000 + 3 * PERIOD_MS), Some(0));
    }
}
