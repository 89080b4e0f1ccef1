//! Validate: a decoded batch → (valid events, rejects).
//!
//! This stage owns the per-event business rules: known event type, a plausible
//! event time, the fields each type requires, text that Postgres can store and
//! index, and non-negative amounts. It works
//! on whole columns and splits the batch with Arrow's `filter`, so one bad row
//! never fails or stalls the others. Decode-level reasons pass through unchanged.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringBuilder,
};
use datafusion::arrow::compute::filter;
use datafusion::arrow::datatypes::{Decimal128Type, TimestampMicrosecondType};
use datafusion::arrow::error::ArrowError;

use crate::event::{EventType, RejectReason, col, event_schema, reject_schema};

/// The configurable bounds of validation; part of [`crate::config`].
#[derive(Debug, Clone, Copy)]
pub struct ValidationRules {
    /// Events before this instant are rejected (`event_time_too_old`).
    pub min_event_time: DateTime<Utc>,
    /// Events further than this ahead of the wall clock are rejected (`event_time_in_future`).
    pub max_future: TimeDelta,
    /// Text fields longer than this many bytes are rejected (`field_too_long`).
    /// KPIs group by these fields, and the KPI tables' unique keys are b-tree
    /// entries, which Postgres caps at about 2.7 kB: a longer value would make it
    /// refuse the whole batch on every retry. See [`MAX_FIELD_BYTES_LIMIT`].
    pub max_field_bytes: usize,
}

/// The largest `max_field_bytes` accepted: three text group keys of this size
/// still fit one b-tree entry.
pub const MAX_FIELD_BYTES_LIMIT: usize = 800;

impl Default for ValidationRules {
    fn default() -> Self {
        ValidationRules {
            min_event_time: DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
                .expect("constant")
                .to_utc(),
            max_future: TimeDelta::hours(24),
            max_field_bytes: 256,
        }
    }
}

/// The two halves of a validated batch.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Rows in [`event_schema`].
    pub valid: RecordBatch,
    /// Rows in [`reject_schema`].
    pub rejects: RecordBatch,
}

/// Splits `batch` (in [`crate::event::decoded_schema`]) into valid rows and rejects.
/// `now` is passed in so that the future bound is testable and the same for the
/// whole batch.
pub fn validate(
    batch: &RecordBatch,
    rules: &ValidationRules,
    now: DateTime<Utc>,
) -> Result<Validated, ArrowError> {
    let n = batch.num_rows();
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("decoded batch lacks column {name}")))
    };
    let decode_reason = column(col::REASON)?.as_string::<i32>();
    let decode_detail = column(col::DETAIL)?.as_string::<i32>();
    let event_type = column(col::EVENT_TYPE)?.as_string::<i32>();
    let event_time = column(col::EVENT_TIME)?.as_primitive::<TimestampMicrosecondType>();
    let customer = column(col::CUSTOMER_ID)?;
    let session = column(col::SESSION_ID)?;
    let channel = column(col::CHANNEL)?;
    let tariff = column(col::TARIFF_TYPE)?;
    let energy = column(col::ENERGY_CONSUMED)?.as_primitive::<Decimal128Type>();
    let payment = column(col::PAYMENT_AMOUNT)?.as_primitive::<Decimal128Type>();

    let min_us = rules.min_event_time.timestamp_micros();
    // Checked: `max_future` comes from configuration, and a time beyond
    // chrono's range would panic on every batch.
    let max_us = now
        .checked_add_signed(rules.max_future)
        .map_or(i64::MAX, |t| t.timestamp_micros());
    let text = [
        (customer, col::CUSTOMER_ID),
        (channel, col::CHANNEL),
        (tariff, col::TARIFF_TYPE),
    ]
    .map(|(array, name)| TextColumn::new(array.as_string::<i32>(), name, rules.max_field_bytes));

    let mut keep = Vec::with_capacity(n);
    let mut reasons = StringBuilder::new();
    let mut details = StringBuilder::new();
    for i in 0..n {
        let verdict: Option<(RejectReason, String)> = if decode_reason.is_valid(i) {
            let reason = RejectReason::parse(decode_reason.value(i))
                .ok_or_else(|| ArrowError::InvalidArgumentError("unknown decode reason".into()))?;
            let detail = decode_detail.is_valid(i).then(|| decode_detail.value(i));
            Some((reason, detail.unwrap_or_default().to_string()))
        } else {
            check_row(
                i,
                event_type,
                event_time,
                [customer, session, channel],
                tariff,
                energy,
                payment,
                (min_us, max_us),
            )
            .or_else(|| text.iter().find_map(|t| t.check(i)))
        };
        keep.push(verdict.is_none());
        if let Some((reason, detail)) = verdict {
            reasons.append_value(reason.as_str());
            details.append_value(detail);
        }
    }

    let keep = BooleanArray::from(keep);
    let events = event_schema();
    let valid_columns = events
        .fields()
        .iter()
        .map(|f| filter(column(f.name())?, &keep))
        .collect::<Result<Vec<_>, _>>()?;
    let valid = RecordBatch::try_new(events, valid_columns)?;

    let drop = datafusion::arrow::compute::not(&keep)?;
    let reject_columns: Vec<ArrayRef> = vec![
        filter(column(col::PARTITION)?, &drop)?,
        filter(column(col::OFFSET)?, &drop)?,
        filter(column(col::KAFKA_TIMESTAMP)?, &drop)?,
        Arc::new(reasons.finish()),
        Arc::new(details.finish()),
        filter(column(col::RAW)?, &drop)?,
    ];
    let rejects = RecordBatch::try_new(reject_schema(), reject_columns)?;
    Ok(Validated { valid, rejects })
}

