//! Decode: Kafka message bytes → one Arrow [`RecordBatch`] in [`decoded_schema`].
//!
//! The decoder owns the Arrow builders of one micro-batch. Each message is parsed
//! with serde straight into borrowed fields and appended to the builders, so the
//! happy path allocates no `serde_json::Value` and copies strings once, into Arrow.
//! It never fails on a message: whatever is wrong with the bytes becomes the row's
//! `reason`, and the raw bytes travel along so that the reject can keep them.
//! Numbers are read exactly from their text, and a value below zero is refused
//! here, before rounding to the column's scale could make it zero. Semantic
//! checks (required fields, time bounds) belong to `validate`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Decimal128Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::event::{
    ENERGY_PRECISION, ENERGY_SCALE, MONEY_PRECISION, MONEY_SCALE, RejectReason, decoded_schema,
};

/// Where a message came from. Offsets and partitions are Kafka's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta {
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp in milliseconds since the Unix epoch, if any.
    pub timestamp_ms: Option<i64>,
}

/// The last Kafka timestamp taken as one: 9999-12-31T23:59:59.999Z.
const KAFKA_TIME_MAX_MS: i64 = 253_402_300_799_999;

/// A message's Kafka timestamp as the pipeline keeps it (the `kafka_timestamp`
/// column, end-to-end latency): None unless it lies between 1970 and the end
/// of year 9999. Kafka's brokers refuse other values from producers (-1
/// means none), but a broker that stores them as sent (tansu) hands them
/// on, and Postgres refuses a time before 4714 BC: such a message failed its
/// batch's COPY on every retry, and held its partition for good.
pub fn kafka_time_ms(ms: Option<i64>) -> Option<i64> {
    ms.filter(|ms| (0..=KAFKA_TIME_MAX_MS).contains(ms))
}

/// Settings that decode needs; part of [`crate::config`].
#[derive(Debug, Clone, Copy)]
pub struct DecodeConfig {
    /// Messages larger than this many bytes are rejected as `too_large`.
    pub max_message_bytes: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            max_message_bytes: 1024 * 1024,
        }
    }
}

/// Builds one decoded batch. Reuse it: `finish` leaves it empty and ready.
pub struct BatchDecoder {
    cfg: DecodeConfig,
    len: usize,
    partition: Int32Builder,
    offset: Int64Builder,
    kafka_ts: TimestampMicrosecondBuilder,
    event_type: StringBuilder,
    event_time: TimestampMicrosecondBuilder,
    customer_id: StringBuilder,
    session_id: Int64Builder,
    channel: StringBuilder,
    tariff_type: StringBuilder,
    energy: Decimal128Builder,
    payment: Decimal128Builder,
    reason: StringBuilder,
    detail: StringBuilder,
    raw: BinaryBuilder,
}

/// One message's event fields, once typed.
#[derive(Default)]
struct Row<'a> {
    event_type: Option<Cow<'a, str>>,
    event_time: Option<i64>,
    customer_id: Option<Cow<'a, str>>,
    session_id: Option<i64>,
    channel: Option<Cow<'a, str>>,
    tariff_type: Option<Cow<'a, str>>,
    energy: Option<i128>,
    payment: Option<i128>,
}

/// A decode failure: the reason and a human detail (never the payload itself,
/// which would leak into logs).
type Failure = (RejectReason, String);

impl BatchDecoder {
    pub fn new(cfg: DecodeConfig) -> Self {
        BatchDecoder {
            cfg,
            len: 0,
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            kafka_ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            event_type: StringBuilder::new(),
            event_time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            customer_id: StringBuilder::new(),
            session_id: Int64Builder::new(),
            channel: StringBuilder::new(),
            tariff_type: StringBuilder::new(),
            energy: decimal_builder(ENERGY_PRECISION, ENERGY_SCALE),
            payment: decimal_builder(MONEY_PRECISION, MONEY_SCALE),
            reason: StringBuilder::new(),
            detail: StringBuilder::new(),
            raw: BinaryBuilder::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The message bytes appended since the last [`BatchDecoder::finish`].
    pub fn payload_bytes(&self) -> usize {
        self.raw.values_slice().len()
    }

    /// Appends one message. `payload` is `None` for a tombstone.
    pub fn push(&mut self, payload: Option<&[u8]>, meta: MessageMeta) {
        self.len += 1;
        self.partition.append_value(meta.partition);
        self.offset.append_value(meta.offset);
        self.kafka_ts
            .append_option(kafka_time_ms(meta.timestamp_ms).map(|ms| ms * 1000));
        self.raw.append_option(payload);
        match decode_one(payload, self.cfg.max_message_bytes) {
            Ok(row) => {
                self.append_row(&row);
                self.reason.append_null();
                self.detail.append_null();
            }
            Err((reason, detail)) => {
                self.append_row(&Row::default());
                self.reason.append_value(reason.as_str());
                self.detail.append_value(detail);
            }
        }
    }

    fn append_row(&mut self, row: &Row<'_>) {
        self.event_type.append_option(row.event_type.as_deref());
        self.event_time.append_option(row.event_time);
        self.customer_id.append_option(row.customer_id.as_deref());
        self.session_id.append_option(row.session_id);
        self.channel.append_option(row.channel.as_deref());
        self.tariff_type.append_option(row.tariff_type.as_deref());
        self.energy.append_option(row.energy);
        self.payment.append_option(row.payment);
    }

    /// Returns the batch of everything pushed since the last call.
    pub fn finish(&mut self) -> RecordBatch {
        self.len = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.kafka_ts.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.customer_id.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.channel.finish()),
            Arc::new(self.tariff_type.finish()),
            Arc::new(self.energy.finish()),
            Arc::new(self.payment.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.raw.finish()),
        ];
        RecordBatch::try_new(decoded_schema(), columns)
            .expect("decoder builders match decoded_schema by construction")
    }
}

