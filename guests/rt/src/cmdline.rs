//! The guest command line: whitespace-separated `key=value` pairs and bare flags, e.g.
//! `ip=10.0.2.15/24 gw=10.0.2.1 port=6379 verbose`. A later occurrence of a key wins.

use core::str::FromStr;

/// A parsed view of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    /// Wraps a command line.
    pub const fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// The whole command line.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// The `(key, value)` pairs in order; a bare flag has the value `""`.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.text
            .split_ascii_whitespace()
            .map(|word| word.split_once('=').unwrap_or((word, "")))
    }

    /// The value of the last occurrence of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// Whether `key` is present as a flag, or with a value other than `0`, `false`, `no`, `off`.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| !matches!(v, "0" | "false" | "no" | "off"))
    }

    /// The value of `key` parsed as `T`, `Ok(None)` when the key is absent.
    ///
    /// # Errors
    /// The key is present but its value does not parse; the error carries the key and value.
    pub fn parse<T: FromStr>(&self, key: &'a str) -> Result<Option<T>, BadValue<'a>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| BadValue { key, value: v }),
        }
    }

    /// The value of `key` parsed as `T`, or `default` when absent.
    ///
    /// # Errors
    /// As [`Cmdline::parse`].
    pub fn parse_or<T: FromStr>(&self, key: &'a str, default: T) -> Result<T, BadValue<'a>> {
        Ok(self.parse(key)?.unwrap_or(default))
    }
}

/// A command-line value that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadValue<'a> {
    /// The key.
    pub key: &'a str,
    /// The value that did not parse.
    pub value: &'a str,
}

impl core::fmt::Display for BadValue<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "bad value {:?} for {}=", self.value, self.key)
    }
}

/// Parses a size with an optional binary suffix: `4096`, `64k`, `16M`, `1G`.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_flags() {
        let c = Cmdline::new("  ip=10.0.2.15/24 gw=10.0.2.1\tport=6379 verbose port=7000 x=0 ");
        assert_eq!(c.get("ip"), Some("10.0.2.15/24"));
        assert_eq!(c.get("port"), Some("7000"), "the last occurrence wins");
        assert_eq!(c.get("verbose"), Some(""));
        assert_eq!(c.get("missing"), None);
        assert!(c.flag("verbose"));
        assert!(!c.flag("x"));
        assert!(!c.flag("missing"));
        assert_eq!(c.parse::<u16>("port"), Ok(Some(7000)));
        assert_eq!(c.parse::<u16>("nope"), Ok(None));
        assert_eq!(c.parse_or::<u32>("nope", 5), Ok(5));
        assert_eq!(
            c.parse::<u16>("gw"),
            Err(BadValue {
                key: "gw",
                value: "10.0.2.1"
            })
        );
        assert_eq!(c.pairs().count(), 6);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("12x"), None);
    }
}
