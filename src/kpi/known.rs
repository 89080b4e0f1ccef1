//! The per-process memory of count(DISTINCT) members already stored.
//!
//! A membership set's merge upserts each (keys, member) row of a batch, with
//! its flags, into the KPI's membership table and counts only the flags that
//! were not stored yet. A row whose flags an earlier *committed* batch already
//! stored changes nothing there, so dropping it before the merge changes no
//! number and saves its index probe. That is most rows of a daily funnel,
//! whose day spans many batches.
//!
//! Only committed pairs are remembered ([`KnownMembers::remember`] after the
//! COMMIT), so the memory is never ahead of the tables. Another consumer's
//! pairs are simply not known here and conflict as before. Membership tables
//! only grow (a backfill rebuilds them from `events`, a superset of what was
//! committed), so nothing known becomes false while the database keeps what
//! it committed. The writer clears the memory on any database error or fence,
//! because a failover to a lagging replica can lose committed transactions.
//! The memory is bounded by `cap` pairs, kept as two generations: new pairs
//! go into the young one, and when it holds half the cap the old one is
//! dropped and the young one takes its place. Events arrive roughly in time
//! order, so the pairs that repeat are the recent ones, and those survive.

use std::collections::HashMap;

use datafusion::arrow::array::{AsArray, BooleanArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::Int32Type;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::row::{RowConverter, SortField};

use super::KpiDelta;

/// (KPI index, membership set index).
type MeasureId = (usize, usize);

/// Per set: (keys, member) in Arrow's row format → flags known stored.
type Generation = HashMap<MeasureId, HashMap<Box<[u8]>, i32>>;

pub struct KnownMembers {
    young: Generation,
    old: Generation,
    young_len: usize,
    old_len: usize,
    converters: HashMap<MeasureId, RowConverter>,
    cap: usize,
}

/// A (keys, member) row in Arrow's row format, with its flags.
type FlaggedRow = (Box<[u8]>, i32);

/// Rows a batch is about to store; remembered only once it commits.
#[derive(Default)]
pub struct Pending(Vec<(MeasureId, Vec<FlaggedRow>)>);

impl KnownMembers {
    pub fn new(cap: usize) -> Self {
        KnownMembers {
            young: HashMap::new(),
            old: HashMap::new(),
            young_len: 0,
            old_len: 0,
            converters: HashMap::new(),
            cap,
        }
    }

    /// How many pairs are remembered.
    pub fn len(&self) -> usize {
        self.young_len + self.old_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flags known stored for a (keys, member) row.
    fn known_flags(&self, id: &MeasureId, row: &[u8]) -> i32 {
        let flags = |g: &Generation| g.get(id).and_then(|s| s.get(row)).copied();
        flags(&self.young).unwrap_or(0) | flags(&self.old).unwrap_or(0)
    }

    /// Drops the rows whose flags are all known stored from every membership
    /// set of `deltas`, and returns the others, to [`KnownMembers::remember`]
    /// once the batch has committed. The flags are a set's last column.
    pub fn filter(&mut self, deltas: &mut [KpiDelta]) -> Result<Pending, ArrowError> {
        let mut pending = Pending::default();
        for d in deltas.iter_mut() {
            for (m, batch) in d.distinct.iter_mut() {
                if batch.num_rows() == 0 {
                    continue;
                }
                let id = (d.kpi, *m);
                let members = batch.num_columns() - 1;
                let converter = match self.converters.get(&id) {
                    Some(c) => c,
                    None => {
                        let fields = batch.schema().fields()[..members]
                            .iter()
                            .map(|f| SortField::new(f.data_type().clone()))
                            .collect();
                        self.converters.insert(id, RowConverter::new(fields)?);
                        &self.converters[&id]
                    }
                };
                let rows = converter.convert_columns(&batch.columns()[..members])?;
                let flags = batch
                    .column(members)
                    .as_primitive_opt::<Int32Type>()
                    .ok_or_else(|| ArrowError::SchemaError("flags are not Int32".into()))?;
                let mut new = Vec::new();
                let keep: BooleanArray = rows
                    .iter()
                    .zip(flags.iter())
                    .map(|(r, f)| {
                        let f = f.unwrap_or(0);
                        let seen = self.known_flags(&id, r.as_ref()) & f == f;
                        if !seen {
                            new.push((Box::from(r.as_ref()), f));
                        }
                        Some(!seen)
                    })
                    .collect();
                if new.len() < batch.num_rows() {
                    *batch = filter_record_batch(batch, &keep)?;
                }
                pending.0.push((id, new));
            }
        }
        Ok(pending)
    }

    /// Forgets everything (after a database error: see the module doc).
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.young_len = 0;
        self.old_len = 0;
    }

    /// Remembers the pairs of a committed batch. A batch larger than half the
    /// cap is remembered only in part.
    pub fn remember(&mut self, pending: Pending) {
        let half = self.cap / 2;
        let incoming: usize = pending.0.iter().map(|(_, v)| v.len()).sum();
        if self.young_len + incoming > half {
            self.old = std::mem::take(&mut self.young);
            self.old_len = std::mem::take(&mut self.young_len);
        }
        for (id, rows) in pending.0 {
            let set = self.young.entry(id).or_default();
            for (r, f) in rows {
                match set.get_mut(&r) {
                    Some(known) => *known |= f,
                    None if self.young_len < half => {
                        set.insert(r, f);
                        self.young_len += 1;
                    }
                    None => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    /// A set's rows: keys, member, flags.
    fn flagged(rows: &[(i64, &str, i32)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Int64, true),
            Field::new("v", DataType::Utf8, true),
            Field::new("f", DataType::Int32, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn pairs(rows: &[(i64, &str)]) -> RecordBatch {
        flagged(&rows.iter().map(|r| (r.0, r.1, 1)).collect::<Vec<_>>())
    }

    fn delta_of(batch: RecordBatch) -> Vec<KpiDelta> {
        vec![KpiDelta {
            kpi: 0,
            partial: RecordBatch::new_empty(Arc::new(Schema::empty())),
            distinct: vec![(1, batch)],
        }]
    }

    fn delta(rows: &[(i64, &str)]) -> Vec<KpiDelta> {
        delta_of(pairs(rows))
    }

    #[test]
    fn a_row_stays_while_it_brings_a_flag_not_known_stored() {
        let mut k = KnownMembers::new(100);
        let mut d = delta_of(flagged(&[(1, "a", 1)]));
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        // (1, a) now also passes measure 1's filter: it must reach the merge.
        let mut d = delta_of(flagged(&[(1, "a", 3), (1, "a", 1)]));
        let p = k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1, flagged(&[(1, "a", 3)]));
        k.remember(p);
        let mut d = delta_of(flagged(&[(1, "a", 2), (1, "a", 3)]));
        k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1.num_rows(), 0, "both flags are stored");
        assert_eq!(k.len(), 1, "one row, its flags merged");
    }

    #[test]
    fn drops_only_pairs_of_committed_batches() {
        let mut k = KnownMembers::new(100);
        let mut d = delta(&[(1, "a"), (1, "b")]);
        let pending = k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1.num_rows(), 2, "nothing known yet");
        // Not committed (rolled back, fenced): forgotten.
        drop(pending);
        let mut d = delta(&[(1, "a"), (1, "b")]);
        let pending = k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1.num_rows(), 2);
        k.remember(pending);
        assert_eq!(k.len(), 2);
        // Next batch: (1, a) is stored; (2, a) and (1, c) are not.
        let mut d = delta(&[(1, "a"), (2, "a"), (1, "c")]);
        let pending = k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1, pairs(&[(2, "a"), (1, "c")]));
        k.remember(pending);
        assert_eq!(k.len(), 4);
    }

    #[test]
    fn measures_do_not_share_their_memory() {
        let mut k = KnownMembers::new(100);
        let mut d = delta(&[(1, "a")]);
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        let mut other = delta(&[(1, "a")]);
        other[0].distinct[0].0 = 2;
        k.filter(&mut other).unwrap();
        assert_eq!(other[0].distinct[0].1.num_rows(), 1);
    }

    #[test]
    fn keeps_the_recent_pairs_within_its_cap() {
        let mut k = KnownMembers::new(4);
        for rows in [[(1, "a"), (1, "b")], [(2, "a"), (2, "b")]] {
            let mut d = delta(&rows);
            let p = k.filter(&mut d).unwrap();
            k.remember(p);
        }
        assert_eq!(k.len(), 4, "two generations of two");
        let mut d = delta(&[(3, "a"), (3, "b")]);
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        assert_eq!(k.len(), 4, "the oldest generation went");
        let mut d = delta(&[(1, "a"), (2, "a"), (3, "b")]);
        k.filter(&mut d).unwrap();
        assert_eq!(
            d[0].distinct[0].1,
            pairs(&[(1, "a")]),
            "the oldest pairs are forgotten, the recent ones known"
        );
    }

    #[test]
    fn a_batch_larger_than_half_the_cap_stays_within_it() {
        let mut k = KnownMembers::new(4);
        let mut d = delta(&[(1, "a"), (1, "b"), (1, "c"), (1, "d"), (1, "e")]);
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        assert!(k.len() <= 4, "{} pairs remembered", k.len());
        assert!(!k.is_empty());
    }
}