fn decimal_builder(precision: u8, scale: i8) -> Decimal128Builder {
    Decimal128Builder::new()
        .with_precision_and_scale(precision, scale)
        .expect("precision and scale are valid constants")
}

/// Decodes a whole batch of payloads at once; handy for tests and benches.
pub fn decode_batch<'a>(
    cfg: DecodeConfig,
    messages: impl IntoIterator<Item = (Option<&'a [u8]>, MessageMeta)>,
) -> RecordBatch {
    let mut dec = BatchDecoder::new(cfg);
    for (payload, meta) in messages {
        dec.push(payload, meta);
    }
    dec.finish()
}

fn decode_one(payload: Option<&[u8]>, max_bytes: usize) -> Result<Row<'_>, Failure> {
    let bytes = payload.ok_or((
        RejectReason::Tombstone,
        "message has no value (tombstone)".to_string(),
    ))?;
    if bytes.is_empty() {
        return Err((RejectReason::Empty, "message value is empty".into()));
    }
    if bytes.len() > max_bytes {
        return Err((
            RejectReason::TooLarge,
            format!("message is {} bytes, the limit is {max_bytes}", bytes.len()),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        (
            RejectReason::NotUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    if nesting_exceeds(bytes, MAX_DEPTH) {
        return Err((
            RejectReason::InvalidJson,
            format!("JSON nesting deeper than {MAX_DEPTH}"),
        ));
    }
    let wire: Lenient<WireEvent<'_>> = serde_json::from_str(text).map_err(json_failure)?;
    let Lenient::Object(wire) = wire else {
        return Err((
            RejectReason::NotObject,
            "message is not a JSON object".into(),
        ));
    };
    let payload = match wire.payload {
        None | Some(Lenient::Null) => None,
        Some(Lenient::NotObject) => {
            return Err((
                RejectReason::NotObject,
                "payload is not a JSON object".into(),
            ));
        }
        Some(Lenient::Object(p)) => Some(p),
    };
    let mut row = Row {
        event_type: string_field("event_type", wire.event_type)?,
        event_time: None,
        ..Row::default()
    };
    if let Some(t) = string_field("event_time", wire.event_time)? {
        row.event_time = Some(parse_event_time(&t).ok_or_else(|| {
            (
                RejectReason::InvalidEventTime,
                "event_time is not an ISO-8601 date-time".to_string(),
            )
        })?);
    }
    if let Some(p) = payload {
        row.customer_id = string_field("customer_id", p.customer_id)?;
        row.session_id = session_id(number(p.session_id)?)?;
        row.channel = string_field("channel", p.channel)?;
        row.tariff_type = string_field("tariff_type", p.tariff_type)?;
        row.energy = decimal_field(
            "energy_consumed",
            number(p.energy_consumed)?,
            ENERGY_PRECISION,
            ENERGY_SCALE,
        )?;
        row.payment = decimal_field(
            "payment_amount",
            number(p.payment_amount)?,
            MONEY_PRECISION,
            MONEY_SCALE,
        )?;
    }
    Ok(row)
}

/// Deeper JSON is refused. serde_json limits recursion only for values it
/// builds, not for the unknown fields it skips, so the bound is checked here.
const MAX_DEPTH: usize = 128;

/// True when brackets nest deeper than `max` outside strings. One cheap pass
/// over bytes that are already known to be UTF-8.
fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    // The depth never exceeds the number of opening brackets, and a real
    // event has a handful: counting them is one vectorised pass, while the
    // walk below branches on every byte (it was a third of decoding).
    let openers: usize = bytes
        .iter()
        .map(|&b| usize::from((b == b'[') | (b == b'{')))
        .sum();
    if openers <= max {
        return false;
    }
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Strings: absent, null, "" and whitespace-only all read as absent, so a blank
/// `customer_id` is a missing one; `validate` decides whether absence is fatal
/// for this event type. Other values are kept verbatim, untrimmed.
fn string_field<'a>(name: &str, v: Option<Scalar<'a>>) -> Result<Option<Cow<'a, str>>, Failure> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.trim().is_empty() => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        Some(other) => Err((
            RejectReason::InvalidType,
            format!("{name} must be a string, got {}", other.kind()),
        )),
    }
}

/// An integer, or a string of digits (surrounding spaces allowed, as for the
/// numeric fields). A JSON number with a fraction or exponent that names an
/// integer exactly, such as `12.0` from a producer that writes every number
/// as a float, or `1e3`, is that integer; it is read from its text, so no
/// float rounding turns `1.9999999999999998` into 2.
fn session_id(v: Option<Number<'_>>) -> Result<Option<i64>, Failure> {
    let bad = |what: &str| {
        (
            RejectReason::InvalidType,
            format!("session_id must be an integer or a string of digits, got {what}"),
        )
    };
    let too_big = || {
        (
            RejectReason::NumberOutOfRange,
            "session_id does not fit in 64 bits".to_string(),
        )
    };
    let negative = || {
        (
            RejectReason::NegativeNumber,
            "session_id is negative".to_string(),
        )
    };
    match v {
        None | Some(Number::Other(Scalar::Null)) => Ok(None),
        Some(Number::Other(Scalar::Str(s))) if s.trim().is_empty() => Ok(None),
        Some(Number::Text(t)) => match parse_decimal(t.as_bytes(), 19, 0) {
            Ok((_, Inexact::Yes)) => Err(bad("a number with a fraction")),
            Ok((v, Inexact::No)) => i64::try_from(v).map(Some).map_err(|_| too_big()),
            Err(NumberError::Negative) => Err(negative()),
            Err(NumberError::OutOfRange) => Err(too_big()),
            Err(NumberError::Syntax) => Err(bad("a malformed number")),
        },
        Some(Number::Other(Scalar::Str(s))) => {
            let s = s.trim();
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a non-digit string"));
            }
            s.parse::<i64>().map(Some).map_err(|_| too_big())
        }
        Some(Number::Other(other)) => Err(bad(other.kind())),
    }
}

