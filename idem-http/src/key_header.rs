//! Parsing the `Idempotency-Key` header value.
//!
//! The IETF draft makes the header an RFC 8941 structured-field *Item* whose value is a
//! *String*: `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`. Two modes
//! ([`KeyFormat`]):
//!
//! - **Lenient** (the default): the sf-string, and also a bare value made only of token
//!   characters (RFC 9110 `tchar`, plus `:` and `/` as in an sf-token), which means the same
//!   key: `Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`. Many clients send the value
//!   unquoted.
//! - **Strict**: only an sf-string. A Token, an Integer (`12345`), a Decimal, a Byte Sequence
//!   (`:YWJj:`) or a Boolean (`?1`) is refused with a message naming what was sent.
//!
//! Refused in both (HTTP 400): an empty value, a quoted string that is not closed or has an
//! escape other than `\"` and `\\`, characters outside printable ASCII, a list (`"a", "b"`),
//! parameters (`"a";v=1`), the header sent more than once, and a key longer than the configured
//! limit (default [`DEFAULT_MAX_KEY_LEN`] characters).

use ::http::header::GetAll;
use ::http::HeaderValue;

/// The default limit on a key's length, in characters (after unquoting).
pub const DEFAULT_MAX_KEY_LEN: usize = 255;

/// Which forms of the header value are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFormat {
    /// An RFC 8941 String, or a bare value of token characters (the same key). The default.
    #[default]
    Lenient,
    /// An RFC 8941 String only, as the draft specifies.
    Strict,
}

/// Why a header value is not a usable idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is absent.
    #[error("the Idempotency-Key header is missing")]
    Missing,
    /// The header appears more than once.
    #[error("the Idempotency-Key header appears more than once; send one key")]
    Repeated,
    /// The value is empty (`""` or nothing).
    #[error("the Idempotency-Key value is empty")]
    Empty,
    /// The value is longer than the limit.
    #[error("the Idempotency-Key value is {len} characters long, over the limit of {limit}")]
    TooLong {
        /// The key's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The value is a list of items (`"a", "b"`).
    #[error("the Idempotency-Key value is a list; a list is not allowed; send one key")]
    List,
    /// The item has parameters (`"a";v=1`).
    #[error("the Idempotency-Key value has parameters (`;`), which are not supported; send the key alone")]
    Parameters,
    /// Strict mode: the item is a structured field of another type than String.
    #[error("the Idempotency-Key value is an RFC 8941 {0}, not a String; send the key quoted, e.g. \"8e03978e-40d5-43e8-bc93-6894a57f9324\"")]
    NotAString(&'static str),
    /// The value is neither an sf-string nor a bare token.
    #[error("the Idempotency-Key value is malformed: {0}")]
    Malformed(&'static str),
    /// The layer's key validator refused the key.
    #[error("the Idempotency-Key value is not accepted: {0}")]
    Invalid(String),
}

/// Parses the `Idempotency-Key` header(s) of a request into the key, in the lenient mode.
///
/// ```
/// use http::HeaderMap;
/// use idem_http::{parse_key, KeyError};
///
/// let mut h = HeaderMap::new();
/// assert_eq!(parse_key(h.get_all("idempotency-key"), 255), Err(KeyError::Missing));
/// h.insert("idempotency-key", r#""a \"quoted\" key""#.parse().unwrap());
/// assert_eq!(parse_key(h.get_all("idempotency-key"), 255).unwrap(), r#"a "quoted" key"#);
/// h.insert("idempotency-key", "8e03978e-40d5".parse().unwrap());
/// assert_eq!(parse_key(h.get_all("idempotency-key"), 255).unwrap(), "8e03978e-40d5");
/// h.insert("idempotency-key", r#""unclosed"#.parse().unwrap());
/// assert!(matches!(parse_key(h.get_all("idempotency-key"), 255), Err(KeyError::Malformed(_))));
/// ```
pub fn parse_key(values: GetAll<'_, HeaderValue>, max_len: usize) -> Result<String, KeyError> {
    parse_key_with(values, KeyFormat::Lenient, max_len)
}

/// Parses the `Idempotency-Key` header(s) of a request in the given mode.
pub fn parse_key_with(
    values: GetAll<'_, HeaderValue>,
    format: KeyFormat,
    max_len: usize,
) -> Result<String, KeyError> {
    let mut it = values.iter();
    let value = it.next().ok_or(KeyError::Missing)?;
    if it.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_value(value.as_bytes(), format, max_len)
}

/// Parses one header value in the lenient mode (see the module docs for what is accepted).
///
/// ```
/// use idem_http::{parse_key_value, KeyError};
/// assert_eq!(parse_key_value(b" \"k-1\" ", 255).unwrap(), "k-1");
/// assert_eq!(parse_key_value(b"k-1", 255).unwrap(), "k-1");
/// assert_eq!(parse_key_value(b"\"\"", 255), Err(KeyError::Empty));
/// assert_eq!(parse_key_value(b"\"k\";p=1", 255), Err(KeyError::Parameters));
/// assert_eq!(parse_key_value(b"\"a\", \"b\"", 255), Err(KeyError::List));
/// assert!(matches!(parse_key_value(b"abcd", 3), Err(KeyError::TooLong { len: 4, limit: 3 })));
/// ```
pub fn parse_key_value(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    parse_value(raw, KeyFormat::Lenient, max_len)
}

/// Parses one header value in the given mode.
///
/// ```
/// use idem_http::{parse_key_value_with, KeyError, KeyFormat::Strict};
/// assert_eq!(parse_key_value_with(b"\"k-1\"", Strict, 255).unwrap(), "k-1");
/// assert_eq!(parse_key_value_with(b"12345", Strict, 255), Err(KeyError::NotAString("Integer")));
/// assert_eq!(parse_key_value_with(b":YWJj:", Strict, 255), Err(KeyError::NotAString("Byte Sequence")));
/// assert_eq!(parse_key_value_with(b"k-1", Strict, 255), Err(KeyError::NotAString("Token")));
/// ```
pub fn parse_key_value_with(
    raw: &[u8],
    format: KeyFormat,
    max_len: usize,
) -> Result<String, KeyError> {
    parse_value(raw, format, max_len)
}

/// A key validator accepting UUIDs only (`8-4-4-4-12` hex digits, any case), for
/// [`validate_key`](super::IdempotencyLayer::validate_key).
///
/// ```
/// use idem_http::uuid_key;
/// assert!(uuid_key("8e03978e-40d5-43e8-bc93-6894a57f9324").is_ok());
/// assert!(uuid_key("order-42").is_err());
/// ```
pub fn uuid_key(key: &str) -> Result<(), String> {
    let b = key.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err("the key must be a UUID, e.g. 8e03978e-40d5-43e8-bc93-6894a57f9324".to_string())
    }
}

fn parse_value(raw: &[u8], format: KeyFormat, max_len: usize) -> Result<String, KeyError> {
    // RFC 8941 §4.2: leading and trailing spaces are discarded.
    let raw = trim_sp(raw);
    let key = match raw.first() {
        None => return Err(KeyError::Empty),
        Some(b'"') => parse_sf_string(raw)?,
        Some(_) => parse_bare(raw, format)?,
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    // Every accepted byte is ASCII, so bytes are characters.
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            limit: max_len,
        });
    }
    Ok(key)
}

