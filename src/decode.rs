//! Decode: Kafka message bytes → one Arrow [`RecordBatch`] in [`decoded_schema`].
//!
//! The decoder owns the Arrow builders of one micro-batch. Each message is parsed
//! with serde straight into borrowed fields and appended to the builders, so the
//! happy path allocates no `serde_json::Value` and copies strings once, into Arrow.
//! It never fails on a message: whatever is wrong with the bytes becomes the row's
//! `reason`, and the raw bytes travel along so that the reject can keep them.
//! Semantic checks (required fields, time bounds, signs) belong to `validate`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime};
use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Decimal128Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
            .append_option(meta.timestamp_ms.map(|ms| ms.saturating_mul(1000)));
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
    let wire: Lenient<WireEvent<'_>> = serde_json::from_str(text)
        .map_err(|e| (RejectReason::InvalidJson, format!("invalid JSON: {e}")))?;
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
        row.session_id = session_id(p.session_id)?;
        row.channel = string_field("channel", p.channel)?;
        row.tariff_type = string_field("tariff_type", p.tariff_type)?;
        row.energy = decimal_field(
            "energy_consumed",
            p.energy_consumed,
            ENERGY_PRECISION,
            ENERGY_SCALE,
        )?;
        row.payment = decimal_field(
            "payment_amount",
            p.payment_amount,
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

/// The largest integer a JSON float holds exactly (2^53).
const EXACT_FLOAT_INT: f64 = 9_007_199_254_740_992.0;

/// An integer, or a string of digits (surrounding spaces allowed, as for the
/// numeric fields). A float with no fraction, such as `12.0` from a producer
/// that writes every number as a float, is the integer it names.
fn session_id(v: Option<Scalar<'_>>) -> Result<Option<i64>, Failure> {
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
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.trim().is_empty() => Ok(None),
        Some(Scalar::I64(i)) if i < 0 => Err(negative()),
        Some(Scalar::I64(i)) => Ok(Some(i)),
        Some(Scalar::U64(u)) => i64::try_from(u).map(Some).map_err(|_| too_big()),
        Some(Scalar::F64(f)) if f.fract() != 0.0 => Err(bad("a number with a fraction")),
        Some(Scalar::F64(f)) if f < 0.0 => Err(negative()),
        // serde reads an integer literal beyond u64 as a float.
        Some(Scalar::F64(f)) if f >= i64::MAX as f64 => Err(too_big()),
        // Above 2^53 a float no longer names one integer, so the id it meant is lost.
        Some(Scalar::F64(f)) if f > EXACT_FLOAT_INT => Err((
            RejectReason::NumberOutOfRange,
            "session_id is a float too large to be an exact integer; send it as an integer".into(),
        )),
        Some(Scalar::F64(f)) => Ok(Some(f as i64)),
        Some(Scalar::Str(s)) => {
            let s = s.trim();
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a non-digit string"));
            }
            s.parse::<i64>().map(Some).map_err(|_| too_big())
        }
        Some(other) => Err(bad(other.kind())),
    }
}