/// Numbers become exact decimals at the column's scale, rounded half away
/// from zero as Postgres numeric rounds, so that sums downstream are exact.
/// A JSON number is read from its text, as a numeric string is, so `1.005`
/// and `"1.005"` both store 1.01 (through a float, 1.005 is 1.00499…).
/// Any value below zero is refused, even one that rounds to zero.
fn decimal_field(
    name: &str,
    v: Option<Number<'_>>,
    precision: u8,
    scale: i8,
) -> Result<Option<i128>, Failure> {
    let text = match &v {
        None | Some(Number::Other(Scalar::Null)) => return Ok(None),
        Some(Number::Other(Scalar::Str(s))) if s.trim().is_empty() => return Ok(None),
        Some(Number::Text(t)) => *t,
        Some(Number::Other(Scalar::Str(s))) => s.trim(),
        Some(Number::Other(other)) => {
            return Err((
                RejectReason::InvalidNumber,
                format!("{name} must be a number, got {}", other.kind()),
            ));
        }
    };
    match parse_decimal(text.as_bytes(), u32::from(precision), scale as u32) {
        Ok((unscaled, _)) => Ok(Some(unscaled)),
        Err(NumberError::Negative) => {
            Err((RejectReason::NegativeNumber, format!("{name} is negative")))
        }
        Err(NumberError::OutOfRange) => Err((
            RejectReason::NumberOutOfRange,
            format!(
                "{name} does not fit numeric({precision},{scale}) (at most {} digits before the point)",
                precision as i8 - scale
            ),
        )),
        // Only a string gets here: a JSON number always has the syntax.
        Err(NumberError::Syntax) => match text.parse::<f64>() {
            Ok(f) if !f.is_finite() => Err((
                RejectReason::NonFiniteNumber,
                format!("{name} is NaN or infinite"),
            )),
            _ => Err((
                RejectReason::InvalidNumber,
                format!("{name} is a string that is not a number"),
            )),
        },
    }
}

/// Why [`parse_decimal`] refused a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberError {
    /// Not a decimal number: words, hex, `NaN`, a lone sign or point.
    Syntax,
    /// Below zero, however little (`-0` is zero, and fine).
    Negative,
    /// More digits before the point than the column holds, after rounding.
    OutOfRange,
}

/// Whether [`parse_decimal`] dropped a nonzero digit when it rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inexact {
    No,
    Yes,
}

/// A decimal number in JSON's syntax or a little wider (`-12.5`, `1e3`,
/// `+5`, `.5`, `5.`, `2E-3`) → its value times 10^`scale`, rounded half away
/// from zero, exactly, from the digits themselves. The result has at most
/// `precision` digits.
fn parse_decimal(s: &[u8], precision: u32, scale: u32) -> Result<(i128, Inexact), NumberError> {
    let digits_from = |mut i: usize| {
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let (negative, int_start) = match s.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let int_end = digits_from(int_start);
    let (frac_start, frac_end) = if s.get(int_end) == Some(&b'.') {
        (int_end + 1, digits_from(int_end + 1))
    } else {
        (int_end, int_end)
    };
    if int_end == int_start && frac_end == frac_start {
        return Err(NumberError::Syntax);
    }
    let mut exponent: i64 = 0;
    let mut end = frac_end;
    if matches!(s.get(end), Some(b'e' | b'E')) {
        let (exp_negative, exp_start) = match s.get(end + 1) {
            Some(b'-') => (true, end + 2),
            Some(b'+') => (false, end + 2),
            _ => (false, end + 1),
        };
        end = digits_from(exp_start);
        if end == exp_start {
            return Err(NumberError::Syntax);
        }
        for &d in &s[exp_start..end] {
            // Saturates far beyond any digit count a message can hold.
            exponent = (exponent * 10 + i64::from(d - b'0')).min(1 << 40);
        }
        if exp_negative {
            exponent = -exponent;
        }
    }
    if end != s.len() {
        return Err(NumberError::Syntax);
    }
    // The mantissa's digits, integer part then fraction, as one sequence;
    // position `units` holds the digit worth 1 once scaled.
    let (int, frac) = (&s[int_start..int_end], &s[frac_start..frac_end]);
    let len = (int.len() + frac.len()) as i64;
    let digit = |p: i64| -> i128 {
        if p < 0 || p >= len {
            0
        } else if (p as usize) < int.len() {
            i128::from(int[p as usize] - b'0')
        } else {
            i128::from(frac[p as usize - int.len()] - b'0')
        }
    };
    let Some(first) = (0..len).find(|&p| digit(p) != 0) else {
        return Ok((0, Inexact::No));
    };
    if negative {
        return Err(NumberError::Negative);
    }
    let units = int.len() as i64 - 1 + exponent + i64::from(scale);
    if units - first + 1 > i64::from(precision) {
        return Err(NumberError::OutOfRange);
    }
    let mut value: i128 = 0;
    for p in first.min(units + 1)..=units {
        value = value * 10 + digit(p);
    }
    let inexact = if ((units + 1).max(first)..len).any(|p| digit(p) != 0) {
        Inexact::Yes
    } else {
        Inexact::No
    };
    if digit(units + 1) >= 5 {
        value += 1;
    }
    if value >= 10i128.pow(precision) {
        return Err(NumberError::OutOfRange);
    }
    Ok((value, inexact))
}

/// ISO-8601 date-time → microseconds since the Unix epoch, in UTC.
///
/// The extended format, every field at its full width: `YYYY-MM-DD`, then
/// `T` (or `t`, or a space), `HH:MM`, optionally `:SS` and a fraction after
/// `.` or `,` (any number of digits, rounded half up to the microsecond;
/// Postgres goes through a binary float and rounds an exact half to even
/// most of the time, so the two can differ by a microsecond only there),
/// then nothing (UTC), `Z`, or an offset `±HH:MM`, `±HHMM` or `±HH` up to
/// ±23:59, which is converted. Second 60 (a leap second), fraction included,
/// is read into the next minute, as Postgres reads it: `10:00:60.5` is
/// `10:01:00.5`. Surrounding whitespace is ignored; anything else
/// (unpadded fields, a two-digit year, a space before the zone) is refused,
/// since guessing could store the wrong instant.
pub fn parse_event_time(s: &str) -> Option<i64> {
    let s = s.trim().as_bytes();
    let digit = |i: usize| -> Option<i64> {
        let c = *s.get(i)?;
        c.is_ascii_digit().then(|| i64::from(c - b'0'))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    if s.len() < 16
        || s[4] != b'-'
        || s[7] != b'-'
        || !matches!(s[10], b'T' | b't' | b' ')
        || s[13] != b':'
    {
        return None;
    }
    let year = two(0)? * 100 + two(2)?;
    let (month, day, hour, minute) = (two(5)?, two(8)?, two(11)?, two(14)?);
    let (mut i, mut second, mut micros) = (16, 0, 0);
    if s.get(i) == Some(&b':') {
        second = two(i + 1)?;
        i += 3;
        if matches!(s.get(i), Some(b'.' | b',')) {
            i += 1;
            let start = i;
            let mut round_up = false;
            while let Some(d) = digit(i) {
                match i - start {
                    0..6 => micros = micros * 10 + d,
                    6 => round_up = d >= 5,
                    _ => {}
                }
                i += 1;
            }
            let n = i - start;
            if n == 0 {
                return None;
            }
            if n < 6 {
                micros *= 10i64.pow(6 - n as u32);
            }
            micros += i64::from(round_up);
        }
    }
    let offset_secs = match &s[i..] {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), zone @ ..] => {
            let (h, m) = match zone {
                [_, _] => (two(i + 1)?, 0),
                [_, _, _, _] => (two(i + 1)?, two(i + 3)?),
                [_, _, b':', _, _] => (two(i + 1)?, two(i + 4)?),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'-' {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
        _ => return None,
    };
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month as u32, day as u32)?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    let secs = midnight + hour * 3600 + minute * 60 + second - offset_secs;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

// ---- wire format ---------------------------------------------------------------

/// The envelope. Unknown keys are ignored; a duplicated known key is an error
/// (serde refuses it), which we report as invalid JSON.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow, default)]
    event_type: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    event_time: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    payload: Option<Lenient<WirePayload<'a>>>,
}

#[derive(Deserialize)]
struct WirePayload<'a> {
    #[serde(borrow, default)]
    customer_id: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    session_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    tariff_type: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    energy_consumed: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payment_amount: Option<&'a RawValue>,
}

/// A numeric field: a JSON number as its text, which the field parses
/// exactly (serde would hand over a float), or any other value.
enum Number<'a> {
    Text(&'a str),
    Other(Scalar<'a>),
}

/// Reads a numeric field kept raw by [`WirePayload`]. Absent and `null` are
/// both `None` here, as for the other fields.
fn number(raw: Option<&RawValue>) -> Result<Option<Number<'_>>, Failure> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => Ok(Some(Number::Text(text))),
        _ => serde_json::from_str::<Scalar<'_>>(text)
            .map(|v| Some(Number::Other(v)))
            .map_err(json_failure),
    }
}

