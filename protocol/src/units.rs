//! Durations and sizes as configuration files write them: `"24h"`, `"250ms"`, `"64MiB"`.
//!
//! Every configuration of the bus (dispatcher, server, agent) reads its durations and sizes
//! through these serde helpers and writes them back the same way, so that
//! `spine <cmd> --print-config` shows the forms the documentation and the embedded defaults
//! use, and what it prints parses back to the same values. Reading is unchanged from before:
//! durations as `humantime` reads them (`"30s"`, `"1h 30m"`, `"1day"`), sizes as `bytesize`
//! does (`"64MiB"`, `"64 MiB"`, `"1.5GB"`, a plain number of bytes). Writing uses one unit,
//! the largest that states the value exactly: `"24h"` rather than `"1day"`, `"90s"` rather
//! than `"1m 30s"`, `"64MiB"` rather than `"64.0 MiB"`, `"1000B"` rather than a rounded
//! `"1000 B"` or `"1.0 KB"`. No I/O.

use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{de, Deserialize, Deserializer, Serializer};

/// Duration units from the largest, in nanoseconds. Hours are the largest: days are not
/// always 24 hours to a reader, and the documentation writes `"24h"`.
const DURATION_UNITS: [(u128, &str); 6] = [
    (3_600_000_000_000, "h"),
    (60_000_000_000, "m"),
    (1_000_000_000, "s"),
    (1_000_000, "ms"),
    (1_000, "us"),
    (1, "ns"),
];

/// Binary size units from the largest, in bytes.
const SIZE_UNITS: [(u128, &str); 7] = [
    (1 << 60, "EiB"),
    (1 << 50, "PiB"),
    (1 << 40, "TiB"),
    (1 << 30, "GiB"),
    (1 << 20, "MiB"),
    (1 << 10, "KiB"),
    (1, "B"),
];

/// `d` in the largest unit that states it exactly: `"24h"`, `"2m"`, `"90s"`, `"250ms"`;
/// `"0s"` for zero.
pub fn format_duration(d: Duration) -> String {
    largest_exact(d.as_nanos(), &DURATION_UNITS, "0s")
}

/// `bytes` in the largest binary unit that states it exactly: `"64MiB"`, `"1KiB"`, `"1000B"`.
pub fn format_size(bytes: u64) -> String {
    largest_exact(u128::from(bytes), &SIZE_UNITS, "0B")
}

/// `n` (in the last and smallest of `units`, whose factor is 1) in the first of `units` that
/// divides it; `zero` for 0.
fn largest_exact(n: u128, units: &[(u128, &str)], zero: &str) -> String {
    if n == 0 {
        return zero.to_owned();
    }
    let (factor, unit) = units
        .iter()
        .find(|(f, _)| n % f == 0)
        .copied()
        .unwrap_or((1, ""));
    format!("{}{unit}", n / factor)
}

/// Reads a duration with its unit; a bare number is refused (its unit would be a guess).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}': {e} (a duration with units, such as \"30s\" or \"24h\")"))
}

/// The `key = "<number><unit>"` settings of a commented default configuration (`documented`)
/// that a printed configuration (`printed`, as `--print-config` writes it) does not show in
/// the same form: what a test of each configuration checks is empty, so that the printed
/// forms and the documented ones cannot drift apart. Commented-out lines are not looked at.
pub fn forms_not_printed<'a>(documented: &'a str, printed: &str) -> Vec<&'a str> {
    documented
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(" = \"")?;
            let key_ok =
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let value = &value[..value.find('"')?];
            (key_ok && value.starts_with(|c: char| c.is_ascii_digit()))
                .then(|| &line[..key.len() + 4 + value.len() + 1])
        })
        .filter(|setting| !printed.lines().any(|l| l.trim() == *setting))
        .collect()
}

/// A `Duration` field: `#[serde(with = "spine_protocol::units::duration")]`.
pub mod duration {
    use super::*;

    /// Writes the duration as [`format_duration`] does.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Reads a duration with its unit (`"30s"`, `"1h 30m"`); a number without one is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with units, such as \"30s\" or \"24h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim())
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// A `ByteSize` field: `#[serde(with = "spine_protocol::units::size")]`.
pub mod size {
    use super::*;

