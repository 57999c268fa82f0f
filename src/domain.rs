//! Validated domain values. Each `parse` returns a type that cannot hold bad
//! data, or a description of what is wrong; [`Validator`] gathers those into
//! one `INVALID_ARGUMENT` naming every bad field at once.

use std::fmt;

use chrono::{DateTime, FixedOffset, Utc};
use url::Url;

use crate::error::{Error, FieldViolation};

/// Gathers the field violations of one request.
#[derive(Default)]
pub struct Validator {
    violations: Vec<FieldViolation>,
}

impl Validator {
    /// Records `field`'s violation, if any, and passes its value on.
    pub fn field<T>(&mut self, field: &'static str, parsed: Result<T, String>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(description) => {
                self.violations.push(FieldViolation { field, description });
                None
            }
        }
    }

    /// Fails with every recorded violation, or builds the validated value
    /// from the fields (which are then all present).
    pub fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Error> {
        if !self.violations.is_empty() {
            return Err(Error::InvalidArgument(self.violations));
        }
        build().ok_or_else(|| Error::Internal("validation lost a field".into()))
    }
}

fn check_text(
    value: &str,
    max_chars: usize,
    allowed: fn(char) -> bool,
    allowed_desc: &str,
) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    let len = value.chars().count();
    if len > max_chars {
        return Err(format!("must be at most {max_chars} characters, got {len}"));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(format!("must contain only {allowed_desc}, found {bad:?}"));
    }
    Ok(())
}

fn alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Our order id as Kongtie accepts it: 1 to 20 ASCII letters and digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutTradeId(String);