/// Numbers become exact decimals at the column's scale (rounded half away from
/// zero, as Postgres numeric does), so that sums downstream are exact.
fn decimal_field(
    name: &str,
    v: Option<Scalar<'_>>,
    precision: u8,
    scale: i8,
) -> Result<Option<i128>, Failure> {
    let value = match v {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::Str(s)) if s.trim().is_empty() => return Ok(None),
        Some(Scalar::I64(i)) => Decimalish::Int(i128::from(i)),
        Some(Scalar::U64(u)) => Decimalish::Int(i128::from(u)),
        Some(Scalar::F64(f)) => Decimalish::Float(f),
        Some(Scalar::Str(s)) => match parse_decimal_str(s.trim(), scale) {
            Some(unscaled) => Decimalish::Unscaled(unscaled),
            None => match s.trim().parse::<f64>() {
                Ok(f) => Decimalish::Float(f),
                Err(_) => {
                    return Err((
                        RejectReason::InvalidNumber,
                        format!("{name} is a string that is not a number"),
                    ));
                }
            },
        },
        Some(other) => {
            return Err((
                RejectReason::InvalidNumber,
                format!("{name} must be a number, got {}", other.kind()),
            ));
        }
    };
    let factor = 10i128.pow(scale as u32);
    let unscaled = match value {
        Decimalish::Int(i) => i.checked_mul(factor),
        Decimalish::Unscaled(u) => Some(u),
        Decimalish::Float(f) if !f.is_finite() => {
            return Err((
                RejectReason::NonFiniteNumber,
                format!("{name} is NaN or infinite"),
            ));
        }
        Decimalish::Float(f) => {
            let scaled = (f * factor as f64).round();
            (scaled.abs() < 1e30).then_some(scaled as i128)
        }
    };
    let max = 10i128.pow(precision as u32);
    match unscaled {
        Some(u) if u.abs() < max => Ok(Some(u)),
        _ => Err((
            RejectReason::NumberOutOfRange,
            format!(
                "{name} does not fit numeric({precision},{scale}) (at most {} digits before the point)",
                precision as i8 - scale
            ),
        )),
    }
}

enum Decimalish {
    Int(i128),
    Unscaled(i128),
    Float(f64),
}

/// Exact parse of a plain decimal string (`-12.345`), rounded half away from
/// zero to `scale` digits. Returns `None` for anything else (exponents, NaN, words)
/// so the caller can fall back to a float parse.
fn parse_decimal_str(s: &str, scale: i8) -> Option<i128> {
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
        || int_part.len() > 30
    {
        return None;
    }
    let scale = scale as usize;
    let mut value: i128 = 0;
    for b in int_part.bytes() {
        value = value * 10 + i128::from(b - b'0');
    }
    let frac = frac_part.as_bytes();
    for i in 0..scale {
        let d = frac.get(i).map_or(0, |b| b - b'0');
        value = value * 10 + i128::from(d);
    }
    if frac.get(scale).is_some_and(|&b| b >= b'5') {
        value += 1;
    }
    Some(if neg { -value } else { value })
}

/// ISO-8601 date-time → microseconds since the Unix epoch, in UTC. A value
/// without an offset is UTC; a value with one is converted.
pub fn parse_event_time(s: &str) -> Option<i64> {
    let s = s.trim();
    // A date-time needs at least "YYYY-MM-DDTHH:MM"; this also rejects bare dates and times.
    if s.len() < 16 {
        return None;
    }
    // chrono's format parsers walk a format string for every value (a tenth
    // of decoding); the shape producers actually send is read directly.
    if let Some(micros) = parse_common_time(s.as_bytes()) {
        return Some(micros);
    }
    parse_event_time_general(s)
}