fn trim_sp(mut raw: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = raw {
        raw = rest;
    }
    while let [rest @ .., b' '] = raw {
        raw = rest;
    }
    raw
}

/// What may follow an item: nothing, a list (`,`) or parameters (`;`).
fn after_item(rest: &[u8]) -> Result<(), KeyError> {
    let rest = rest
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .map_or(&[][..], |i| &rest[i..]);
    match rest.first() {
        None => Ok(()),
        Some(b',') => Err(KeyError::List),
        Some(b';') => Err(KeyError::Parameters),
        Some(_) => Err(KeyError::Malformed("nothing may follow the quoted key")),
    }
}

/// RFC 8941 §4.2.5: `DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`, nothing after.
fn parse_sf_string(raw: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 1;
    loop {
        let Some(&c) = raw.get(i) else {
            return Err(KeyError::Malformed("the quoted string is not closed"));
        };
        i += 1;
        match c {
            b'"' => break,
            b'\\' => match raw.get(i) {
                Some(&e @ (b'"' | b'\\')) => {
                    out.push(char::from(e));
                    i += 1;
                }
                _ => {
                    return Err(KeyError::Malformed(
                        "only \\\" and \\\\ may be escaped in a quoted key",
                    ))
                }
            },
            0x20..=0x7e => out.push(char::from(c)),
            _ => {
                return Err(KeyError::Malformed(
                    "a key may hold printable ASCII characters only",
                ))
            }
        }
    }
    after_item(&raw[i..])?;
    Ok(out)
}

