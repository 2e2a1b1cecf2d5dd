//! The one error type of the protocol crate: why an element is not a valid Spine payload.
//!
//! Every variant names the element and, where it applies, the attribute or child, and says what
//! was expected and what arrived, so that the stanza error sent back to a peer (see
//! [`ParseError::to_spine_error`]) tells its author exactly what to fix.

use crate::condition::{Condition, SpineError};

/// Why an XML element could not be read as a Spine payload.
///
/// Field names are the message's words: `element` and `attribute`/`child` locate the fault.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The element has another name or namespace than the payload being parsed.
    #[error("expected <{expected} xmlns='{namespace}'>, found <{found_name} xmlns='{found_ns}'>")]
    WrongElement {
        expected: &'static str,
        namespace: &'static str,
        found_name: String,
        found_ns: String,
    },
    /// The element is in a Spine namespace of another major version.
    #[error("unsupported protocol version: namespace '{namespace}' (this implementation speaks {supported})")]
    UnsupportedVersion {
        namespace: String,
        supported: &'static str,
    },
    /// A required attribute is absent.
    #[error("<{element}> is missing the required attribute '{attribute}'")]
    MissingAttribute {
        element: &'static str,
        attribute: &'static str,
    },
    /// An attribute that this version of the protocol does not define.
    #[error("<{element}> has an unknown attribute '{attribute}'")]
    UnknownAttribute {
        element: &'static str,
        attribute: String,
    },
    /// An attribute whose value does not fit its grammar or range.
    #[error("<{element}> attribute '{attribute}'='{value}' is invalid: {reason}")]
    InvalidAttribute {
        element: &'static str,
        attribute: &'static str,
        value: String,
        reason: String,
    },
    /// A child element that this payload does not define.
    #[error("<{element}> has an unexpected child <{child} xmlns='{namespace}'>")]
    UnknownChild {
        element: &'static str,
        child: String,
        namespace: String,
    },
    /// A child element that may appear once appears again.
    #[error("<{element}> has more than one <{child}>")]
    DuplicateChild {
        element: &'static str,
        child: &'static str,
    },
    /// A required child element is absent.
    #[error("<{element}> needs at least one <{child}>")]
    MissingChild {
        element: &'static str,
        child: &'static str,
    },
    /// Character data where the element must be empty.
    #[error("<{element}> must not contain text")]
    UnexpectedText { element: &'static str },
    /// `<args>` or `<meta>` does not hold a JSON object.
    #[error("<{element}> must hold a JSON object: {reason}")]
    InvalidJson {
        element: &'static str,
        reason: String,
    },
    /// Binary content that is not valid base64.
    #[error("<{element}> holds invalid base64: {reason}")]
    InvalidBase64 {
        element: &'static str,
        reason: String,
    },
    /// Inline data larger than the protocol allows.
    #[error("<{element}> carries {actual} bytes inline, more than the limit of {limit}")]
    TooLarge {
        element: &'static str,
        limit: u64,
        actual: u64,
    },
    /// Any other rule of the payload broken (duplicates, inconsistent attributes).
    #[error("<{element}> is invalid: {reason}")]
    Invalid {
        element: &'static str,
        reason: String,
    },
}

impl ParseError {
    /// The error a peer should send back when a request carried this malformed payload.
    ///
    /// Bad JSON arguments become `bad-arguments` (type modify), oversized inline data
    /// `too-large`, a foreign protocol version `unsupported-version`; everything else is
    /// `malformed`. The text is this error's message.
    pub fn to_spine_error(&self) -> SpineError {
        let text = Some(self.to_string());
        match self {
            // The wire attribute lists major versions (PROTOCOL.md §2.2): "1", not the
            // namespace.
            ParseError::UnsupportedVersion { supported, .. } => SpineError {
                supported: Some(
                    supported
                        .strip_prefix(crate::NS_PREFIX)
                        .unwrap_or(supported)
                        .to_owned(),
                ),
                text,
                ..SpineError::new(Condition::UnsupportedVersion)
            },
            ParseError::TooLarge { limit, .. } => SpineError {
                max: Some(*limit),
                text,
                ..SpineError::new(Condition::TooLarge)
            },
            ParseError::InvalidJson { element, .. } if *element == "args" => SpineError {
                field: Some("args".to_owned()),
                text,
                ..SpineError::new(Condition::BadArguments)
            },
            // A submitter's request (PROTOCOL.md §11.1, §12): a bad or missing attribute is a
            // bad argument, named, not a malformed payload.
            ParseError::InvalidAttribute {
                element, attribute, ..
            }
            | ParseError::MissingAttribute { element, attribute }
                if matches!(*element, "submit" | "discover") =>
            {
                SpineError {
                    field: Some((*attribute).to_owned()),
                    text,
                    ..SpineError::new(Condition::BadArguments)
                }
            }
            _ => SpineError {
                text,
                ..SpineError::new(Condition::Malformed)
            },
        }
    }
}