/// [`parse_event_time`] through chrono's parsers only; `s` is trimmed.
fn parse_event_time_general(s: &str) -> Option<i64> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_micros());
    }
    // `%#z` also takes `Z` and an offset of hours only (`+05`), and a time may
    // stop at the minute: ISO-8601 allows both.
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M%#z",
        "%Y-%m-%d %H:%M%#z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.timestamp_micros());
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt.and_utc().timestamp_micros());
        }
    }
    None
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.fraction]` followed by nothing (UTC), `Z`, or
/// `±HH:MM`. None when `s` has any other shape, or a field out of range: the
/// general parser decides those, so both always agree (a property test checks).
fn parse_common_time(s: &[u8]) -> Option<i64> {
    fn digit(s: &[u8], i: usize) -> Option<u32> {
        let c = *s.get(i)?;
        c.is_ascii_digit().then(|| u32::from(c - b'0'))
    }
    fn two(s: &[u8], i: usize) -> Option<u32> {
        Some(digit(s, i)? * 10 + digit(s, i + 1)?)
    }
    if s.len() < 19
        || s[4] != b'-'
        || s[7] != b'-'
        || !matches!(s[10], b'T' | b' ')
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let year = two(s, 0)? * 100 + two(s, 2)?;
    let (month, day) = (two(s, 5)?, two(s, 8)?);
    let (hour, minute, second) = (two(s, 11)?, two(s, 14)?, two(s, 17)?);
    let mut i = 19;
    let mut nanos = 0u32;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            nanos = nanos * 10 + u32::from(s[i] - b'0');
            i += 1;
            if i - start > 9 {
                return None;
            }
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        nanos *= 10u32.pow(9 - digits as u32);
    }
    let offset_secs = match &s[i..] {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (two(s, i + 1)?, two(s, i + 4)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?;
    // Refuses second 60: leap seconds are left to chrono.
    let time = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let local = NaiveDateTime::new(date, time).and_utc().timestamp_micros();
    local.checked_sub(offset_secs * 1_000_000)
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
    session_id: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    channel: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    tariff_type: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    energy_consumed: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    payment_amount: Option<Scalar<'a>>,
}

/// Any JSON value, kept only as far as the type checks need. Strings borrow from
/// the message unless they contain escapes.
enum Scalar<'a> {
    Null,
    Bool,
    I64(i64),
    U64(u64),
    F64(f64),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool => "a boolean",
            Scalar::I64(_) | Scalar::U64(_) | Scalar::F64(_) => "a number",
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
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::I64(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::U64(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::F64(v))
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The direct reading of the common shape agrees with chrono's
        /// parsers, and takes every well-formed value of that shape.
        #[test]
        fn common_time_shape_agrees_with_chrono(
            year in 1900u32..2200, month in 1u32..=12, day in 1u32..=31,
            hour in 0u32..=23, minute in 0u32..=59, second in 0u32..=59,
            frac in proptest::option::of("[0-9]{1,9}"),
            sep in prop_oneof![Just('T'), Just(' ')],
            zone in prop_oneof![
                Just(String::new()),
                Just("Z".to_string()),
                (prop_oneof![Just('+'), Just('-')], 0u32..=23, 0u32..=59)
                    .prop_map(|(s, h, m)| format!("{s}{h:02}:{m:02}")),
            ],
        ) {
            let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
            let s = format!("{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{second:02}{frac}{zone}");
            let general = parse_event_time_general(&s);
            prop_assert_eq!(parse_common_time(s.as_bytes()), general, "{}", s);
            prop_assert_eq!(parse_event_time(&s), general, "{}", s);
            // A real calendar date is always taken by the direct reading.
            if chrono::NaiveDate::from_ymd_opt(year as i32, month, day).is_some() {
                prop_assert!(general.is_some(), "{}", s);
            }
        }

        /// Whatever the bytes, the direct reading never disagrees with
        /// chrono: it answers only what chrono answers the same way.
        #[test]
        fn common_time_never_contradicts_chrono(s in "[0-9T:Z+. -]{16,40}") {
            if let Some(v) = parse_common_time(s.as_bytes()) {
                prop_assert_eq!(parse_event_time_general(&s), Some(v), "{}", s);
            }
        }
    }

    /// Found by the property test while checking it against a flipped offset
    /// sign: a positive offset moves the instant back, here across a year.
    #[test]
    fn common_time_offset_moves_the_instant_across_a_year() {
        let s = "1900-01-01T00:00:00+00:01";
        let expected = NaiveDateTime::parse_from_str("1899-12-31 23:59:00", "%Y-%m-%d %H:%M:%S")
            .unwrap()
            .and_utc()
            .timestamp_micros();
        assert_eq!(parse_common_time(s.as_bytes()), Some(expected));
        assert_eq!(parse_event_time_general(s), Some(expected));
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
        assert_eq!(session_of("1e17").unwrap_err(), "number_out_of_range");
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
        assert_eq!(parse_decimal_str("20.5", 2), Some(2050));
        assert_eq!(parse_decimal_str("-1.2345", 3), Some(-1235));
        assert_eq!(parse_decimal_str("7", 3), Some(7000));
        assert_eq!(parse_decimal_str(".5", 2), Some(50));
        assert_eq!(parse_decimal_str("1e3", 2), None);
        assert_eq!(parse_decimal_str("abc", 2), None);
        assert_eq!(parse_decimal_str("-", 2), None);
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
