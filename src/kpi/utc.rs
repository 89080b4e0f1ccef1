//! `date_trunc` over UTC timestamps at DataFusion's own fast speed.
//!
//! `event_time` is a UTC timestamp (`Timestamp(µs, "UTC")`). DataFusion 55
//! truncates any timestamp that carries a time zone value by value through
//! chrono, and builds (and drops) an error message for every value on the way
//! (apache/datafusion#25325). That was 30% of the pipeline's own CPU time in
//! the 1 M-event bench: every shipped KPI groups by `date_trunc`.
//!
//! In UTC, local time is UTC time, so truncating the same values without the
//! zone gives the same instants: this wrapper hands DataFusion's `date_trunc`
//! the array relabelled as zone-less (its array fast path), then puts the zone
//! back. Everything else (other zones, scalars, times) goes to DataFusion's
//! function unchanged, as do the signature, the return type and the ordering
//! rules, so plans and results are DataFusion's.

use datafusion::arrow::array::{Array, make_array};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::Result;
use datafusion::functions::datetime::date_trunc::DateTruncFunc;
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};

/// DataFusion's `date_trunc`, with UTC arrays sent down its zone-less path.
#[derive(Debug, PartialEq, Eq, Hash, Default)]
pub struct UtcDateTrunc {
    inner: DateTruncFunc,
}

/// The function to register in place of DataFusion's `date_trunc`.
pub fn date_trunc() -> ScalarUDF {
    ScalarUDF::new_from_impl(UtcDateTrunc::default())
}

/// Zone names that mean UTC itself (not a zone that is at +00:00 only in
/// winter, like Europe/London).
pub(crate) fn is_utc(tz: &str) -> bool {
    matches!(
        tz,
        "UTC" | "utc" | "Etc/UTC" | "Z" | "+00:00" | "+0000" | "+00" | "-00:00"
    )
}

impl ScalarUDFImpl for UtcDateTrunc {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn output_ordering(&self, input: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(input)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let utc = match args.args.get(1) {
            Some(ColumnarValue::Array(a)) => match a.data_type() {
                DataType::Timestamp(unit, Some(tz)) if is_utc(tz) => Some((*unit, tz.clone())),
                _ => None,
            },
            _ => None,
        };
        let Some((unit, tz)) = utc else {
            return self.inner.invoke_with_args(args);
        };
        let ColumnarValue::Array(a) = &args.args[1] else {
            unreachable!("matched above")
        };
        // The same buffers under the zone-less type: no copy, no conversion.
        let naive = a
            .to_data()
            .into_builder()
            .data_type(DataType::Timestamp(unit, None))
            .build()?;
        args.args[1] = ColumnarValue::Array(make_array(naive));
        match self.inner.invoke_with_args(args)? {
            ColumnarValue::Array(out) => {
                let data = out
                    .to_data()
                    .into_builder()
                    .data_type(DataType::Timestamp(unit, Some(tz)))
                    .build()?;
                Ok(ColumnarValue::Array(make_array(data)))
            }
            scalar => Ok(scalar),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::TimestampMicrosecondType;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Runs `date_trunc(g, t)` over `values` (µs since the epoch, zone `tz`),
    /// with the built-in function or with this one.
    fn trunc(values: &[Option<i64>], g: &str, tz: &str, ours: bool) -> Vec<Option<i64>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = SessionContext::new();
            if ours {
                ctx.register_udf(date_trunc());
            }
            let a = TimestampMicrosecondArray::from(values.to_vec()).with_timezone(tz);
            let batch = datafusion::arrow::record_batch::RecordBatch::try_from_iter(vec![(
                "t",
                Arc::new(a) as Arc<dyn Array>,
            )])
            .unwrap();
            ctx.register_batch("e", batch).unwrap();
            let out = ctx
                .sql(&format!("SELECT date_trunc('{g}', t) AS d FROM e"))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let mut v = Vec::new();
            for b in out {
                let col = b.column(0);
                assert_eq!(
                    col.data_type(),
                    &DataType::Timestamp(
                        datafusion::arrow::datatypes::TimeUnit::Microsecond,
                        Some(tz.into())
                    ),
                    "the zone is kept"
                );
                v.extend(col.as_primitive::<TimestampMicrosecondType>().iter());
            }
            v
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Same instants as DataFusion's own function, for every granularity,
        /// before and after 1970, with NULLs.
        #[test]
        fn utc_truncation_equals_datafusions(
            values in prop::collection::vec(
                prop::option::weighted(0.9, -4_000_000_000_000_000i64..4_000_000_000_000_000),
                1..40,
            ),
            g in prop::sample::select(vec![
                "microsecond", "millisecond", "second", "minute", "hour", "day",
                "week", "month", "quarter", "year",
            ]),
        ) {
            prop_assert_eq!(trunc(&values, g, "UTC", true), trunc(&values, g, "UTC", false));
        }
    }

    #[test]
    fn other_zones_go_to_datafusion_unchanged() {
        // 2025-03-30 00:30 UTC is 01:30 in Paris (+01:00), the day DST starts.
        let v = [Some(1_743_294_600_000_000i64)];
        assert_eq!(
            trunc(&v, "day", "Europe/Paris", true),
            trunc(&v, "day", "Europe/Paris", false)
        );
        assert_ne!(
            trunc(&v, "day", "Europe/Paris", true),
            trunc(&v, "day", "UTC", true),
            "Paris's day starts at 23:00 UTC the day before"
        );
    }
}
