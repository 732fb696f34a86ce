//! Money: integer cents inside, decimal text outside.
//!
//! Prices are stored and computed as integer minor units (cents), never floats. Clients see them
//! in the unit the seeds use, as a JSON number with two decimals (`1299.99`, `1998.00`), written
//! as exact decimal text (no float formatting on the way out). On the way in, a JSON number or a
//! decimal string is accepted (`29.99`, `"29.99"`, `30`); more than two decimals is refused rather
//! than rounded, so a client never pays something other than what it sent.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount accepted: 10^13 cents (a hundred billion units).
pub const MAX_CENTS: i64 = 10_000_000_000_000;

/// An amount in cents. May be negative while parsing (validation reports it per field); stored
/// amounts are never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

impl Money {
    pub const fn from_cents(cents: i64) -> Self {
        Self(cents)
    }

    pub const fn cents(self) -> i64 {
        self.0
    }

    /// `self × quantity`, or `None` beyond [`MAX_CENTS`].
    pub fn times(self, quantity: i64) -> Option<Self> {
        self.0
            .checked_mul(quantity)
            .filter(|c| c.abs() <= MAX_CENTS)
            .map(Self)
    }

    /// `self + other`, or `None` beyond [`MAX_CENTS`].
    pub fn plus(self, other: Self) -> Option<Self> {
        self.0
            .checked_add(other.0)
            .filter(|c| c.abs() <= MAX_CENTS)
            .map(Self)
    }

    /// Parses decimal text (`"12"`, `"12.5"`, `"-0.99"`) exactly.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            return Err(format!("`{text}` is not a decimal amount"));
        }
        if fraction.len() > 2 {
            return Err("has more than two decimals".into());
        }
        let units: i64 = whole.parse().map_err(|_| "is too large".to_owned())?;
        let fraction_cents: i64 = format!("{fraction:0<2}").parse().unwrap_or(0);
        let cents = units
            .checked_mul(100)
            .and_then(|c| c.checked_add(fraction_cents))
            .filter(|c| *c <= MAX_CENTS)
            .ok_or_else(|| "is too large".to_owned())?;
        Ok(Self(if negative { -cents } else { cents }))
    }

    /// Parses a JSON number that arrived as a float. `19.99 * 100` is `1998.9999999999998` in
    /// binary, so it is rounded to the nearest cent; anything further from a whole cent than the
    /// float's own error had more than two decimals and is refused.
    fn from_f64(value: f64) -> Result<Self, String> {
        if !value.is_finite() {
            return Err("is not a number".into());
        }
        let scaled = value * 100.0;
        let cents = scaled.round();
        // A float carries ~16 significant digits: near the bound (10^13 cents) its error is
        // about a thousandth of a cent, so the tolerance grows with the amount (still far below
        // the half cent a third decimal would add).
        let tolerance = (scaled.abs() * f64::EPSILON * 8.0).max(1e-6);
        if (scaled - cents).abs() > tolerance {
            return Err("has more than two decimals".into());
        }
        if cents.abs() > MAX_CENTS as f64 {
            return Err("is too large".into());
        }
        Ok(Self(cents as i64))
    }
}

impl TryFrom<i64> for Money {
    type Error = String;

    /// From a stored amount in cents (the database refuses negative ones).
    fn try_from(cents: i64) -> Result<Self, Self::Error> {
        if cents < 0 {
            return Err(format!("negative amount {cents} in storage"));
        }
        Ok(Self(cents))
    }
}

/// In documents: a number with at most two decimals (a decimal string is accepted too).
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Number, Type::String]))
            .description(Some(
                "An amount in currency units with at most two decimals, sent as a JSON number \
                 (`1299.99`) or a decimal string (`\"1299.99\"`); answered as a number",
            ))
            .examples([serde_json::json!(1299.99)])
            .build()
            .into()
    }
}

