//! decode + validate must never panic, whatever the bytes: a proptest over
//! arbitrary bytes and over mutated valid events, in batches, with a fixed
//! case count so CI time is bounded (raise PROPTEST_CASES to search longer).

use energy_stream::decode::{DecodeConfig, MessageMeta, decode_batch};
use energy_stream::validate::{ValidationRules, validate};
use proptest::prelude::*;

const VALID: &str = r#"{"event_type":"bill_payment","event_time":"2025-06-03T10:00:00+05:45","payload":{"customer_id":"C1","session_id":7,"channel":"web_portal","tariff_type":"green","energy_consumed":1.5,"payment_amount":12.34}}"#;

fn check(messages: &[Option<Vec<u8>>]) {
    let batch = decode_batch(
        DecodeConfig {
            max_message_bytes: 4096,
        },
        messages.iter().enumerate().map(|(i, m)| {
            (
                m.as_deref(),
                MessageMeta {
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: None,
                },
            )
        }),
    );
    assert_eq!(batch.num_rows(), messages.len());
    let v = validate(&batch, &ValidationRules::default(), chrono::Utc::now()).unwrap();
    assert_eq!(
        v.valid.num_rows() + v.rejects.num_rows(),
        messages.len(),
        "every message is either valid or rejected"
    );
}

/// A valid event with a few bytes overwritten, inserted or removed.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (proptest::collection::vec(
        (0..VALID.len(), any::<u8>(), 0u8..3),
        1..6,
    ),)
        .prop_map(|(edits,)| {
            let mut v = VALID.as_bytes().to_vec();
            for (at, byte, op) in edits {
                let at = at.min(v.len().saturating_sub(1));
                match op {
                    0 => v[at] = byte,
                    1 => v.insert(at, byte),
                    _ => {
                        v.remove(at);
                    }
                }
                if v.is_empty() {
                    v.push(byte);
                }
            }
            v
        })
}

fn message() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        3 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
        3 => "[ -~]{0,200}".prop_map(|s| Some(s.into_bytes())),
        6 => mutated().prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(5000)
    ))]

    #[test]
    fn decode_and_validate_never_panic(messages in proptest::collection::vec(message(), 1..40)) {
        check(&messages);
    }
}