#[allow(clippy::too_many_arguments)]
fn check_row(
    i: usize,
    event_type: &datafusion::arrow::array::StringArray,
    event_time: &datafusion::arrow::array::TimestampMicrosecondArray,
    always: [&ArrayRef; 3],
    tariff: &ArrayRef,
    energy: &datafusion::arrow::array::Decimal128Array,
    payment: &datafusion::arrow::array::Decimal128Array,
    (min_us, max_us): (i64, i64),
) -> Option<(RejectReason, String)> {
    if event_type.is_null(i) {
        return Some((
            RejectReason::MissingEventType,
            "event_type is missing".into(),
        ));
    }
    let Some(kind) = EventType::parse(event_type.value(i)) else {
        return Some((
            RejectReason::UnknownEventType,
            "event_type is not one of the known event types".into(),
        ));
    };
    if event_time.is_null(i) {
        return Some((
            RejectReason::MissingEventTime,
            "event_time is missing".into(),
        ));
    }
    let t = event_time.value(i);
    if t < min_us {
        return Some((
            RejectReason::EventTimeTooOld,
            "event_time is before the configured minimum".into(),
        ));
    }
    if t > max_us {
        return Some((
            RejectReason::EventTimeInFuture,
            "event_time is too far in the future".into(),
        ));
    }
    for (array, name) in always
        .iter()
        .zip([col::CUSTOMER_ID, col::SESSION_ID, col::CHANNEL])
    {
        if array.is_null(i) {
            return Some(missing(name, kind));
        }
    }
    for &field in kind.extra_required() {
        let present = match field {
            col::TARIFF_TYPE => tariff.is_valid(i),
            col::ENERGY_CONSUMED => energy.is_valid(i),
            _ => payment.is_valid(i),
        };
        if !present {
            return Some(missing(field, kind));
        }
    }
    for (array, name) in [
        (energy, col::ENERGY_CONSUMED),
        (payment, col::PAYMENT_AMOUNT),
    ] {
        if array.is_valid(i) && array.value(i) < 0 {
            return Some((RejectReason::NegativeNumber, format!("{name} is negative")));
        }
    }
    None
}

/// A text column of the batch, scanned once for U+0000 and over-long values so
/// that clean batches (nearly all of them) skip the per-row checks.
struct TextColumn<'a> {
    array: &'a datafusion::arrow::array::StringArray,
    name: &'static str,
    max_bytes: usize,
    suspect: bool,
}

impl<'a> TextColumn<'a> {
    fn new(
        array: &'a datafusion::arrow::array::StringArray,
        name: &'static str,
        max_bytes: usize,
    ) -> Self {
        let offsets = array.value_offsets();
        let (first, last) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
        let suspect = array.value_data()[first..last].contains(&0)
            || offsets
                .windows(2)
                .any(|w| (w[1] - w[0]) as usize > max_bytes);
        TextColumn {
            array,
            name,
            max_bytes,
            suspect,
        }
    }

    /// Postgres `text` refuses U+0000 outright, so the row must not reach COPY.
    fn check(&self, i: usize) -> Option<(RejectReason, String)> {
        if !self.suspect || self.array.is_null(i) {
            return None;
        }
        let v = self.array.value(i);
        if v.contains('\0') {
            return Some((
                RejectReason::InvalidText,
                format!(
                    "payload.{} contains U+0000, which Postgres text cannot store",
                    self.name
                ),
            ));
        }
        (v.len() > self.max_bytes).then(|| {
            (
                RejectReason::FieldTooLong,
                format!(
                    "payload.{} is {} bytes, the limit is {}",
                    self.name,
                    v.len(),
                    self.max_bytes
                ),
            )
        })
    }
}

