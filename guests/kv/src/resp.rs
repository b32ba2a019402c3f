//! The Redis serialization protocol (RESP2): requests as arrays of bulk strings
//! (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline commands (`GET k\r\n`), and reply encoders.

use alloc::vec::Vec;

/// Most arguments in one request.
pub const MAX_ARGS: i64 = 1024;
/// Largest bulk string in a request.
pub const MAX_BULK: i64 = 1 << 20;
/// Longest inline request.
pub const MAX_INLINE: usize = 64 << 10;
/// Most bytes of requests buffered per connection (Redis's `client-query-buffer-limit`): a
/// request that does not fit in them is refused and its connection closed.
pub const MAX_QUERY: usize = 4 << 20;

/// The result of parsing the start of a connection's input.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A request (possibly with no arguments, e.g. an empty line) and the bytes it used.
    Request(Vec<&'a [u8]>, usize),
    /// More bytes are needed.
    Incomplete,
    /// The input is not RESP: reply with this error and close the connection.
    Error(&'static str),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Parses a decimal integer (optionally negative).
pub fn parse_int(text: &[u8]) -> Option<i64> {
    let (neg, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Parses one request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_multibulk(buf: &[u8]) -> Parsed<'_> {
    let Some(eol) = find_crlf(buf, 1) else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big mbulk count string")
        } else {
            Parsed::Incomplete
        };
    };
    let count = match parse_int(&buf[1..eol]) {
        Some(n) if n <= MAX_ARGS => n,
        _ => return Parsed::Error("Protocol error: invalid multibulk length"),
    };
    let mut pos = eol + 2;
    let mut args = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        match buf.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("Protocol error: expected '$'"),
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            return if buf.len() - pos > 32 {
                Parsed::Error("Protocol error: invalid bulk length")
            } else {
                Parsed::Incomplete
            };
        };
        let len = match parse_int(&buf[pos + 1..eol]) {
            Some(n) if (0..=MAX_BULK).contains(&n) => n as usize,
            _ => return Parsed::Error("Protocol error: invalid bulk length"),
        };
        let start = eol + 2;
        let end = start + len;
        if buf.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not terminated by CRLF");
        }
        args.push(&buf[start..end]);
        pos = end + 2;
    }
    Parsed::Request(args, pos)
}

fn parse_inline(buf: &[u8]) -> Parsed<'_> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let args = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
        .collect();
    Parsed::Request(args, nl + 1)
}

/// Appends `+<s>\r\n`.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `-<s>\r\n`.
pub fn error(out: &mut Vec<u8>, s: &str) {
    out.push(b'-');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn decimal(out: &mut Vec<u8>, v: i64) {
    let mut digits = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `:<v>\r\n`.
pub fn integer(out: &mut Vec<u8>, v: i64) {
    out.push(b':');
    decimal(out, v);
    out.extend_from_slice(b"\r\n");
}

/// Appends `$<len>\r\n<data>\r\n`.
pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    decimal(out, data.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the null bulk string `$-1\r\n`.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Appends an array header `*<n>\r\n`.
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    decimal(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

/// Formats an integer as decimal bytes.
pub fn int_bytes(v: i64) -> Vec<u8> {
    let mut out = Vec::new();
    decimal(&mut out, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(buf: &[u8]) -> (Vec<&[u8]>, usize) {
        match parse(buf) {
            Parsed::Request(args, used) => (args, used),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multibulk_requests() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let (args, used) = req(buf);
        assert_eq!(args, [&b"SET"[..], b"k", b"hello"]);
        let (args, rest) = req(&buf[used..]);
        assert_eq!(args, [&b"PING"[..]]);
        assert_eq!(used + rest, buf.len());
        let (args, used) = req(b"*2\r\n$0\r\n\r\n$3\r\na\nb\r\n");
        assert_eq!(args, [&b""[..], b"a\nb"], "binary-safe bulk strings");
        assert_eq!(used, 19);
        assert_eq!(req(b"*0\r\n"), (vec![], 4));
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let buf = b"*2\r\n$3\r\nGET\r\n$10\r\n0123456789\r\n";
        for n in 0..buf.len() {
            assert_eq!(parse(&buf[..n]), Parsed::Incomplete, "prefix of {n} bytes");
        }
        assert_eq!(req(buf).1, buf.len());
    }

    #[test]
    fn inline_requests() {
        let (args, used) = req(b"  set  k   v\r\nGET");
        assert_eq!(args, [&b"set"[..], b"k", b"v"]);
        assert_eq!(used, 14);
        assert_eq!(req(b"PING\n").0, [&b"PING"[..]]);
        assert_eq!(req(b"\r\n"), (vec![], 2));
        assert_eq!(parse(b"GET k"), Parsed::Incomplete);
    }

    #[test]
    fn protocol_errors() {
        assert!(matches!(parse(b"*x\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n:3\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n$-5\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n$99999999\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n$1\r\nab\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*99999\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(&[b'a'; MAX_INLINE + 1]), Parsed::Error(_)));
    }

    #[test]
    fn integers_and_replies() {
        assert_eq!(parse_int(b"-42"), Some(-42));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"9223372036854775808"), None);
        assert_eq!(parse_int(b"1a"), None);
        assert_eq!(parse_int(b"-"), None);
        let mut out = Vec::new();
        integer(&mut out, -7);
        bulk(&mut out, b"xy");
        null(&mut out);
        simple(&mut out, "OK");
        error(&mut out, "ERR no");
        array(&mut out, 2);
        assert_eq!(out, b":-7\r\n$2\r\nxy\r\n$-1\r\n+OK\r\n-ERR no\r\n*2\r\n");
        assert_eq!(int_bytes(i64::MIN), b"-9223372036854775808");
    }
}