/// A bare (unquoted) item. Lenient: RFC 9110 token characters, plus `:` and `/` as an
/// sf-token allows, taken as the key. Strict: refused, naming the structured-field type sent.
fn parse_bare(raw: &[u8], format: KeyFormat) -> Result<String, KeyError> {
    if let Some(i) = raw.iter().position(|&c| c == b',' || c == b';') {
        // The item ends there; the comma or semicolon says what follows.
        after_item(&raw[i..])?;
    }
    if format == KeyFormat::Strict {
        return Err(KeyError::NotAString(bare_type(raw)));
    }
    if raw.iter().all(|&c| is_tchar(c) || c == b':' || c == b'/') {
        Ok(raw.iter().map(|&c| char::from(c)).collect())
    } else {
        Err(KeyError::Malformed(
            "an unquoted key may hold letters, digits and !#$%&'*+-.^_`|~:/ only; quote it as a structured-field string",
        ))
    }
}

/// The RFC 8941 bare item type `raw` would be (§4.2.3).
fn bare_type(raw: &[u8]) -> &'static str {
    match raw {
        [b'-' | b'0'..=b'9', ..] if raw.contains(&b'.') => "Decimal",
        [b'-' | b'0'..=b'9', ..] => "Integer",
        [b':', ..] => "Byte Sequence",
        [b'?', ..] => "Boolean",
        [b'@', ..] => "Date",
        [b'%', ..] => "Display String",
        _ => "Token",
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[u8]) -> Result<String, KeyError> {
        parse_key_value(v, 16)
    }

    #[test]
    fn quoted_and_bare_forms() {
        assert_eq!(p(b"\"abc\"").as_deref(), Ok("abc"));
        assert_eq!(p(b"  \"a b\"  ").as_deref(), Ok("a b"));
        assert_eq!(p(b"\"a\\\\b\"").as_deref(), Ok("a\\b"));
        assert_eq!(p(b"\"a\\\"b\"").as_deref(), Ok("a\"b"));
        assert_eq!(p(b"urn:x/y").as_deref(), Ok("urn:x/y"));
        assert_eq!(p(b"550e8400-e29b").as_deref(), Ok("550e8400-e29b"));
    }

    #[test]
    fn refusals() {
        assert_eq!(p(b""), Err(KeyError::Empty));
        assert_eq!(p(b"   "), Err(KeyError::Empty));
        assert_eq!(p(b"\"\""), Err(KeyError::Empty));
        assert!(matches!(p(b"\"abc"), Err(KeyError::Malformed(_))));
        assert!(matches!(p(b"\"a\\nb\""), Err(KeyError::Malformed(_))));
        assert!(matches!(p(b"\"a\\"), Err(KeyError::Malformed(_))));
        assert!(matches!(p(b"\"ab\"c"), Err(KeyError::Malformed(_))));
        assert_eq!(p(b"\"ab\";x"), Err(KeyError::Parameters));
        assert_eq!(p(b"\"a\", \"b\""), Err(KeyError::List));
        assert_eq!(p(b"a, b"), Err(KeyError::List));
        assert_eq!(p(b"a;q=1"), Err(KeyError::Parameters));
        assert!(matches!(p(b"a b"), Err(KeyError::Malformed(_))));
        assert!(matches!(p(b"a\"b"), Err(KeyError::Malformed(_))));
        assert!(matches!(p(b"\"\t\""), Err(KeyError::Malformed(_))));
        assert!(matches!(p("\"é\"".as_bytes()), Err(KeyError::Malformed(_))));
        assert_eq!(
            p(b"\"0123456789abcdefg\""),
            Err(KeyError::TooLong { len: 17, limit: 16 })
        );
        assert_eq!(p(b"\"0123456789abcdef\"").map(|k| k.len()), Ok(16));
    }

    #[test]
    fn strict_mode_names_the_type_sent() {
        let s = |v: &[u8]| parse_key_value_with(v, KeyFormat::Strict, 16);
        assert_eq!(s(b"\"abc\"").as_deref(), Ok("abc"));
        assert_eq!(s(b"12345"), Err(KeyError::NotAString("Integer")));
        assert_eq!(s(b"-1.5"), Err(KeyError::NotAString("Decimal")));
        assert_eq!(s(b":YWJj:"), Err(KeyError::NotAString("Byte Sequence")));
        assert_eq!(s(b"?1"), Err(KeyError::NotAString("Boolean")));
        assert_eq!(s(b"abc"), Err(KeyError::NotAString("Token")));
        assert_eq!(s(b"\"a\", \"b\""), Err(KeyError::List));
        // Lenient mode keeps taking bare values as keys.
        assert_eq!(p(b"12345").as_deref(), Ok("12345"));
    }

    #[test]
    fn repeated_header() {
        let mut h = ::http::HeaderMap::new();
        h.append("idempotency-key", HeaderValue::from_static("\"a\""));
        h.append("idempotency-key", HeaderValue::from_static("\"a\""));
        assert_eq!(
            parse_key(h.get_all("idempotency-key"), 16),
            Err(KeyError::Repeated)
        );
    }
}
