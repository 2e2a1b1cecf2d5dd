//! Validated names used on the wire: capability names, job and blob ids, attribute names.
//!
//! Each is a newtype over `String` that can only hold a value of its grammar (PROTOCOL.md,
//! "Common syntax"), so code past the parser never re-checks them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest capability name, in bytes.
pub const MAX_CAPABILITY_LEN: usize = 128;
/// Most dot-separated segments in a capability name.
pub const MAX_CAPABILITY_SEGMENTS: usize = 16;
/// Longest job or blob id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest agent attribute name, in bytes.
pub const MAX_ATTR_NAME_LEN: usize = 64;
/// Longest agent attribute value, in bytes.
pub const MAX_ATTR_VALUE_LEN: usize = 1024;

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $check(s)?;
                Ok($t(s.to_owned()))
            }
        }

        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $check(&s)?;
                Ok($t(s))
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        crate::xml::attr_via_str!($t);
    };
}

name_type!(
    /// A capability name: dot-separated segments of `[a-z0-9][a-z0-9_-]*`, e.g.
    /// `image.thumbnail` or `legacy.invoice-pdf`.
    CapabilityName,
    check_capability
);
name_type!(
    /// A job id: 1 to 128 characters of `[A-Za-z0-9._:-]`. Globally unique; the dedup key.
    JobId,
    check_id
);
name_type!(
    /// A blob id (large payload): same grammar as a job id.
    BlobId,
    check_id
);
name_type!(
    /// The name of an agent attribute (`gpu`, `zone`, `cost`): `[A-Za-z_][A-Za-z0-9_.-]*`.
    AttrName,
    check_attr_name
);

fn check_capability(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("capability name is empty".to_owned());
    }
    if s.len() > MAX_CAPABILITY_LEN {
        return Err(format!(
            "capability name is longer than {MAX_CAPABILITY_LEN} bytes"
        ));
    }
    let mut segments = 0;
    for seg in s.split('.') {
        segments += 1;
        let mut bytes = seg.bytes();
        match bytes.next() {
            None => return Err("capability name has an empty segment".to_owned()),
            Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
            Some(_) => {
                return Err(format!(
                    "segment '{seg}' must start with a lower-case letter or a digit"
                ))
            }
        }
        if !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
            return Err(format!(
                "segment '{seg}' may hold only a-z, 0-9, '_' and '-'"
            ));
        }
    }
    if segments > MAX_CAPABILITY_SEGMENTS {
        return Err(format!(
            "capability name has more than {MAX_CAPABILITY_SEGMENTS} segments"
        ));
    }
    Ok(())
}

fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(format!("id must be 1 to {MAX_ID_LEN} characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err("id may hold only A-Z, a-z, 0-9, '.', '_', ':' and '-'".to_owned());
    }
    Ok(())
}

fn check_attr_name(s: &str) -> Result<(), String> {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return Err("attribute name must start with a letter or '_'".to_owned()),
    }
    if s.len() > MAX_ATTR_NAME_LEN {
        return Err(format!(
            "attribute name is longer than {MAX_ATTR_NAME_LEN} bytes"
        ));
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("attribute name may hold only letters, digits, '_', '.' and '-'".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capability_names() {
        for ok in [
            "image.thumbnail",
            "wordcount.map",
            "legacy.invoice-pdf",
            "a",
            "x1.y_2",
            "0",
        ] {
            assert_eq!(
                ok.parse::<CapabilityName>().map(|c| c.to_string()),
                Ok(ok.to_owned())
            );
        }
        for bad in [
            "",
            "Image.thumb",
            ".a",
            "a.",
            "a..b",
            "-a",
            "a b",
            "a/b",
            "é",
        ] {
            assert!(bad.parse::<CapabilityName>().is_err(), "{bad:?} accepted");
        }
        assert!("a."
            .repeat(16)
            .trim_end_matches('.')
            .parse::<CapabilityName>()
            .is_ok());
        assert!("a."
            .repeat(17)
            .trim_end_matches('.')
            .parse::<CapabilityName>()
            .is_err());
        assert!("a".repeat(129).parse::<CapabilityName>().is_err());
    }

    #[test]
    fn ids_and_attr_names() {
        assert!("0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44"
            .parse::<JobId>()
            .is_ok());
        assert!("job:1.in".parse::<BlobId>().is_ok());
        for bad in ["", "a b", "a/b", "a\n", &"x".repeat(129)] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?} accepted");
        }
        assert!("gpu".parse::<AttrName>().is_ok());
        assert!("_x.y-z9".parse::<AttrName>().is_ok());
        for bad in ["", "9x", "-x", "a b", "a=b"] {
            assert!(bad.parse::<AttrName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_validates() {
        let c: CapabilityName = serde_json::from_str("\"image.resize\"").unwrap();
        assert_eq!(c.as_str(), "image.resize");
        assert!(serde_json::from_str::<CapabilityName>("\"Bad Name\"").is_err());
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"image.resize\"");
    }

    proptest! {
        #[test]
        fn capability_grammar_roundtrip(s in "[a-z0-9][a-z0-9_-]{0,10}(\\.[a-z0-9][a-z0-9_-]{0,10}){0,5}") {
            let c: CapabilityName = s.parse().unwrap();
            prop_assert_eq!(c.as_str(), s.as_str());
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,200}") {
            let _ = s.parse::<CapabilityName>();
            let _ = s.parse::<JobId>();
            let _ = s.parse::<AttrName>();
        }
    }
}