impl utoipa::ToSchema for Money {}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Exact decimal text as a JSON number: `1299.99`, `1998.00`.
        let raw = serde_json::value::RawValue::from_string(self.to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MoneyVisitor;

        impl Visitor<'_> for MoneyVisitor {
            type Value = Money;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount with at most two decimals, as a number or a string")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                v.checked_mul(100)
                    .filter(|c| c.abs() <= MAX_CENTS)
                    .map(Money)
                    .ok_or_else(|| E::custom("amount is too large"))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                let v = i64::try_from(v).map_err(|_| E::custom("amount is too large"))?;
                self.visit_i64(v)
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                Money::from_f64(v).map_err(|m| E::custom(format!("amount {m}")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(|m| E::custom(format!("amount {m}")))
            }
        }

        deserializer.deserialize_any(MoneyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(json: &str) -> Result<Money, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn numbers_and_strings_parse_to_exact_cents() {
        let cases = [
            ("1299.99", 129_999),
            ("\"1299.99\"", 129_999),
            ("19.99", 1_999),
            ("0.1", 10),
            ("30", 3_000),
            ("\"30\"", 3_000),
            ("1998.00", 199_800),
            ("0", 0),
            ("-5.5", -550),
        ];
        for (json, cents) in cases {
            assert_eq!(
                from_json(json).map(Money::cents).ok(),
                Some(cents),
                "{json}"
            );
        }
    }

    #[test]
    fn more_than_two_decimals_or_nonsense_is_refused() {
        for json in [
            "10.001",
            "\"10.001\"",
            "\"ten\"",
            "\"\"",
            "\"1.2.3\"",
            "true",
            "null",
            "1e30",
        ] {
            assert!(from_json(json).is_err(), "{json} should be refused");
        }
    }

    #[test]
    fn amounts_serialise_as_two_decimal_numbers() {
        let cases = [
            (129_999, "1299.99"),
            (199_800, "1998.00"),
            (5, "0.05"),
            (0, "0.00"),
        ];
        for (cents, text) in cases {
            let json = serde_json::to_string(&Money::from_cents(cents)).expect("serialises");
            assert_eq!(json, text);
            assert_eq!(from_json(&json).map(Money::cents).ok(), Some(cents));
        }
    }

    #[test]
    fn every_cent_amount_round_trips_through_a_float_json_number() {
        // Clients that parse JSON numbers as floats send them back as floats.
        for cents in (0..200_000).step_by(7) {
            let as_float = format!("{}", cents as f64 / 100.0);
            assert_eq!(
                from_json(&as_float).map(Money::cents).ok(),
                Some(cents),
                "{as_float}"
            );
        }
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any text or number: parsed exactly within the bound, or refused; never a panic.
        #[test]
        fn parsing_never_panics_and_stays_bounded(text in ".{0,40}", number in any::<f64>()) {
            if let Ok(money) = Money::parse(&text) {
                prop_assert!(money.cents().abs() <= MAX_CENTS);
            }
            if let Ok(money) = Money::from_f64(number) {
                prop_assert!(money.cents().abs() <= MAX_CENTS);
            }
            let json = serde_json::json!(text).to_string();
            if let Ok(money) = serde_json::from_str::<Money>(&json) {
                prop_assert!(money.cents().abs() <= MAX_CENTS);
            }
        }

        /// What is written out reads back as the same amount.
        #[test]
        fn display_round_trips(cents in -MAX_CENTS..=MAX_CENTS) {
            let money = Money::from_cents(cents);
            prop_assert_eq!(Money::parse(&money.to_string()), Ok(money));
            let json = serde_json::to_string(&money).expect("serializes");
            prop_assert_eq!(serde_json::from_str::<Money>(&json).expect("parses"), money);
        }

        /// Line totals and sums are checked: within the bound they are exact, beyond it `None`.
        #[test]
        fn arithmetic_is_checked(a in any::<i64>(), b in any::<i64>(), quantity in any::<i64>()) {
            let exact = i128::from(a) * i128::from(quantity);
            match Money::from_cents(a).times(quantity) {
                Some(m) => prop_assert_eq!(i128::from(m.cents()), exact),
                None => prop_assert!(exact.abs() > i128::from(MAX_CENTS)),
            }
            let exact = i128::from(a) + i128::from(b);
            match Money::from_cents(a).plus(Money::from_cents(b)) {
                Some(m) => prop_assert_eq!(i128::from(m.cents()), exact),
                None => prop_assert!(exact.abs() > i128::from(MAX_CENTS)),
            }
        }
    }
}
