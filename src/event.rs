//! The event contract shared by every stage: the event types, the Arrow schemas
//! that travel between stages, and the stable reject reasons.
//!
//! Three schemas exist, one per stage boundary:
//! - [`decoded_schema`]: what `decode` produces, one row per Kafka message, typed
//!   but not yet judged, with the decode-level reject reason and the raw bytes;
//! - [`event_schema`]: the valid rows that `validate` lets through. It is also
//!   the `events` table that KPI SQL sees, and it mirrors the Postgres `events` table;
//! - [`reject_schema`]: the rejects, each with its reason and raw payload.

use std::fmt;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Postgres `numeric(10,3)`: kWh.
pub const ENERGY_PRECISION: u8 = 10;
pub const ENERGY_SCALE: i8 = 3;
/// Postgres `numeric(10,2)`: EUR.
pub const MONEY_PRECISION: u8 = 10;
pub const MONEY_SCALE: i8 = 2;

/// The event types the retailer emits. Anything else is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    UserLogin,
    UserLogout,
    ViewTariffs,
    TariffSwitch,
    EnergyConsumed,
    IncentiveClaim,
    BillPayment,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::UserLogin,
        EventType::UserLogout,
        EventType::ViewTariffs,
        EventType::TariffSwitch,
        EventType::EnergyConsumed,
        EventType::IncentiveClaim,
        EventType::BillPayment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UserLogin => "user_login",
            EventType::UserLogout => "user_logout",
            EventType::ViewTariffs => "view_tariffs",
            EventType::TariffSwitch => "tariff_switch",
            EventType::EnergyConsumed => "energy_consumed",
            EventType::IncentiveClaim => "incentive_claim",
            EventType::BillPayment => "bill_payment",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Payload fields this type needs on top of customer_id, session_id and channel.
    pub fn extra_required(self) -> &'static [&'static str] {
        match self {
            EventType::ViewTariffs | EventType::TariffSwitch | EventType::IncentiveClaim => {
                &["tariff_type"]
            }
            EventType::EnergyConsumed => &["energy_consumed"],
            EventType::BillPayment => &["payment_amount"],
            EventType::UserLogin | EventType::UserLogout => &[],
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message was rejected. The short names are stable: they are stored in
/// `rejected_events.reason`, used as the `reason` metric label and documented in
/// the README, so renaming one is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Zero-length message value.
    Empty,
    /// Kafka tombstone: the message has no value at all.
    Tombstone,
    /// Larger than the configured message size limit.
    TooLarge,
    /// The bytes are not UTF-8.
    NotUtf8,
    /// Not parseable as JSON: syntax error, duplicate key, nesting too deep, trailing data.
    InvalidJson,
    /// Valid JSON, but the message or its `payload` is not an object.
    NotObject,
    /// A field has the wrong JSON type, e.g. a numeric `customer_id` or `session_id: "s-1"`.
    InvalidType,
    /// `event_type` is absent or null.
    MissingEventType,
    /// `event_type` is not one of the seven known types.
    UnknownEventType,
    /// `event_time` is absent or null.
    MissingEventTime,
    /// `event_time` is not an ISO-8601 date-time.
    InvalidEventTime,
    /// `event_time` is before the configured lower bound (default 2000-01-01).
    EventTimeTooOld,
    /// `event_time` is further ahead of now than allowed (default 24 h).
    EventTimeInFuture,
    /// A field required for the event type is absent, null or an empty string.
    MissingField,
    /// A number field holds a non-numeric string or a non-number.
    InvalidNumber,
    /// A number is NaN or infinite.
    NonFiniteNumber,
    /// A number is negative.
    NegativeNumber,
    /// A number does not fit the column (numeric(10,3) for energy, numeric(10,2) for money).
    NumberOutOfRange,
    /// A text field holds U+0000, which Postgres `text` cannot store.
    InvalidText,
    /// A text field is longer than the configured limit (default 256 bytes).
    FieldTooLong,
}

impl RejectReason {
    pub const ALL: [RejectReason; 20] = [
        RejectReason::Empty,
        RejectReason::Tombstone,
        RejectReason::TooLarge,
        RejectReason::NotUtf8,
        RejectReason::InvalidJson,
        RejectReason::NotObject,
        RejectReason::InvalidType,
        RejectReason::MissingEventType,
        RejectReason::UnknownEventType,
        RejectReason::MissingEventTime,
        RejectReason::InvalidEventTime,
        RejectReason::EventTimeTooOld,
        RejectReason::EventTimeInFuture,
        RejectReason::MissingField,
        RejectReason::InvalidNumber,
        RejectReason::NonFiniteNumber,
        RejectReason::NegativeNumber,
        RejectReason::NumberOutOfRange,
        RejectReason::InvalidText,
        RejectReason::FieldTooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Tombstone => "tombstone",
            RejectReason::TooLarge => "too_large",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotObject => "not_object",
            RejectReason::InvalidType => "invalid_type",
            RejectReason::MissingEventType => "missing_event_type",
            RejectReason::UnknownEventType => "unknown_event_type",
            RejectReason::MissingEventTime => "missing_event_time",
            RejectReason::InvalidEventTime => "invalid_event_time",
            RejectReason::EventTimeTooOld => "event_time_too_old",
            RejectReason::EventTimeInFuture => "event_time_in_future",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidNumber => "invalid_number",
            RejectReason::NonFiniteNumber => "non_finite_number",
            RejectReason::NegativeNumber => "negative_number",
            RejectReason::NumberOutOfRange => "number_out_of_range",
            RejectReason::InvalidText => "invalid_text",
            RejectReason::FieldTooLong => "field_too_long",
        }
    }

    pub fn parse(s: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Column names, shared by the Arrow schemas, the COPY statements and the SQL tables.
pub mod col {
    pub const PARTITION: &str = "kafka_partition";
    pub const OFFSET: &str = "kafka_offset";
    pub const KAFKA_TIMESTAMP: &str = "kafka_timestamp";
    pub const EVENT_TYPE: &str = "event_type";
    pub const EVENT_TIME: &str = "event_time";
    pub const CUSTOMER_ID: &str = "customer_id";
    pub const SESSION_ID: &str = "session_id";
    pub const CHANNEL: &str = "channel";
    pub const TARIFF_TYPE: &str = "tariff_type";
    pub const ENERGY_CONSUMED: &str = "energy_consumed";
    pub const PAYMENT_AMOUNT: &str = "payment_amount";
    pub const REASON: &str = "reason";
    pub const DETAIL: &str = "detail";
    pub const RAW: &str = "raw_payload";
}

fn ts_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn kafka_fields() -> [Field; 3] {
    [
        Field::new(col::PARTITION, DataType::Int32, false),
        Field::new(col::OFFSET, DataType::Int64, false),
        Field::new(col::KAFKA_TIMESTAMP, ts_micros(), true),
    ]
}

fn event_fields(required_not_null: bool) -> Vec<Field> {
    let req = !required_not_null;
    vec![
        Field::new(col::EVENT_TYPE, DataType::Utf8, req),
        Field::new(col::EVENT_TIME, ts_micros(), req),
        Field::new(col::CUSTOMER_ID, DataType::Utf8, req),
        Field::new(col::SESSION_ID, DataType::Int64, req),
        Field::new(col::CHANNEL, DataType::Utf8, req),
        Field::new(col::TARIFF_TYPE, DataType::Utf8, true),
        Field::new(
            col::ENERGY_CONSUMED,
            DataType::Decimal128(ENERGY_PRECISION, ENERGY_SCALE),
            true,
        ),
        Field::new(
            col::PAYMENT_AMOUNT,
            DataType::Decimal128(MONEY_PRECISION, MONEY_SCALE),
            true,
        ),
    ]
}

static DECODED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = kafka_fields().into();
    fields.extend(event_fields(false));
    fields.push(Field::new(col::REASON, DataType::Utf8, true));
    fields.push(Field::new(col::DETAIL, DataType::Utf8, true));
    fields.push(Field::new(col::RAW, DataType::Binary, true));
    Arc::new(Schema::new(fields))
});

static EVENTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = kafka_fields().into();
    fields.extend(event_fields(true));
    Arc::new(Schema::new(fields))
});

static REJECTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = kafka_fields().into();
    fields.push(Field::new(col::REASON, DataType::Utf8, false));
    fields.push(Field::new(col::DETAIL, DataType::Utf8, true));
    fields.push(Field::new(col::RAW, DataType::Binary, true));
    Arc::new(Schema::new(fields))
});

/// One row per consumed message, as decoded. Event columns are null where the
/// message lacked them or could not be decoded; `reason` is set when decoding
/// already knows the row is bad.
pub fn decoded_schema() -> SchemaRef {
    DECODED.clone()
}

/// Valid events: the Postgres `events` table and the `events` table of KPI SQL.
pub fn event_schema() -> SchemaRef {
    EVENTS.clone()
}

/// Rejected messages with reason, detail and the raw bytes (null for tombstones).
pub fn reject_schema() -> SchemaRef {
    REJECTS.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(EventType::parse("meter_exploded"), None);
    }

    #[test]
    fn event_schema_is_decoded_schema_prefix() {
        let d = decoded_schema();
        let e = event_schema();
        for (i, f) in e.fields().iter().enumerate() {
            assert_eq!(d.field(i).name(), f.name());
            assert_eq!(d.field(i).data_type(), f.data_type());
        }
    }
}
