//! Amounts in cents: the bench never touches floats for money either.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// Formats cents as the API's decimal string ("10.50").
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Converts a NUMERIC(20,2) value read from PostgreSQL to cents; `None` if it has
/// more than two decimals or does not fit, which would itself be a finding.
pub fn decimal_to_cents(d: Decimal) -> Option<i64> {
    let scaled = d.checked_mul(Decimal::ONE_HUNDRED)?;
    if scaled.fract() != Decimal::ZERO {
        return None;
    }
    scaled.to_i64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn formats_with_two_decimals() {
        assert_eq!(format_cents(0), "0.00");
        assert_eq!(format_cents(1), "0.01");
        assert_eq!(format_cents(1050), "10.50");
        assert_eq!(format_cents(-250), "-2.50");
        assert_eq!(format_cents(100_000_000_000), "1000000000.00");
    }

    #[test]
    fn decimals_round_trip_to_cents() {
        let d = |s: &str| Decimal::from_str(s).expect("decimal");
        assert_eq!(decimal_to_cents(d("10.50")), Some(1050));
        assert_eq!(decimal_to_cents(d("0.01")), Some(1));
        assert_eq!(decimal_to_cents(d("7")), Some(700));
        assert_eq!(decimal_to_cents(d("0.001")), None);
    }
}
