//! `CreditWindow`: how many deliveries a subscriber has granted and not yet
//! been sent. Grants add, each delivery spends one, zero means nothing moves.

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CreditWindow {
    available: u64,
}

impl CreditWindow {
    /// Adds `n` credits (saturating; `0` is a no-op).
    pub fn grant(&mut self, n: u32) {
        self.available = self.available.saturating_add(u64::from(n));
    }

    /// Spends one credit; false when there is none.
    pub fn spend(&mut self) -> bool {
        if self.available == 0 {
            return false;
        }
        self.available -= 1;
        true
    }

    pub fn available(&self) -> u64 {
        self.available
    }

    pub fn is_empty(&self) -> bool {
        self.available == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_add_and_deliveries_spend() {
        let mut w = CreditWindow::default();
        assert!(!w.spend());
        w.grant(0);
        assert!(w.is_empty());
        w.grant(2);
        w.grant(1);
        assert_eq!(w.available(), 3);
        assert!(w.spend() && w.spend() && w.spend());
        assert!(!w.spend());
    }

    #[test]
    fn grants_saturate_instead_of_wrapping() {
        let mut w = CreditWindow {
            available: u64::MAX - 1,
        };
        w.grant(u32::MAX);
        assert_eq!(w.available(), u64::MAX);
    }
}
