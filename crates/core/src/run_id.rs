use std::{borrow::Borrow, fmt, sync::Arc};

/// A validated run ID: 1–128 characters of `[A-Za-z0-9_-]`.
///
/// Run IDs become NATS subject tokens (`runcast.runs.<run>.<kind>`), so `.`,
/// `*`, `>` and whitespace must never get through. The ID is reference-counted
/// because the gateway keys maps and frames by it on the hot path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Arc<str>);

/// Why a string is not a run ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseRunIdError {
    #[error("run ID is empty")]
    Empty,
    #[error("run ID is {0} characters long; the limit is 128")]
    TooLong(usize),
    #[error("run ID contains {0:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed")]
    BadChar(char),
}

impl RunId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, ParseRunIdError> {
        Self::validate(s)?;
        Ok(Self(Arc::from(s)))
    }

    pub fn validate(s: &str) -> Result<(), ParseRunIdError> {
        if s.is_empty() {
            return Err(ParseRunIdError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ParseRunIdError::BadChar(c));
        }
        // All characters are ASCII here, so bytes == characters.
        if s.len() > Self::MAX_LEN {
            return Err(ParseRunIdError::TooLong(s.len()));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RunId {
    type Err = ParseRunIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Borrow<str> for RunId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RunId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in ["r1", "a", "A-b_c-9", &"x".repeat(128)] {
            assert!(RunId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        let long = "x".repeat(129);
        let cases: &[(&str, ParseRunIdError)] = &[
            ("", ParseRunIdError::Empty),
            ("a.b", ParseRunIdError::BadChar('.')),
            ("*", ParseRunIdError::BadChar('*')),
            (">", ParseRunIdError::BadChar('>')),
            ("a b", ParseRunIdError::BadChar(' ')),
            ("héllo", ParseRunIdError::BadChar('é')),
            (&long, ParseRunIdError::TooLong(129)),
        ];
        for (input, want) in cases {
            assert_eq!(RunId::parse(input).unwrap_err(), *want, "input {input:?}");
        }
    }
}