fn missing(field: &str, kind: EventType) -> (RejectReason, String) {
    (
        RejectReason::MissingField,
        format!("{kind} requires payload.{field}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{DecodeConfig, MessageMeta, decode_batch};

    fn decode(lines: &[&str]) -> RecordBatch {
        let msgs = lines.iter().enumerate().map(|(i, l)| {
            (
                Some(l.as_bytes()),
                MessageMeta {
                    partition: 1,
                    offset: i as i64,
                    timestamp_ms: None,
                },
            )
        });
        decode_batch(DecodeConfig::default(), msgs)
    }

    fn run(lines: &[&str]) -> Validated {
        let now = DateTime::parse_from_rfc3339("2025-06-10T00:00:00Z")
            .unwrap()
            .to_utc();
        validate(&decode(lines), &ValidationRules::default(), now).unwrap()
    }

    fn reasons(v: &Validated) -> Vec<String> {
        let r = v
            .rejects
            .column_by_name("reason")
            .unwrap()
            .as_string::<i32>();
        (0..r.len()).map(|i| r.value(i).to_string()).collect()
    }

    const OK: &str = r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal"}}"#;

    #[test]
    fn valid_events_pass_for_every_type() {
        let lines = [
            OK,
            r#"{"event_type":"user_logout","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"mobile_app"}}"#,
            r#"{"event_type":"view_tariffs","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal","tariff_type":"green"}}"#,
            r#"{"event_type":"tariff_switch","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal","tariff_type":"green","payment_amount":12.5}}"#,
            r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal","energy_consumed":0}}"#,
            r#"{"event_type":"incentive_claim","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"call_center","tariff_type":"premium"}}"#,
            r#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal","payment_amount":"20.5","unknown":{"x":1}}}"#,
        ];
        let v = run(&lines);
        assert_eq!(reasons(&v), Vec::<String>::new());
        assert_eq!(v.valid.num_rows(), 7);
        assert_eq!(v.valid.schema(), event_schema());
    }

    /// A whitespace-only customer_id, channel or tariff_type was stored as a
    /// value; it is a missing field.
    #[test]
    fn blank_required_text_is_missing() {
        let lines = [
            r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"  ","session_id":1,"channel":"web_portal"}}"#,
            r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"\t"}}"#,
            r#"{"event_type":"view_tariffs","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web_portal","tariff_type":" "}}"#,
            r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":" ","channel":"web_portal"}}"#,
        ];
        let v = run(&lines);
        assert_eq!(reasons(&v), vec!["missing_field"; 4]);
        assert_eq!(v.valid.num_rows(), 0);
    }

    #[test]
    fn every_validate_reject_reason() {
        let cases = [
            (
                r#"{"event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_event_type",
            ),
            (
                r#"{"event_type":"meter_exploded","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "unknown_event_type",
            ),
            (
                r#"{"event_type":"user_login","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_event_time",
            ),
            (
                r#"{"event_type":"user_login","event_time":"1999-12-31T23:59:59Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "event_time_too_old",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-11T00:00:01Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "event_time_in_future",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"","session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z"}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"view_tariffs","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"tariff_switch","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web","tariff_type":null}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"incentive_claim","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web"}}"#,
                "missing_field",
            ),
            (
                r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web","energy_consumed":-0.5}}"#,
                "negative_number",
            ),
            (
                r#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C1","session_id":1,"channel":"web","payment_amount":"-3"}}"#,
                "negative_number",
            ),
            (r#"["not", "an", "object"]"#, "not_object"),
        ];
        for (line, want) in cases {
            let v = run(&[OK, line, OK]);
            assert_eq!(reasons(&v), vec![want.to_string()], "line {line}");
            assert_eq!(
                v.valid.num_rows(),
                2,
                "the good rows around a bad one survive"
            );
            let off = v.rejects.column_by_name("kafka_offset").unwrap();
            assert_eq!(
                off.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .value(0),
                1
            );
            let raw = v.rejects.column_by_name("raw_payload").unwrap();
            assert_eq!(raw.as_binary::<i32>().value(0), line.as_bytes());
        }
    }

    #[test]
    fn bounds_are_configurable() {
        let decoded = decode(&[OK]);
        let now = DateTime::parse_from_rfc3339("2025-05-31T00:00:00Z")
            .unwrap()
            .to_utc();
        let strict = ValidationRules {
            max_future: TimeDelta::hours(1),
            ..ValidationRules::default()
        };
        let v = validate(&decoded, &strict, now).unwrap();
        assert_eq!(reasons(&v), vec!["event_time_in_future".to_string()]);
        let lenient = ValidationRules {
            max_future: TimeDelta::hours(48),
            ..ValidationRules::default()
        };
        assert_eq!(
            validate(&decoded, &lenient, now).unwrap().valid.num_rows(),
            1
        );
        let late = ValidationRules {
            min_event_time: now + TimeDelta::days(30),
            max_future: TimeDelta::days(365),
            ..ValidationRules::default()
        };
        let v = validate(&decoded, &late, now).unwrap();
        assert_eq!(reasons(&v), vec!["event_time_too_old".to_string()]);
        // Regression: a bound past chrono's range panicked on every batch.
        let unbounded = ValidationRules {
            max_future: TimeDelta::MAX,
            ..ValidationRules::default()
        };
        assert_eq!(
            validate(&decoded, &unbounded, now)
                .unwrap()
                .valid
                .num_rows(),
            1
        );
    }

    fn login(customer: &str, channel: &str, tariff: Option<&str>) -> String {
        let mut payload = serde_json::json!({
            "customer_id": customer, "session_id": 1, "channel": channel,
        });
        if let Some(t) = tariff {
            payload["tariff_type"] = t.into();
        }
        serde_json::json!({
            "event_type": "user_login", "event_time": "2025-06-01T00:00:00Z", "payload": payload,
        })
        .to_string()
    }

    /// Regression: a valid JSON string with `\u0000`, or a value too long for a
    /// b-tree entry, passed validation, and Postgres then refused the batch's
    /// COPY or KPI merge on every retry, stalling the partition for good.
    #[test]
    fn text_postgres_cannot_store_or_index_is_rejected() {
        let long = "x".repeat(257);
        let cases = [
            (login("C\u{0}1", "web", None), "invalid_text", "customer_id"),
            (login("C1", "web\u{0}", None), "invalid_text", "channel"),
            // tariff_type is optional for a login, and still stored
            (
                login("C1", "web", Some("\u{0}")),
                "invalid_text",
                "tariff_type",
            ),
            (login(&long, "web", None), "field_too_long", "customer_id"),
            (login("C1", &long, None), "field_too_long", "channel"),
            (
                login("C1", "web", Some(&long)),
                "field_too_long",
                "tariff_type",
            ),
            // the limit counts bytes, not characters: 129 × 2 bytes
            (
                login(&"é".repeat(129), "web", None),
                "field_too_long",
                "customer_id",
            ),
        ];
        for (line, want, field) in &cases {
            let v = run(&[OK, line, OK]);
            assert_eq!(reasons(&v), vec![want.to_string()], "line {line:?}");
            assert_eq!(v.valid.num_rows(), 2, "the good rows around it survive");
            let detail = v.rejects.column_by_name("detail").unwrap();
            let detail = detail.as_string::<i32>().value(0);
            assert!(detail.contains(field), "{detail}");
            assert!(
                !detail.contains('\u{0}'),
                "the detail never quotes the value"
            );
        }
        // At the limit is fine; so are control characters other than U+0000.
        let fine = [
            login(&"x".repeat(256), &"é".repeat(128), Some(&"y".repeat(256))),
            login("C\u{1}\t\u{1f}", "web", None),
        ];
        let v = run(&[fine[0].as_str(), fine[1].as_str()]);
        assert_eq!(reasons(&v), Vec::<String>::new());
        assert_eq!(v.valid.num_rows(), 2);
    }

    #[test]
    fn field_length_limit_is_configurable() {
        let decoded = decode(&[&login(&"x".repeat(300), "web", None)]);
        let now = DateTime::parse_from_rfc3339("2025-06-10T00:00:00Z")
            .unwrap()
            .to_utc();
        let wide = ValidationRules {
            max_field_bytes: 300,
            ..ValidationRules::default()
        };
        assert_eq!(validate(&decoded, &wide, now).unwrap().valid.num_rows(), 1);
        let narrow = ValidationRules {
            max_field_bytes: 299,
            ..ValidationRules::default()
        };
        let v = validate(&decoded, &narrow, now).unwrap();
        assert_eq!(reasons(&v), vec!["field_too_long".to_string()]);
    }
}