    /// Writes the size as [`format_size`] does.
    pub fn serialize<S: Serializer>(b: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(b.as_u64()))
    }

    /// Reads a size as `bytesize` does: `"64MiB"`, `"64 MiB"`, `"1.5GB"`, or a number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        ByteSize::deserialize(d)
    }

    /// An `Option<ByteSize>` field (with `skip_serializing_if = "Option::is_none"`).
    pub mod option {
        use super::*;

        /// Writes a present size as [`format_size`] does.
        pub fn serialize<S: Serializer>(b: &Option<ByteSize>, s: S) -> Result<S::Ok, S::Error> {
            match b {
                Some(b) => s.serialize_some(&format_size(b.as_u64())),
                None => s.serialize_none(),
            }
        }

        /// Reads a size as [`size::deserialize`](super::deserialize) does.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
            Option::<ByteSize>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        #[serde(with = "duration")]
        d: Duration,
        #[serde(with = "size")]
        b: ByteSize,
        #[serde(
            default,
            with = "size::option",
            skip_serializing_if = "Option::is_none"
        )]
        o: Option<ByteSize>,
    }

    #[test]
    fn the_largest_exact_unit_is_written() {
        let s = Duration::from_secs;
        for (d, want) in [
            (s(86_400), "24h"),
            (s(7 * 86_400), "168h"),
            (s(120), "2m"),
            (s(90), "90s"),
            (s(30), "30s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(7), "7us"),
            (Duration::from_nanos(1_000_000_001), "1000000001ns"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
        for (b, want) in [
            (64 << 20, "64MiB"),
            (1024, "1KiB"),
            (1000, "1000B"),
            (1536, "1536B"),
            (3 << 30, "3GiB"),
            (0, "0B"),
            (u64::MAX, "18446744073709551615B"),
        ] {
            assert_eq!(format_size(b), want, "{b}");
        }
    }

    #[test]
    fn a_document_reads_the_usual_forms_and_writes_the_documented_ones() {
        let doc: Doc = toml::from_str("d = \"1day\"\nb = \"64.0 MiB\"\no = 1000\n").unwrap();
        assert_eq!(
            doc,
            Doc {
                d: Duration::from_secs(86_400),
                b: ByteSize::mib(64),
                o: Some(ByteSize::b(1000)),
            }
        );
        assert_eq!(
            toml::to_string(&doc).unwrap(),
            "d = \"24h\"\nb = \"64MiB\"\no = \"1000B\"\n"
        );
        let none: Doc = toml::from_str("d = \"1h 30m\"\nb = \"1KiB\"\n").unwrap();
        assert_eq!(none.d, Duration::from_secs(5400));
        assert_eq!(
            toml::to_string(&none).unwrap(),
            "d = \"90m\"\nb = \"1KiB\"\n"
        );
    }

    #[test]
    fn a_duration_without_units_is_refused() {
        for bad in ["d = 30\nb = 1", "d = \"30\"\nb = 1", "d = \"soon\"\nb = 1"] {
            let e = toml::from_str::<Doc>(bad).unwrap_err().to_string();
            assert!(e.contains("a duration with units"), "{bad}: {e}");
        }
        assert!(parse_duration("30").is_err());
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn documented_forms_are_found_in_the_printed_text_or_listed() {
        let documented = "# retention = \"1day\"\nretention = \"24h\"   # a day\nmax = \"64MiB\"\nname = \"x\"\nn = 3\n";
        assert!(forms_not_printed(
            documented,
            "name = \"y\"\nretention = \"24h\"\nmax = \"64MiB\"\n"
        )
        .is_empty());
        assert_eq!(
            forms_not_printed(documented, "retention = \"1day\"\nmax = \"64.0 MiB\"\n"),
            ["retention = \"24h\"", "max = \"64MiB\""]
        );
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_the_same(
            secs in 0u64..100 * 365 * 86_400,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
            bytes in any::<u64>(),
            shift in 0u32..64,
        ) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            for b in [bytes, bytes >> shift << shift] {
                let back: ByteSize = format_size(b).parse().unwrap();
                prop_assert_eq!(back.as_u64(), b);
            }
        }
    }
}