/// serde_json's words for a lone UTF-16 surrogate depend on what follows it
/// (`"a\ud800b"` reads "unexpected end of hex escape"), which sends whoever
/// reads the reject looking for a truncated message.
fn json_failure(e: serde_json::Error) -> Failure {
    let text = e.to_string();
    let detail = if text.contains("hex escape") || text.contains("unicode code point") {
        format!(
            "invalid JSON: {text}: a \\u escape must spell a whole Unicode character, \
             and a lone UTF-16 surrogate (such as \\ud800) is none"
        )
    } else {
        format!("invalid JSON: {text}")
    };
    (RejectReason::InvalidJson, detail)
}

/// Any JSON value, kept only as far as the type checks need. Strings borrow from
/// the message unless they contain escapes.
enum Scalar<'a> {
    Null,
    Bool,
    Number,
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool => "a boolean",
            Scalar::Number => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Number)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Number)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Number)
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Object)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An object of type `T`, or a note that the value was not an object, so that
/// "not an object" is a reject reason rather than a parse error.
enum Lenient<T> {
    Object(T),
    Null,
    NotObject,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Lenient::Object)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient::NotObject)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Decimal128Type, Int64Type, TimestampMicrosecondType};
    use proptest::prelude::*;

    /// The instant chrono computes for the same fields: the reference.
    fn chrono_micros(
        (y, mo, d): (u32, u32, u32),
        (h, mi, sec): (u32, u32, u32),
        micros: i64,
        offset_secs: i32,
    ) -> Option<i64> {
        let local = chrono::NaiveDate::from_ymd_opt(y as i32, mo, d)?.and_hms_opt(h, mi, sec)?;
        let zone = chrono::FixedOffset::east_opt(offset_secs)?;
        let t = local.and_local_timezone(zone).single()?;
        Some(t.timestamp_micros() + micros)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every well-formed value is read as chrono reads the same fields,
        /// whatever separator, fraction and zone it is written with.
        #[test]
        fn event_time_agrees_with_chrono(
            year in 1900u32..2200, month in 1u32..=12, day in 1u32..=31,
            hour in 0u32..=23, minute in 0u32..=59, second in 0u32..=59,
            frac in proptest::option::of("[0-9]{1,9}"),
            sep in prop_oneof![Just('T'), Just('t'), Just(' ')],
            zone in prop_oneof![
                Just((String::new(), 0)),
                Just(("Z".to_string(), 0)),
                Just(("z".to_string(), 0)),
                (prop_oneof![Just(1), Just(-1)], 0i32..=23, 0i32..=59, 0..3).prop_map(
                    |(sign, h, m, form)| {
                        let c = if sign > 0 { '+' } else { '-' };
                        let text = match form {
                            0 => format!("{c}{h:02}:{m:02}"),
                            1 => format!("{c}{h:02}{m:02}"),
                            _ => format!("{c}{h:02}"),
                        };
                        let m = if form == 2 { 0 } else { m };
                        (text, sign * (h * 3600 + m * 60))
                    }
                ),
            ],
        ) {
            let frac_text = frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default();
            let s = format!(
                "{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{second:02}{frac_text}{}",
                zone.0
            );
            // Rounded to the microsecond, half up.
            let micros = frac.map_or(0, |f| {
                let padded = format!("{f:0<7}");
                padded[..6].parse::<i64>().unwrap() + i64::from(padded.as_bytes()[6] >= b'5')
            });
            let expected = chrono_micros((year, month, day), (hour, minute, second), micros, zone.1);
            prop_assert_eq!(parse_event_time(&s), expected, "{}", s);
        }

        /// Whatever the text, the parser answers without panicking, and
        /// anything it takes has the extended format's fixed layout.
        #[test]
        fn event_time_never_panics(s in "[0-9Tt:Zz+,. \u{2212}-]{0,40}") {
            if parse_event_time(&s).is_some() {
                let b = s.trim().as_bytes();
                prop_assert!(b[4] == b'-' && b[7] == b'-' && b[13] == b':', "{}", s);
            }
        }

        /// Any decimal text: the exact reading agrees with Postgres' rule
        /// (half away from zero) computed on the digits as a string.
        #[test]
        fn decimals_round_like_postgres(int in "[0-9]{1,6}", frac in "[0-9]{0,8}") {
            let text = if frac.is_empty() { int.clone() } else { format!("{int}.{frac}") };
            let padded = format!("{frac:0<3}");
            let mut want: i128 = format!("{int}{}", &padded[..2]).parse().unwrap();
            want += i128::from(padded.as_bytes()[2] >= b'5');
            prop_assert_eq!(parse_decimal(text.as_bytes(), 10, 2).map(|v| v.0), Ok(want), "{}", text);
            // The same value in exponent form reads the same.
            let e = format!("{int}{frac}e-{}", frac.len());
            prop_assert_eq!(parse_decimal(e.as_bytes(), 10, 2).map(|v| v.0), Ok(want), "{}", e);
        }
    }

    /// Found by the property test while checking it against a flipped offset
    /// sign: a positive offset moves the instant back, here across a year.
    #[test]
    fn event_time_offset_moves_the_instant_across_a_year() {
        let expected = chrono_micros((1899, 12, 31), (23, 59, 0), 0, 0);
        assert_eq!(parse_event_time("1900-01-01T00:00:00+00:01"), expected);
    }

    /// Regression: the parser took shapes that are not ISO-8601, two of
    /// them as another instant than the one written (`25-06-01` as the year
    /// 25), and refused a lowercase `t` unless an offset followed.
    #[test]
    fn event_time_takes_the_extended_format_only() {
        let utc = parse_event_time("2025-06-01T10:00:00Z").unwrap();
        for same in [
            "2025-06-01t10:00:00",
            "2025-06-01t10:00:00z",
            "2025-06-01 10:00:00.000000",
            "2025-06-01T10:00:00,0Z",
            "  2025-06-01T10:00:00Z  ",
            "2025-06-01T12:00:00+02",
        ] {
            assert_eq!(parse_event_time(same), Some(utc), "{same}");
        }
        for refused in [
            "2025-6-1T10:00:00",
            "2025-06-01T10:0:0",
            "2025-06-01T1:00:00",
            "25-06-01T10:00:00",
            "2025-06-01\t10:00:00",
            "2025-06-01  10:00:00",
            "2025-06-01T 10:00:00",
            "2025-06-01T10:00:00 Z",
            "2025-06-01T10:00:00.5 Z",
            "2025-06-01T10:00:00 +02:00",
            "2025-06-01T10:00:00\u{2212}05:00",
            "2025-06-01T10:00:00.",
            "2025-06-01T10:00:61Z",
            "2025-06-01T24:00:00",
            "20250601T100000Z",
            "2025-W22-7T10:00:00",
            "2025-06-01",
        ] {
            assert_eq!(parse_event_time(refused), None, "{refused}");
        }
        // A leap second is read into the next minute, as Postgres reads it.
        assert_eq!(
            parse_event_time("2025-06-01T10:00:60Z"),
            parse_event_time("2025-06-01T10:01:00Z")
        );
        // Regression: a leap second with a fraction was refused, though
        // Postgres reads `60.5` as the next minute's half second.
        assert_eq!(
            parse_event_time("2025-06-01T23:59:60.5Z"),
            parse_event_time("2025-06-02T00:00:00.5Z")
        );
        assert_eq!(
            parse_event_time("2025-06-01T10:00:60.9999995Z"),
            parse_event_time("2025-06-01T10:01:01Z")
        );
        // Fractions round half up to the microsecond.
        assert_eq!(parse_event_time("2025-06-01T09:59:59.9999995Z"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T10:00:00.0000004Z"), Some(utc));
    }

    /// Regression: a Kafka timestamp before 4714 BC (tansu stores what a
    /// producer sends) went to Postgres, which refused the batch on every
    /// retry; i64::MIN wrapped into year 294247. Out of 1970..=9999, none.
    #[test]
    fn implausible_kafka_timestamps_are_none() {
        let stamps = [
            Some(-300_000_000_000_000),
            Some(i64::MIN),
            Some(-1),
            Some(0),
            Some(1_700_000_000_000),
            Some(KAFKA_TIME_MAX_MS),
            Some(KAFKA_TIME_MAX_MS + 1),
            Some(i64::MAX),
            None,
        ];
        let line: &[u8] = br#"{"event_type":"user_login","event_time":"2025-06-01T10:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal"}}"#;
        let b = decode_batch(
            DecodeConfig::default(),
            stamps.iter().enumerate().map(|(i, &timestamp_ms)| {
                (
                    Some(line),
                    MessageMeta {
                        partition: 0,
                        offset: i as i64,
                        timestamp_ms,
                    },
                )
            }),
        );
        let ts = b
            .column_by_name(crate::event::col::KAFKA_TIMESTAMP)
            .unwrap();
        let ts = ts.as_primitive::<TimestampMicrosecondType>();
        let got: Vec<Option<i64>> = (0..ts.len())
            .map(|i| ts.is_valid(i).then(|| ts.value(i)))
            .collect();
        assert_eq!(
            got,
            [
                None,
                None,
                None,
                Some(0),
                Some(1_700_000_000_000_000),
                Some(KAFKA_TIME_MAX_MS * 1000),
                None,
                None,
                None
            ]
        );
        // The event itself is valid: only its Kafka time is dropped.
        let reasons = b.column_by_name("reason").unwrap();
        assert_eq!(reasons.null_count(), stamps.len());
    }

    fn meta(offset: i64) -> MessageMeta {
        MessageMeta {
            partition: 0,
            offset,
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn one(payload: Option<&[u8]>) -> RecordBatch {
        decode_batch(DecodeConfig::default(), [(payload, meta(0))])
    }

    fn reason(b: &RecordBatch) -> Option<String> {
        let r = b.column_by_name("reason").unwrap().as_string::<i32>();
        r.is_valid(0).then(|| r.value(0).to_string())
    }

    fn str_col(b: &RecordBatch, name: &str) -> Option<String> {
        let r = b.column_by_name(name).unwrap().as_string::<i32>();
        r.is_valid(0).then(|| r.value(0).to_string())
    }

    #[test]
    fn decodes_a_full_event() {
        let b = one(Some(
            br#"{"event_type":"bill_payment","event_time":"2025-06-01T02:04:33.033906","payload":{"customer_id":"CUST0023","session_id":3703,"channel":"web_portal","tariff_type":"basic","energy_consumed":1.5,"payment_amount":"20.5","extra":{"deep":[1,2]}}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert_eq!(str_col(&b, "event_type").as_deref(), Some("bill_payment"));
        assert_eq!(str_col(&b, "customer_id").as_deref(), Some("CUST0023"));
        let t = b.column_by_name("event_time").unwrap();
        let t = t.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(t.value(0), 1_748_743_473_033_906);
        let s = b.column_by_name("session_id").unwrap();
        assert_eq!(s.as_primitive::<Int64Type>().value(0), 3703);
        let e = b.column_by_name("energy_consumed").unwrap();
        assert_eq!(e.as_primitive::<Decimal128Type>().value(0), 1500);
        let p = b.column_by_name("payment_amount").unwrap();
        assert_eq!(p.as_primitive::<Decimal128Type>().value(0), 2050);
        let raw = b.column_by_name("raw_payload").unwrap();
        assert!(raw.is_valid(0));
    }

    /// ISO-8601 allows a time that stops at the minute and an offset of hours
    /// only; both were refused as invalid_event_time.
    #[test]
    fn minute_precision_and_hour_offsets_are_iso_8601() {
        let utc = parse_event_time("2025-06-01T00:00:00Z").unwrap();
        assert_eq!(parse_event_time("2025-06-01T00:00Z"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01 00:00"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T02:00+02:00"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T05:00:00+05"), Some(utc));
        assert_eq!(parse_event_time("2025-05-31T21:00:00.000-03"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T00:00:00+5"), None);
        assert_eq!(parse_event_time("2025-06-01T00Z"), None);
    }

    fn session_of(value: &str) -> Result<i64, String> {
        let msg = format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"C","session_id":{value},"channel":"web_portal"}}}}"#
        );
        let b = one(Some(msg.as_bytes()));
        match reason(&b) {
            Some(r) => Err(r),
            None => Ok(b
                .column_by_name("session_id")
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0)),
        }
    }

    /// `12.0` is how many producers write the integer 12; it was refused as
    /// invalid_type, and a 20-digit id as invalid_type instead of out of range.
    #[test]
    fn session_id_from_floats_and_padded_strings() {
        assert_eq!(session_of("12.0"), Ok(12));
        assert_eq!(session_of("1.2e1"), Ok(12));
        assert_eq!(session_of(r#"" 42 ""#), Ok(42));
        assert_eq!(session_of("9007199254740992.0"), Ok(9_007_199_254_740_992));
        assert_eq!(session_of("12.5").unwrap_err(), "invalid_type");
        assert_eq!(session_of("-3.0").unwrap_err(), "negative_number");
        assert_eq!(
            session_of("99999999999999999999").unwrap_err(),
            "number_out_of_range"
        );
        assert_eq!(session_of("1e19").unwrap_err(), "number_out_of_range");
        // Read from its text, a float names exactly the integer it spells,
        // or is refused: no float rounding in between.
        assert_eq!(session_of("1e17"), Ok(100_000_000_000_000_000));
        assert_eq!(session_of("9007199254740993.0"), Ok(9_007_199_254_740_993));
        assert_eq!(
            session_of("1.9999999999999998").unwrap_err(),
            "invalid_type"
        );
        assert_eq!(
            session_of("12.000000000000001").unwrap_err(),
            "invalid_type"
        );
        assert_eq!(session_of("1e400").unwrap_err(), "number_out_of_range");
        assert_eq!(session_of(r#""4 2""#).unwrap_err(), "invalid_type");
        // Blank reads as absent; validate then rejects it as missing_field.
        let b = one(Some(
            br#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":"  ","channel":"web"}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert!(b.column_by_name("session_id").unwrap().is_null(0));
    }

    /// A blank customer_id or channel names nobody; it was stored as a
    /// customer. Decode reads it as absent, and validate rejects it as
    /// missing_field (`validate::tests::blank_required_text_is_missing`).
    #[test]
    fn blank_text_reads_as_absent() {
        for (customer, channel, blank) in [
            ("   ", "web", "customer_id"),
            ("", "web", "customer_id"),
            ("C", "\\t \\n", "channel"),
        ] {
            let msg = format!(
                r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"{customer}","session_id":1,"channel":"{channel}"}}}}"#
            );
            let b = one(Some(msg.as_bytes()));
            assert_eq!(reason(&b), None, "{msg}");
            assert_eq!(str_col(&b, blank), None, "{msg}");
        }
        // Text is stored verbatim, surrounding spaces included.
        let b = one(Some(
            br#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":" C ","session_id":1,"channel":"web"}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert_eq!(str_col(&b, "customer_id").as_deref(), Some(" C "));
    }

    #[test]
    fn accepted_forms() {
        // Offsets are converted to UTC; no offset means UTC.
        let utc = parse_event_time("2025-06-01T00:00:00Z").unwrap();
        assert_eq!(parse_event_time("2025-06-01T00:00:00"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01 00:00:00"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T00:00:00-00:00"), Some(utc));
        assert_eq!(
            parse_event_time("2025-06-01T05:45:00+05:45"),
            Some(utc),
            "+05:45 converts to UTC"
        );
        assert_eq!(parse_event_time("2025-06-01T05:45:00+0545"), Some(utc));
        assert_eq!(parse_event_time("2025-06-01T00:00"), Some(utc));
        assert_eq!(parse_event_time("12:34:56"), None);
        assert_eq!(parse_event_time("2025-06-01"), None);
        assert_eq!(parse_event_time("yesterday"), None);

        // Digit strings for session_id, numeric strings for amounts.
        let b = one(Some(
            br#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":"42","channel":"web_portal","payment_amount":"0.005"}}"#,
        ));
        assert_eq!(reason(&b), None);
        let s = b.column_by_name("session_id").unwrap();
        assert_eq!(s.as_primitive::<Int64Type>().value(0), 42);
        let p = b.column_by_name("payment_amount").unwrap();
        assert_eq!(
            p.as_primitive::<Decimal128Type>().value(0),
            1,
            "0.005 rounds half away from zero to 0.01"
        );
    }

    #[test]
    fn decimal_strings_are_exact() {
        let p = |s: &str, scale| parse_decimal(s.as_bytes(), 10, scale);
        assert_eq!(p("20.5", 2), Ok((2050, Inexact::No)));
        assert_eq!(p("1.2345", 3), Ok((1235, Inexact::Yes)));
        assert_eq!(p("7", 3), Ok((7000, Inexact::No)));
        assert_eq!(p(".5", 2), Ok((50, Inexact::No)));
        assert_eq!(p("5.", 2), Ok((500, Inexact::No)));
        assert_eq!(p("+5", 2), Ok((500, Inexact::No)));
        assert_eq!(p("1e3", 2), Ok((100_000, Inexact::No)));
        assert_eq!(p("25E-1", 2), Ok((250, Inexact::No)));
        assert_eq!(p("0.0049", 2), Ok((0, Inexact::Yes)));
        assert_eq!(p("000.00", 2), Ok((0, Inexact::No)));
        assert_eq!(p("-0.0", 2), Ok((0, Inexact::No)));
        assert_eq!(p("-1", 2), Err(NumberError::Negative));
        assert_eq!(p("99999999.99", 2), Ok((9_999_999_999, Inexact::No)));
        assert_eq!(p("99999999.995", 2), Err(NumberError::OutOfRange));
        assert_eq!(p("1e8", 2), Err(NumberError::OutOfRange));
        assert_eq!(p("1e-400", 2), Ok((0, Inexact::Yes)));
        assert_eq!(p("1e99999999999999999999", 2), Err(NumberError::OutOfRange));
        for bad in [
            "abc", "-", "+", ".", "1e", "1e+", "0x10", "1_000", "1,5", "1.2.3", "--1", " 1", "NaN",
            "inf",
        ] {
            assert_eq!(p(bad, 2), Err(NumberError::Syntax), "{bad}");
        }
    }

    fn amount_of(value: &str) -> Result<i128, String> {
        let msg = format!(
            r#"{{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"C","session_id":1,"channel":"web_portal","payment_amount":{value}}}}}"#
        );
        let b = one(Some(msg.as_bytes()));
        match reason(&b) {
            Some(r) => Err(r),
            None => Ok(b
                .column_by_name("payment_amount")
                .unwrap()
                .as_primitive::<Decimal128Type>()
                .value(0)),
        }
    }

    /// Regression: an amount below zero that rounds to zero at the column's
    /// scale (`-0.004` EUR) was stored as 0.00 instead of being refused.
    #[test]
    fn a_negative_amount_is_refused_however_small() {
        for v in ["-0.004", r#""-0.004""#, "-1e-300", "-0.001", "-5"] {
            assert_eq!(amount_of(v).unwrap_err(), "negative_number", "{v}");
        }
        for zero in ["-0", "-0.0", r#""-0""#, "0"] {
            assert_eq!(amount_of(zero), Ok(0), "{zero}");
        }
        let energy = one(Some(
            br#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web_portal","energy_consumed":-0.0001}}"#,
        ));
        assert_eq!(reason(&energy).as_deref(), Some("negative_number"));
    }

    /// Regression: a JSON number went through a float, so `1.005` stored
    /// 1.00 while the string `"1.005"` stored 1.01 (Postgres: 1.01); and the
    /// reason for a number too large depended on how it was written.
    #[test]
    fn amounts_round_the_same_from_a_number_and_from_a_string() {
        for (text, cents) in [
            ("1.005", 101),
            ("1.015", 102),
            ("0.285", 29),
            ("1.255", 126),
            ("2.675", 268),
            ("0.125", 13),
            ("1.0049999999999999", 100),
        ] {
            assert_eq!(amount_of(text), Ok(cents), "{text}");
            assert_eq!(amount_of(&format!("\"{text}\"")), Ok(cents), "\"{text}\"");
        }
        let huge = format!("1{}", "0".repeat(400));
        for v in ["1e400", "\"1e400\"", "\"1e300\"", huge.as_str(), "1e8"] {
            assert_eq!(amount_of(v).unwrap_err(), "number_out_of_range", "{v}");
        }
        for v in [r#""NaN""#, r#""-Infinity""#, r#""inf""#] {
            assert_eq!(amount_of(v).unwrap_err(), "non_finite_number", "{v}");
        }
        for v in [r#""0x10""#, r#""12 EUR""#, "true", "[1]", r#"{"a":1}"#] {
            assert_eq!(amount_of(v).unwrap_err(), "invalid_number", "{v}");
        }
        // null is an absent amount; validate decides whether that is missing.
        let b = one(Some(
            br#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web_portal","payment_amount":null}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert!(b.column_by_name("payment_amount").unwrap().is_null(0));
    }

    #[test]
    fn every_decode_reject_reason() {
        let cases: Vec<(Option<&[u8]>, &str)> = vec![
            (None, "tombstone"),
            (Some(b""), "empty"),
            (Some(b"\xff\xfe{}"), "not_utf8"),
            (Some(b"{\"event_type\": "), "invalid_json"),
            (Some(b"NaN"), "invalid_json"),
            (
                Some(br#"{"event_type":"a","event_type":"b"}"#),
                "invalid_json",
            ),
            (Some(b"[1,2,3]"), "not_object"),
            (Some(b"42"), "not_object"),
            (Some(b"null"), "not_object"),
            (Some(br#"{"payload": [1]}"#), "not_object"),
            (
                Some(br#"{"event_type": 7, "event_time": "2025-06-01T00:00:00Z"}"#),
                "invalid_type",
            ),
            (
                Some(br#"{"event_type":"user_login","payload":{"session_id":"s-12"}}"#),
                "invalid_type",
            ),
            (
                Some(br#"{"event_type":"user_login","payload":{"customer_id":12}}"#),
                "invalid_type",
            ),
            (
                Some(br#"{"event_time": "yesterday"}"#),
                "invalid_event_time",
            ),
            (
                Some(br#"{"payload":{"energy_consumed":"abc"}}"#),
                "invalid_number",
            ),
            (
                Some(br#"{"payload":{"energy_consumed":true}}"#),
                "invalid_number",
            ),
            (
                Some(br#"{"payload":{"energy_consumed":"NaN"}}"#),
                "non_finite_number",
            ),
            (
                Some(br#"{"payload":{"payment_amount":"Infinity"}}"#),
                "non_finite_number",
            ),
            (
                Some(br#"{"payload":{"payment_amount":123456789.5}}"#),
                "number_out_of_range",
            ),
            (Some(br#"{"payload":{"session_id":-4}}"#), "negative_number"),
        ];
        for (payload, want) in cases {
            let b = one(payload);
            assert_eq!(
                reason(&b).as_deref(),
                Some(want),
                "payload {:?}",
                payload.map(String::from_utf8_lossy)
            );
        }
    }

    #[test]
    fn size_limit_is_inclusive() {
        let cfg = DecodeConfig {
            max_message_bytes: 10,
        };
        let b = decode_batch(cfg, [(Some(&b"0123456789"[..]), meta(0))]);
        assert_ne!(reason(&b).as_deref(), Some("too_large"));
        let b = decode_batch(cfg, [(Some(&b"0123456789A"[..]), meta(0))]);
        assert_eq!(reason(&b).as_deref(), Some("too_large"));
    }

    #[test]
    fn deep_nesting_is_invalid_json_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let b = one(Some(deep.as_bytes()));
        assert_eq!(reason(&b).as_deref(), Some("invalid_json"));
        // Hidden in an unknown field of an otherwise valid event.
        let hidden = format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"C","session_id":1,"channel":"web","x":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let b = one(Some(hidden.as_bytes()));
        assert_eq!(reason(&b).as_deref(), Some("invalid_json"));
        // Brackets inside strings do not count, and modest nesting is fine.
        let fine = format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"[[[[\"{}","session_id":1,"channel":"web","x":{}{}}}}}"#,
            "[".repeat(300),
            "[".repeat(20),
            "]".repeat(20)
        );
        let b = one(Some(fine.as_bytes()));
        assert_eq!(reason(&b), None);
    }

    /// Regression: a lone surrogate escape was rejected with serde_json's
    /// "unexpected end of hex escape", which reads like a truncated message.
    #[test]
    fn a_lone_surrogate_escape_says_what_it_is() {
        for field in [r#""a\ud800b""#, r#""\udc00""#, r#""\ud800""#] {
            let msg = format!(
                r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":{field},"session_id":1,"channel":"web"}}}}"#
            );
            let b = one(Some(msg.as_bytes()));
            assert_eq!(reason(&b).as_deref(), Some("invalid_json"), "{field}");
            let detail = str_col(&b, "detail").unwrap();
            assert!(
                detail.contains("lone UTF-16 surrogate"),
                "{field}: {detail}"
            );
        }
        // A paired surrogate is one character, stored as such.
        let b = one(Some(
            br#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"\ud83d\ude00","session_id":1,"channel":"web"}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert_eq!(str_col(&b, "customer_id").as_deref(), Some("\u{1f600}"));
    }

    #[test]
    fn escaped_and_control_characters_are_kept_verbatim() {
        let b = one(Some(
            br#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"x'; DROP TABLE events; --\u0001\n","session_id":1,"channel":"web_portal"}}"#,
        ));
        assert_eq!(reason(&b), None);
        assert_eq!(
            str_col(&b, "customer_id").as_deref(),
            Some("x'; DROP TABLE events; --\u{1}\n")
        );
    }

    #[test]
    fn finish_resets() {
        let mut d = BatchDecoder::new(DecodeConfig::default());
        d.push(Some(b"{}"), meta(1));
        d.push(Some(b"{}"), meta(2));
        assert_eq!(d.len(), 2);
        assert_eq!(d.finish().num_rows(), 2);
        assert!(d.is_empty());
        assert_eq!(d.finish().num_rows(), 0);
    }
}
