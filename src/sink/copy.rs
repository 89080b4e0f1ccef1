//! COPY BINARY encoding straight from Arrow arrays.
//!
//! `BinaryCopyInWriter` would need a `ToSql` value per cell; writing the wire
//! format from the column buffers avoids that per-cell boxing. The encoder is
//! driven by the Arrow data type, so the KPI staging tables reuse it.

use bytes::{BufMut, BytesMut};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float64Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType,
};

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Where the first row starts in [`encode_batch`]'s output.
pub const HEADER_LEN: usize = HEADER.len();

#[derive(Debug, thiserror::Error)]
#[error("column {column} has Arrow type {data_type}, which has no COPY encoding")]
pub struct UnsupportedType {
    pub column: String,
    pub data_type: DataType,
}

enum Col<'a> {
    I32(&'a datafusion::arrow::array::Int32Array),
    I64(&'a datafusion::arrow::array::Int64Array),
    F64(&'a datafusion::arrow::array::Float64Array),
    Bool(&'a datafusion::arrow::array::BooleanArray),
    Text(&'a datafusion::arrow::array::StringArray),
    TextView(&'a datafusion::arrow::array::StringViewArray),
    Bytes(&'a datafusion::arrow::array::BinaryArray),
    TsMicros(&'a datafusion::arrow::array::TimestampMicrosecondArray),
    Date(&'a datafusion::arrow::array::Date32Array),
    Numeric(&'a datafusion::arrow::array::Decimal128Array, u16),
}

fn col<'a>(name: &str, a: &'a ArrayRef) -> Result<Col<'a>, UnsupportedType> {
    Ok(match a.data_type() {
        DataType::Int32 => Col::I32(a.as_primitive::<Int32Type>()),
        DataType::Int64 => Col::I64(a.as_primitive::<Int64Type>()),
        DataType::Float64 => Col::F64(a.as_primitive::<Float64Type>()),
        DataType::Boolean => Col::Bool(a.as_boolean()),
        DataType::Utf8 => Col::Text(a.as_string::<i32>()),
        DataType::Utf8View => Col::TextView(a.as_string_view()),
        DataType::Binary => Col::Bytes(a.as_binary::<i32>()),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Col::TsMicros(a.as_primitive::<TimestampMicrosecondType>())
        }
        DataType::Date32 => Col::Date(a.as_primitive::<Date32Type>()),
        DataType::Decimal128(_, s) if *s >= 0 => {
            Col::Numeric(a.as_primitive::<Decimal128Type>(), *s as u16)
        }
        other => {
            return Err(UnsupportedType {
                column: name.to_string(),
                data_type: other.clone(),
            });
        }
    })
}

/// Appends the whole COPY BINARY stream (header, rows, trailer) for `batch`.
pub fn encode_batch(batch: &RecordBatch, out: &mut BytesMut) -> Result<(), UnsupportedType> {
    let schema = batch.schema();
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(a, f)| col(f.name(), a))
        .collect::<Result<Vec<_>, _>>()?;
    out.reserve(HEADER.len() + batch.num_rows() * (2 + cols.len() * 12) + 2);
    out.put_slice(HEADER);
    let nfields = cols.len() as i16;
    for row in 0..batch.num_rows() {
        out.put_i16(nfields);
        for c in &cols {
            encode_cell(c, row, out);
        }
    }
    out.put_i16(-1);
    Ok(())
}

fn encode_cell(c: &Col<'_>, i: usize, out: &mut BytesMut) {
    macro_rules! nullable {
        ($arr:expr, $body:expr) => {
            if $arr.is_null(i) {
                out.put_i32(-1);
            } else {
                $body
            }
        };
    }
    match c {
        Col::I32(a) => nullable!(a, {
            out.put_i32(4);
            out.put_i32(a.value(i));
        }),
        Col::I64(a) => nullable!(a, {
            out.put_i32(8);
            out.put_i64(a.value(i));
        }),
        Col::F64(a) => nullable!(a, {
            out.put_i32(8);
            out.put_f64(a.value(i));
        }),
        Col::Bool(a) => nullable!(a, {
            out.put_i32(1);
            out.put_u8(u8::from(a.value(i)));
        }),
        Col::Text(a) => nullable!(a, put_bytes(out, a.value(i).as_bytes())),
        Col::TextView(a) => nullable!(a, put_bytes(out, a.value(i).as_bytes())),
        Col::Bytes(a) => nullable!(a, put_bytes(out, a.value(i))),
        Col::TsMicros(a) => nullable!(a, {
            out.put_i32(8);
            out.put_i64(a.value(i) - PG_EPOCH_OFFSET_US);
        }),
        Col::Date(a) => nullable!(a, {
            out.put_i32(4);
            out.put_i32(a.value(i) - PG_EPOCH_OFFSET_DAYS);
        }),
        Col::Numeric(a, scale) => nullable!(a, put_numeric(out, a.value(i), *scale)),
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_i32(b.len() as i32);
    out.put_slice(b);
}

/// Postgres `numeric` binary form: base-10000 digits with a weight (position of
/// the first digit group relative to the decimal point), a sign and the display scale.
pub fn put_numeric(out: &mut BytesMut, unscaled: i128, scale: u16) {
    let negative = unscaled < 0;
    let abs = unscaled.unsigned_abs();
    let pow = 10u128.pow(u32::from(scale));
    let (int, frac) = (abs / pow, abs % pow);
    // Fraction digits padded on the right to whole groups of four.
    let frac_groups = usize::from(scale).div_ceil(4);
    let frac = frac * 10u128.pow((frac_groups * 4 - usize::from(scale)) as u32);

    let mut int_digits: Vec<i16> = Vec::new();
    let mut x = int;
    while x > 0 {
        int_digits.push((x % 10_000) as i16);
        x /= 10_000;
    }
    int_digits.reverse();
    let mut frac_digits = vec![0i16; frac_groups];
    let mut f = frac;
    for d in frac_digits.iter_mut().rev() {
        *d = (f % 10_000) as i16;
        f /= 10_000;
    }
    let mut weight = int_digits.len() as i16 - 1;
    let mut digits: Vec<i16> = int_digits;
    digits.extend(frac_digits);
    // Normalise as Postgres does: no leading or trailing zero groups.
    let lead = digits.iter().take_while(|&&d| d == 0).count();
    digits.drain(..lead);
    weight -= lead as i16;
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    let len = 8 + 2 * digits.len();
    out.put_i32(len as i32);
    out.put_i16(digits.len() as i16);
    out.put_i16(weight);
    out.put_u16(if negative && !digits.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(scale);
    for d in digits {
        out.put_i16(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(unscaled: i128, scale: u16) -> Vec<i16> {
        let mut b = BytesMut::new();
        put_numeric(&mut b, unscaled, scale);
        b[4..]
            .chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn numeric_wire_format() {
        // 20.50 → digits [20, 5000], weight 0, scale 2
        assert_eq!(numeric(2050, 2), vec![2, 0, 0, 2, 20, 5000]);
        // 0.005 (scale 3) → [50] at weight -1
        assert_eq!(numeric(5, 3), vec![1, -1, 0, 3, 50]);
        // 12345678.9 (scale 1) → [1234, 5678, 9000], weight 1
        assert_eq!(numeric(123_456_789, 1), vec![3, 1, 0, 1, 1234, 5678, 9000]);
        // 0 → no digits
        assert_eq!(numeric(0, 2), vec![0, 0, 0, 2]);
        // -1.000 → [1], negative
        assert_eq!(numeric(-1000, 3), vec![1, 0, 0x4000, 3, 1]);
        // 10000 → [1], weight 1 (trailing zero group dropped)
        assert_eq!(numeric(10_000, 0), vec![1, 1, 0, 0, 1]);
    }
}
