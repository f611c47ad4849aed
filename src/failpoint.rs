//! Fault injection for black-box tests: `SLUICE_FAILPOINT=name:N` makes the
//! N-th pass through the point `name` report true, so a test can make a
//! storage thread die at a chosen moment. Compiled in debug builds only (the
//! ones `cargo test` starts); in release builds every point is always false.

/// True on the N-th call with `name` when `SLUICE_FAILPOINT=name:N` is set.
#[cfg(debug_assertions)]
pub fn hit(name: &str) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SLUICE_FAILPOINT").ok()?;
        let (n, at) = v.split_once(':')?;
        Some((n.to_string(), at.parse().ok()?))
    });
    match spec {
        Some((n, at)) if n == name => COUNT.fetch_add(1, Ordering::Relaxed) + 1 == *at,
        _ => false,
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) -> bool {
    false
}
