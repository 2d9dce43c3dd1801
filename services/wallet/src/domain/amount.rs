use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The largest value a NUMERIC(20,2) column holds.
pub const MAX_BALANCE: Decimal = Decimal::from_parts(0x630F_FFFF, 0x6BC7_5E2D, 0x5, false, 2);

/// A positive amount of money with at most two decimals that fits NUMERIC(20,2).
/// Never rounded: anything that would need rounding is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Amount(Decimal);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a decimal number, given as a string like \"10.50\" or a JSON number")]
    NotANumber,
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount must have at most 2 decimal places")]
    TooPrecise,
    #[error("amount must not exceed 999999999999999999.99")]
    TooLarge,
}

impl Amount {
    pub fn new(value: Decimal) -> Result<Self, AmountError> {
        if value <= Decimal::ZERO {
            return Err(AmountError::NotPositive);
        }
        if value > MAX_BALANCE {
            return Err(AmountError::TooLarge);
        }
        // normalize() drops trailing zeros, so "1.500" is accepted as 1.50.
        if value.normalize().scale() > 2 {
            return Err(AmountError::TooPrecise);
        }
        let mut exact = value;
        exact.rescale(2);
        Ok(Self(exact))
    }

    /// Parses the text of a JSON number or string without going through a float.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        let text = text.trim();
        if text.is_empty() || text.starts_with('+') {
            return Err(AmountError::NotANumber);
        }
        let value = match Decimal::from_str_exact(text) {
            Ok(value) => value,
            Err(rust_decimal::Error::Underflow) => return Err(AmountError::TooPrecise),
            Err(rust_decimal::Error::ExceedsMaximumPossibleValue) => {
                return Err(AmountError::TooLarge);
            }
            Err(_) => match Decimal::from_scientific(text) {
                Ok(value) => value,
                Err(_) => return Err(classify_unparsable(text)),
            },
        };
        Self::new(value)
    }

    pub fn value(self) -> Decimal {
        self.0
    }
}

/// Numbers too long for a Decimal are still numbers: say which limit they break.
fn classify_unparsable(text: &str) -> AmountError {
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => match exponent
            .strip_prefix('+')
            .unwrap_or(exponent)
            .parse::<i64>()
        {
            Ok(exponent) => (mantissa, exponent),
            // An exponent too long for i64 is still a number, far out of range either way.
            Err(_)
                if !exponent.is_empty()
                    && exponent
                        .trim_start_matches(['-', '+'])
                        .bytes()
                        .all(|b| b.is_ascii_digit()) =>
            {
                (
                    mantissa,
                    if exponent.starts_with('-') {
                        i64::MIN
                    } else {
                        i64::MAX
                    },
                )
            }
            Err(_) => return AmountError::NotANumber,
        },
        None => (text, 0),
    };
    let unsigned = mantissa.strip_prefix('-').unwrap_or(mantissa);
    let well_formed = !unsigned.is_empty()
        && unsigned.matches('.').count() <= 1
        && unsigned.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && unsigned.bytes().any(|b| b.is_ascii_digit());
    if !well_formed {
        return AmountError::NotANumber;
    }
    if mantissa.starts_with('-') || unsigned.bytes().all(|b| b == b'0' || b == b'.') {
        return AmountError::NotPositive;
    }
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let whole_digits = whole.trim_start_matches('0').len() as i64;
    let fraction_digits = fraction.trim_end_matches('0').len() as i64;
    if whole_digits.saturating_add(exponent) > 18 {
        AmountError::TooLarge
    } else if fraction_digits.saturating_sub(exponent) > 2 {
        AmountError::TooPrecise
    } else {
        AmountError::TooLarge
    }
}

impl TryFrom<Decimal> for Amount {
    type Error = AmountError;
    fn try_from(value: Decimal) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Amount> for Decimal {
    fn from(amount: Amount) -> Self {
        amount.0
    }
}

impl FromStr for Amount {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_balance_is_the_numeric_20_2_limit() {
        assert_eq!(MAX_BALANCE.to_string(), "999999999999999999.99");
    }

    #[test]
    fn accepts_exact_amounts_and_pads_to_two_decimals() {
        assert_eq!(
            Amount::parse("10").map(|a| a.to_string()),
            Ok("10.00".into())
        );
        assert_eq!(
            Amount::parse("0.01").map(|a| a.to_string()),
            Ok("0.01".into())
        );
        assert_eq!(
            Amount::parse("1.500").map(|a| a.to_string()),
            Ok("1.50".into())
        );
        assert_eq!(
            Amount::parse("1e2").map(|a| a.to_string()),
            Ok("100.00".into())
        );
        assert_eq!(
            Amount::parse("999999999999999999.99").map(|a| a.to_string()),
            Ok("999999999999999999.99".into())
        );
    }

    #[test]
    fn refuses_what_would_need_rounding_or_does_not_fit() {
        assert_eq!(Amount::parse("0.001"), Err(AmountError::TooPrecise));
        assert_eq!(Amount::parse("0"), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("0.00"), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("-5"), Err(AmountError::NotPositive));
        assert_eq!(
            Amount::parse("1000000000000000000"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(Amount::parse("1e300"), Err(AmountError::TooLarge));
        assert_eq!(
            Amount::parse("123456789012345678901234567890123"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(
            Amount::parse("1.0000000000000000000000000000001"),
            Err(AmountError::TooPrecise)
        );
        assert_eq!(Amount::parse("abc"), Err(AmountError::NotANumber));
        assert_eq!(Amount::parse(""), Err(AmountError::NotANumber));
        assert_eq!(Amount::parse("NaN"), Err(AmountError::NotANumber));
        assert_eq!(Amount::parse("1.2.3"), Err(AmountError::NotANumber));
        assert_eq!(Amount::parse("1e-300"), Err(AmountError::TooPrecise));
        assert_eq!(Amount::parse("-1e300"), Err(AmountError::NotPositive));
        assert_eq!(
            Amount::parse("1e99999999999999999999"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(Amount::parse("1e"), Err(AmountError::NotANumber));
    }
}