impl OutTradeId {
    pub fn parse(s: &str) -> Result<Self, String> {
        check_text(s, 20, alnum, "letters and digits")?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A WeChat openid: letters, digits, `_` and `-`, at most 64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenId(String);

impl OpenId {
    pub fn parse(s: &str) -> Result<Self, String> {
        check_text(s, 64, token_char, "letters, digits, '_' and '-'")?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A web OAuth `code`: letters, digits, `_` and `-`, at most 128.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OAuthCode(String);

impl OAuthCode {
    pub fn parse(s: &str) -> Result<Self, String> {
        check_text(s, 128, token_char, "letters, digits, '_' and '-'")?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OAuthCode {
    // A code is a short-lived credential: keep it out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OAuthCode(..)")
    }
}

/// The metrics label under which consumers past the labelled ones are
/// counted; no consumer may be named so, or its series would be mixed with
/// theirs.
pub const OVERFLOW_CONSUMER_LABEL: &str = "_other";

/// A durable consumer name: letters, digits, `.`, `_` and `-`, at most 64;
/// not `.` or `..` (a path segment's meaning in every URL and file name the
/// name may end up in) nor [`OVERFLOW_CONSUMER_LABEL`].
pub fn parse_consumer(s: &str) -> Result<String, String> {
    let name = parse_consumer_reference(s)?;
    if name == "." || name == ".." {
        return Err(format!("must not be {name:?}"));
    }
    if name == OVERFLOW_CONSUMER_LABEL {
        return Err(format!(
            "must not be {OVERFLOW_CONSUMER_LABEL:?}: the metrics count consumers past the \
             labelled ones under that name"
        ));
    }
    Ok(name)
}

/// A name that refers to a consumer which may exist already: the form of
/// [`parse_consumer`] without its reserved names, so that one created
/// before they were reserved can still be read and deleted.
pub fn parse_consumer_reference(s: &str) -> Result<String, String> {
    check_text(
        s,
        64,
        |c| token_char(c) || c == '.',
        "letters, digits, '.', '_' and '-'",
    )?;
    Ok(s.to_owned())
}

/// An optional field: empty means absent, anything else must parse.
pub fn optional<T>(
    s: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse(s).map(Some)
    }
}

/// The OAuth `state`: optional, letters and digits, at most 128.
pub fn parse_state(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    check_text(s, 128, alnum, "letters and digits")?;
    Ok(s.to_owned())
}

/// A token or ticket a caller says WeChat refused: optional, printable
/// ASCII without spaces, at most 512.
pub fn parse_stale(s: &str) -> Result<Option<String>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    check_text(
        s,
        512,
        |c| c.is_ascii_graphic(),
        "printable ASCII without spaces",
    )?;
    Ok(Some(s.to_owned()))
}

/// An absolute http(s) URL of at most `max` characters.
pub fn parse_http_url(s: &str, max: usize) -> Result<Url, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("must be at most {max} characters, got {}", s.len()));
    }
    let url = Url::parse(s).map_err(|e| format!("must be an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL, got scheme {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    Ok(url)
}

/// An amount of money in fen (1/100 yuan), positive and bounded. Never a
/// float: yuan text is produced and parsed digit by digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AmountFen(i64);

impl AmountFen {
    pub fn parse(fen: i64, max: i64) -> Result<Self, String> {
        if fen <= 0 {
            return Err(format!("must be a positive number of fen, got {fen}"));
        }
        if fen > max {
            return Err(format!("must be at most {max} fen, got {fen}"));
        }
        Ok(Self(fen))
    }

    /// Parses yuan text as Kongtie writes it (`"0.1"`, `"0.20"`, `"12"`):
    /// digits, optionally a point and one or two more digits.
    pub fn from_yuan_text(text: &str) -> Result<Self, String> {
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (text.contains('.') && !digits(frac)) || frac.len() > 2 {
            return Err(format!("{text:?} is not yuan with at most two decimals"));
        }
        if whole.len() > 15 {
            return Err(format!("{text:?} is too large"));
        }
        let whole: i64 = whole
            .parse()
            .map_err(|_| format!("{text:?} is not a number"))?;
        let frac: i64 = format!("{frac:0<2}")
            .parse()
            .map_err(|_| format!("{text:?} is not a number"))?;
        Ok(Self(whole * 100 + frac))
    }

    pub fn fen(self) -> i64 {
        self.0
    }

    /// Exact yuan text with two decimals: 10 fen is `"0.10"`.
    pub fn yuan_text(self) -> String {
        format!("{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// Beijing time: UTC+8 all year, which is what Kongtie's time fields mean.
pub fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// `yyyyMMddHHmmss` in Beijing time, Kongtie's `OrderTimeOut` format.
pub fn beijing_compact(at: DateTime<Utc>) -> String {
    at.with_timezone(&beijing())
        .format("%Y%m%d%H%M%S")
        .to_string()
}

/// Converts a protobuf timestamp, refusing ones out of range.
pub fn timestamp_to_utc(ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, String> {
    let nanos = u32::try_from(ts.nanos).map_err(|_| "nanos must not be negative".to_owned())?;
    DateTime::from_timestamp(ts.seconds, nanos).ok_or_else(|| "is out of range".to_owned())
}

/// Converts a protobuf duration, refusing negative ones and ones past `max`.
pub fn duration_from_proto(
    d: &prost_types::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration, String> {
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err("must not be negative".to_owned());
    };
    if nanos >= 1_000_000_000 {
        return Err("nanos must be less than one second".to_owned());
    }
    let d = std::time::Duration::new(seconds, nanos);
    if d > max {
        return Err(format!(
            "must be at most {}s, got {}s",
            max.as_secs_f64(),
            d.as_secs_f64()
        ));
    }
    Ok(d)
}

pub fn duration_to_proto(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn utc_to_timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A JSAPI order that passed validation.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub out_trade_id: OutTradeId,
    pub amount: AmountFen,
    pub openid: OpenId,
    pub expires_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_text_is_exact() {
        assert_eq!(AmountFen(1).yuan_text(), "0.01");
        assert_eq!(AmountFen(10).yuan_text(), "0.10");
        assert_eq!(AmountFen(12345).yuan_text(), "123.45");
        assert_eq!(AmountFen(100).yuan_text(), "1.00");
    }

    #[test]
    fn yuan_text_parses_what_kongtie_sends() {
        for (text, fen) in [
            ("0.1", 10),
            ("0.20", 20),
            ("12", 1200),
            ("0.01", 1),
            ("3.5", 350),
        ] {
            assert_eq!(
                AmountFen::from_yuan_text(text),
                Ok(AmountFen(fen)),
                "{text}"
            );
        }
        for bad in [
            "",
            ".5",
            "1.",
            "1.234",
            "-1",
            "1e3",
            "0x10",
            "1,00",
            " 1",
            "9999999999999999",
        ] {
            assert!(AmountFen::from_yuan_text(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn amounts_outside_the_range_are_refused() {
        assert!(AmountFen::parse(0, 100).is_err());
        assert!(AmountFen::parse(-5, 100).is_err());
        assert!(AmountFen::parse(101, 100).is_err());
        assert_eq!(AmountFen::parse(100, 100), Ok(AmountFen(100)));
    }

    #[test]
    fn order_timeout_is_beijing_time() {
        let at = DateTime::from_timestamp(1_522_229_622, 0).unwrap(); // 2018-03-28 09:33:42 UTC
        assert_eq!(beijing_compact(at), "20180328173342");
    }

    #[test]
    fn ids_are_checked_for_length_and_alphabet() {
        assert!(OutTradeId::parse("9534634332").is_ok());
        assert!(OutTradeId::parse("abcdefghij0123456789").is_ok());
        assert!(OutTradeId::parse("abcdefghij01234567890").is_err());
        assert!(OutTradeId::parse("order-1").is_err());
        assert!(OutTradeId::parse("").is_err());
        assert!(OpenId::parse("oeQDZtzvDoD-OmTmyJH6rGAX8odc").is_ok());
        assert!(OpenId::parse("oeQ DZ").is_err());
    }

    #[test]
    fn only_http_urls_with_a_host_pass() {
        assert!(parse_http_url("https://shop.example.com/cb?x=1", 100).is_ok());
        assert!(parse_http_url("ftp://shop.example.com/", 100).is_err());
        assert!(parse_http_url("javascript:alert(1)", 100).is_err());
        assert!(parse_http_url("/relative", 100).is_err());
        assert!(parse_http_url(&format!("https://a.com/{}", "x".repeat(100)), 100).is_err());
    }
}
