//! The per-process memory of count(DISTINCT) members already stored.
//!
//! A distinct measure's merge inserts each (keys, member) pair of a batch into
//! the KPI's membership table and counts only the inserts that did not
//! conflict. A pair that an earlier *committed* batch stored would conflict,
//! so dropping it before the merge changes no number and saves its index
//! probe. That is most pairs of a daily funnel, whose day spans many batches.
//!
//! Only committed pairs are remembered ([`KnownMembers::remember`] after the
//! COMMIT), so the memory is never ahead of the tables. Another consumer's
//! pairs are simply not known here and conflict as before. Membership tables
//! only grow (a backfill rebuilds them from `events`, a superset of what was
//! committed), so nothing known becomes false while the database keeps what
//! it committed. The writer clears the memory on any database error or fence,
//! because a failover to a lagging replica can lose committed transactions.
//! The memory is bounded: at `cap` pairs it starts over.

use std::collections::{HashMap, HashSet};

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::row::{RowConverter, SortField};

use super::KpiDelta;

/// (KPI index, measure index).
type MeasureId = (usize, usize);

pub struct KnownMembers {
    sets: HashMap<MeasureId, HashSet<Box<[u8]>>>,
    converters: HashMap<MeasureId, RowConverter>,
    entries: usize,
    cap: usize,
}

/// Pairs a batch is about to store; remembered only once it commits.
#[derive(Default)]
pub struct Pending(Vec<(MeasureId, Vec<Box<[u8]>>)>);

impl KnownMembers {
    pub fn new(cap: usize) -> Self {
        KnownMembers {
            sets: HashMap::new(),
            converters: HashMap::new(),
            entries: 0,
            cap,
        }
    }

    /// How many pairs are remembered.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Drops the pairs known to be stored from every distinct measure of
    /// `deltas`, and returns the others, to [`KnownMembers::remember`] once
    /// the batch has committed.
    pub fn filter(&mut self, deltas: &mut [KpiDelta]) -> Result<Pending, ArrowError> {
        let mut pending = Pending::default();
        for d in deltas.iter_mut() {
            for (m, batch) in d.distinct.iter_mut() {
                if batch.num_rows() == 0 {
                    continue;
                }
                let id = (d.kpi, *m);
                let converter = match self.converters.get(&id) {
                    Some(c) => c,
                    None => {
                        let fields = batch
                            .schema()
                            .fields()
                            .iter()
                            .map(|f| SortField::new(f.data_type().clone()))
                            .collect();
                        self.converters.insert(id, RowConverter::new(fields)?);
                        &self.converters[&id]
                    }
                };
                let rows = converter.convert_columns(batch.columns())?;
                let known = self.sets.get(&id);
                let mut new = Vec::new();
                let keep: BooleanArray = rows
                    .iter()
                    .map(|r| {
                        let seen = known.is_some_and(|s| s.contains(r.as_ref()));
                        if !seen {
                            new.push(Box::from(r.as_ref()));
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
        self.sets.clear();
        self.entries = 0;
    }

    /// Remembers the pairs of a committed batch.
    pub fn remember(&mut self, pending: Pending) {
        let incoming: usize = pending.0.iter().map(|(_, v)| v.len()).sum();
        if self.entries + incoming > self.cap {
            tracing::debug!(
                pairs = self.entries,
                "known distinct members reached their cap; starting over"
            );
            self.clear();
        }
        for (id, rows) in pending.0 {
            let set = self.sets.entry(id).or_default();
            for r in rows {
                if set.insert(r) {
                    self.entries += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    fn pairs(rows: &[(i64, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Int64, true),
            Field::new("v", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap()
    }

    fn delta(rows: &[(i64, &str)]) -> Vec<KpiDelta> {
        vec![KpiDelta {
            kpi: 0,
            partial: RecordBatch::new_empty(Arc::new(Schema::empty())),
            distinct: vec![(1, pairs(rows))],
        }]
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
    fn starts_over_at_its_cap() {
        let mut k = KnownMembers::new(3);
        let mut d = delta(&[(1, "a"), (1, "b")]);
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        let mut d = delta(&[(1, "c"), (1, "d")]);
        let p = k.filter(&mut d).unwrap();
        k.remember(p);
        assert_eq!(k.len(), 2, "cleared, then the new pairs");
        let mut d = delta(&[(1, "a"), (1, "c")]);
        k.filter(&mut d).unwrap();
        assert_eq!(d[0].distinct[0].1, pairs(&[(1, "a")]));
    }
}
