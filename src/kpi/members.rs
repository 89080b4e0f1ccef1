//! Exact count(DISTINCT): which members a batch adds to each group.
//!
//! This module owns the membership sets of the count(DISTINCT) measures
//! ([`super::plan::MemberSet`]): the log `kpi_members_<kpi>_s<i>` in Postgres
//! and this process's memory of it.
//!
//! The log is append-only, one row per (group, batch): the group's keys, the
//! generation of the batch that wrote it, and the members that batch added
//! with their new flags, packed in one `bytea`. It has no unique index on the
//! members, so a new member costs a few bytes rather than a b-tree entry and
//! an upsert (5–10 µs each, most of a batch's time in Postgres before). The
//! decision "is this member new?" is taken here instead, against the memory.
//!
//! The memory is exact because the writers of a KPI are serialised: the batch
//! transaction increments `kpi_registry.member_gen`, which locks the KPI's
//! row until COMMIT, and its log rows carry that generation. If the previous
//! generation is the one the memory reflects, nobody else wrote; if it is
//! further on, the log rows in between (another consumer's) are read in
//! first; if it went back, or `member_epoch` changed (a backfill rebuilt the
//! KPI), the memory of that KPI starts over. A group that is not in memory is
//! read from the log whole. Only committed batches enter the memory
//! ([`Memberships::commit`]): a batch whose COMMIT fails, or is in doubt,
//! leaves the memory one generation behind, and the next batch reads it back.
//! The pipeline also clears the memory on any database error, since a
//! failover to a lagging replica can lose committed transactions.
//!
//! The memory is bounded: past `cap` members, the least recently used groups
//! are dropped, and read back from the log when a batch touches them again.
//! Events arrive roughly in time order, so the groups that go are the past
//! hours and days.
//!
//! Members and keys are compared in their COPY BINARY encoding, which is the
//! Postgres value's binary form: equal values of one column type have equal
//! bytes, and NULL differs from every value.

use std::sync::Mutex;

use bytes::BytesMut;
use datafusion::arrow::array::RecordBatch;
// hashbrown with foldhash: these maps hash every member of every batch.
use datafusion::common::HashMap;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;
use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use super::plan::KpiDef;
use crate::sink::SinkError;
use crate::sink::copy;

type Bytes = Box<[u8]>;

/// One group's members: their COPY fields back to back in one arena, and a
/// hash table of (offset, flags). A group is two allocations, whatever its
/// size, so holding it is compact and dropping it is cheap.
struct Group {
    arena: Vec<u8>,
    index: HashTable<(u32, i32)>,
    hasher: DefaultHashBuilder,
    /// The batch that last touched it, for eviction.
    used: u64,
}

impl Group {
    fn new(used: u64) -> Self {
        Group {
            arena: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            used,
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// The member stored at `offset` (a COPY field, its length word included).
    fn member(arena: &[u8], offset: u32) -> &[u8] {
        let at = offset as usize;
        &arena[at..at + field_len(&arena[at..])]
    }

    /// The flags stored for `m`, 0 when it is not a member.
    fn flags(&self, m: &[u8]) -> i32 {
        let h = self.hasher.hash_one(m);
        self.index
            .find(h, |&(o, _)| Self::member(&self.arena, o) == m)
            .map_or(0, |&(_, f)| f)
    }

    /// Adds `m` with flags `f` (OR-ed into a member's); true if `m` is new.
    fn add(&mut self, m: &[u8], f: i32) -> bool {
        let h = self.hasher.hash_one(m);
        let arena = &self.arena;
        if let Some((_, known)) = self
            .index
            .find_mut(h, |&(o, _)| Self::member(arena, o) == m)
        {
            *known |= f;
            return false;
        }
        let offset = u32::try_from(self.arena.len()).expect("a group's members fit in 4 GiB");
        self.arena.extend_from_slice(m);
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.index.insert_unique(h, (offset, f), |&(o, _)| {
            hasher.hash_one(Self::member(arena, o))
        });
        true
    }
}

/// What this process knows of one KPI's sets, as of generation `generation`.
struct KpiMem {
    epoch: i64,
    generation: i64,
    /// Per set: group keys (COPY fields) → members. A group that is present
    /// is complete as of `generation`.
    sets: Vec<HashMap<Bytes, Group>>,
}

#[derive(Default)]
struct Inner {
    kpis: HashMap<String, KpiMem>,
    /// Members held, over every group.
    total: usize,
    tick: u64,
}

impl Inner {
    fn forget(&mut self, kpi: &str) {
        if let Some(m) = self.kpis.remove(kpi) {
            self.total -= m
                .sets
                .iter()
                .flat_map(|s| s.values())
                .map(Group::len)
                .sum::<usize>();
        }
    }
}

/// This process's memory of the membership logs, bounded by `cap` members.
pub struct Memberships {
    inner: Mutex<Inner>,
    cap: usize,
}

/// The members a batch adds, per KPI; they enter the memory once it commits.
#[derive(Default)]
pub struct Pending(Vec<PendingKpi>);

struct PendingKpi {
    kpi: String,
    epoch: i64,
    /// The generation the batch found, and the one it wrote.
    prev: i64,
    generation: i64,
    /// Per set: each group with its new members.
    sets: Vec<(usize, Vec<GroupAdds>)>,
}

/// A group and the members a batch adds to it, with their new flags.
type GroupAdds = (Bytes, Vec<(Bytes, i32)>);

/// How a writer of the log knows that nobody else writes.
#[derive(Debug, Clone, Copy)]
pub enum Writers {
    /// Consumers: lock and advance `kpi_registry.member_gen`.
    Shared,
    /// A backfill into fresh tables: the only writer; it numbers its chunks.
    Exclusive { generation: i64 },
}

/// A batch's new members for one KPI: per group keys (COPY fields), the count
/// each distinct measure adds.
pub type Counts = HashMap<Bytes, Vec<i64>>;

impl Memberships {
    pub fn new(cap: usize) -> Self {
        Memberships {
            inner: Mutex::new(Inner::default()),
            cap,
        }
    }

    /// Members held in memory.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything; the logs are read back as batches need them.
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned memory is still a
        // consistent one, at worst missing groups, which are read back.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in what a committed batch added, then drops the least recently
    /// used groups if the memory is over its cap.
    pub fn commit(&self, pending: Pending) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for p in pending.0 {
            let Some(mem) = inner.kpis.get_mut(&p.kpi) else {
                continue;
            };
            // Cleared or overtaken since: the log holds the batch, and the
            // next batch reads it back.
            if mem.epoch != p.epoch || mem.generation != p.prev {
                continue;
            }
            for (s, groups) in p.sets {
                for (grp, new) in groups {
                    // A group not held stays unknown and is read whole later.
                    let Some(g) = mem.sets[s].get_mut(&grp) else {
                        continue;
                    };
                    for (m, f) in new {
                        if g.add(&m, f) {
                            inner.total += 1;
                        }
                    }
                }
            }
            mem.generation = p.generation;
        }
        if inner.total > self.cap {
            evict(inner, self.cap - self.cap / 4);
        }
    }

    /// Decides which members of `sets` (rows of keys, member `v`, flags `f`)
    /// are new to the KPI's groups, appends them to the log, and returns what
    /// each group's distinct measures grow by. Runs inside the batch
    /// transaction; see the module doc for why the answer is exact.
    pub async fn add(
        &self,
        tx: &Transaction<'_>,
        def: &KpiDef,
        sets: &[(usize, RecordBatch)],
        suffix: &str,
        writers: Writers,
        pending: &mut Pending,
    ) -> Result<Counts, SinkError> {
        let n_keys = def.keys.len();
        let mut parsed = Vec::new();
        for (s, rows) in sets {
            if rows.num_rows() > 0 {
                parsed.push((*s, parse_set(rows, n_keys)?));
            }
        }
        let mut counts = Counts::new();
        if parsed.is_empty() {
            return Ok(counts);
        }

        let (epoch, generation) = match writers {
            Writers::Exclusive { generation } => (0, generation),
            Writers::Shared => {
                let row = tx
                    .query_typed(
                        "UPDATE kpi_registry SET member_gen = member_gen + 1 WHERE name = $1 \
                         RETURNING member_epoch, member_gen",
                        &[(&def.name, Type::TEXT)],
                    )
                    .await?
                    .pop()
                    .ok_or_else(|| {
                        SinkError::Fatal(format!(
                            "KPI {} is not in kpi_registry: start the pipeline or run `energy-stream migrate` to install it",
                            def.name
                        ))
                    })?;
                (row.get::<_, i64>(0), row.get::<_, i64>(1))
            }
        };
        let prev = generation - 1;

        // Bring the memory to `prev`.
        let behind: Option<(i64, Vec<usize>)> = {
            let mut inner = self.lock();
            let stale = inner
                .kpis
                .get(&def.name)
                .is_none_or(|m| m.epoch != epoch || m.generation > prev);
            if stale {
                inner.forget(&def.name);
                inner.kpis.insert(
                    def.name.clone(),
                    KpiMem {
                        epoch,
                        generation: prev,
                        sets: (0..def.sets.len()).map(|_| HashMap::new()).collect(),
                    },
                );
                None
            } else {
                let mem = &inner.kpis[&def.name];
                (mem.generation < prev).then(|| {
                    let held = (0..mem.sets.len())
                        .filter(|&s| !mem.sets[s].is_empty())
                        .collect();
                    (mem.generation, held)
                })
            }
        };
        if let Some((since, held)) = behind {
            for s in held {
                let rows = tx
                    .query_typed(
                        &format!(
                            "SELECT grp, members FROM {} WHERE gen > $1 AND gen <= $2",
                            super::members_table(def, s, suffix)
                        ),
                        &[(&since, Type::INT8), (&prev, Type::INT8)],
                    )
                    .await?;
                let mut inner = self.lock();
                let inner = &mut *inner;
                let mem = inner.kpis.get_mut(&def.name).expect("inserted above");
                for r in &rows {
                    let grp: &[u8] = r.get(0);
                    // Only groups held; the others are read whole when needed.
                    if let Some(g) = mem.sets[s].get_mut(grp) {
                        inner.total += absorb(g, r.get(1))?;
                    }
                }
            }
            self.lock()
                .kpis
                .get_mut(&def.name)
                .expect("inserted above")
                .generation = prev;
        }

        // Read in the groups this batch touches and the memory lacks.
        for (s, groups) in &parsed {
            let missing: Vec<&[u8]> = {
                let inner = self.lock();
                let held = &inner.kpis[&def.name].sets[*s];
                groups
                    .iter()
                    .filter(|g| !held.contains_key(&g.grp))
                    .map(|g| &g.grp[..])
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            let rows = tx
                .query_typed(
                    &format!(
                        "SELECT grp, members FROM {} WHERE grp = ANY($1)",
                        super::members_table(def, *s, suffix)
                    ),
                    &[(&missing, Type::BYTEA_ARRAY)],
                )
                .await?;
            let mut inner = self.lock();
            let inner = &mut *inner;
            let set = &mut inner.kpis.get_mut(&def.name).expect("inserted above").sets[*s];
            for grp in missing {
                set.insert(grp.into(), Group::new(0));
            }
            for r in &rows {
                let grp: &[u8] = r.get(0);
                let g = set.get_mut(grp).expect("asked for");
                inner.total += absorb(g, r.get(1))?;
            }
        }

        // Decide, against a memory that now holds every touched group whole.
        let distinct = super::distinct_measures(def);
        let mut added = PendingKpi {
            kpi: def.name.clone(),
            epoch,
            prev,
            generation,
            sets: Vec::new(),
        };
        {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            let mem = inner.kpis.get_mut(&def.name).expect("inserted above");
            for (s, groups) in parsed {
                let slots: Vec<usize> = def.sets[s]
                    .measures
                    .iter()
                    .map(|m| distinct.iter().position(|d| d == m).expect("distinct"))
                    .collect();
                let mut new_groups = Vec::new();
                for pg in groups {
                    let g = mem.sets[s].get_mut(&pg.grp).expect("read in above");
                    g.used = tick;
                    let mut new = Vec::new();
                    for (m, f) in pg.members {
                        let fresh = f & !g.flags(&m);
                        if fresh == 0 {
                            continue;
                        }
                        let c = counts
                            .entry(pg.grp.clone())
                            .or_insert_with(|| vec![0; distinct.len()]);
                        for (j, &slot) in slots.iter().enumerate() {
                            if fresh & (1 << j) != 0 {
                                c[slot] += 1;
                            }
                        }
                        new.push((m, fresh));
                    }
                    if !new.is_empty() {
                        new_groups.push((pg.grp, new));
                    }
                }
                if !new_groups.is_empty() {
                    added.sets.push((s, new_groups));
                }
            }
        }

        for (s, groups) in &added.sets {
            let grps: Vec<&[u8]> = groups.iter().map(|(g, _)| &g[..]).collect();
            let blobs: Vec<Vec<u8>> = groups.iter().map(|(_, new)| pack(new)).collect();
            tx.execute_typed(
                &format!(
                    "INSERT INTO {} (grp, gen, members) SELECT g, $2, m FROM unnest($1::bytea[], $3::bytea[]) AS t(g, m)",
                    super::members_table(def, *s, suffix)
                ),
                &[
                    (&grps, Type::BYTEA_ARRAY),
                    (&generation, Type::INT8),
                    (&blobs, Type::BYTEA_ARRAY),
                ],
            )
            .await?;
        }
        pending.0.push(added);
        Ok(counts)
    }
}

/// Drops the least recently used groups until `target` members remain.
fn evict(inner: &mut Inner, target: usize) {
    let mut by_age: Vec<(u64, String, usize, Bytes)> = Vec::new();
    for (kpi, mem) in &inner.kpis {
        for (s, set) in mem.sets.iter().enumerate() {
            for (grp, g) in set {
                by_age.push((g.used, kpi.clone(), s, grp.clone()));
            }
        }
    }
    by_age.sort_unstable_by_key(|(used, ..)| *used);
    for (_, kpi, s, grp) in by_age {
        if inner.total <= target {
            break;
        }
        if let Some(g) = inner
            .kpis
            .get_mut(&kpi)
            .and_then(|m| m.sets[s].remove(&grp))
        {
            inner.total -= g.len();
        }
    }
}

/// One touched group of a batch's set rows.
struct ParsedGroup {
    grp: Bytes,
    members: Vec<(Bytes, i32)>,
}

/// Splits a set's rows (keys…, `v`, `f`) by group, in COPY BINARY fields.
fn parse_set(rows: &RecordBatch, n_keys: usize) -> Result<Vec<ParsedGroup>, SinkError> {
    let mut out: Vec<ParsedGroup> = Vec::new();
    let mut index: HashMap<Bytes, usize> = HashMap::new();
    for_each_tuple(rows, |fields| {
        let grp: Vec<u8> = fields[..n_keys].concat();
        let member: Bytes = fields[n_keys].into();
        let f = field_i32(fields[n_keys + 1]);
        let i = match index.get(&grp[..]) {
            Some(&i) => i,
            None => {
                let grp: Bytes = grp.into();
                index.insert(grp.clone(), out.len());
                out.push(ParsedGroup {
                    grp,
                    members: Vec::new(),
                });
                out.len() - 1
            }
        };
        out[i].members.push((member, f));
    })?;
    Ok(out)
}

/// The group key (COPY fields of the first `n_keys` columns) of every row.
pub fn group_keys(rows: &RecordBatch, n_keys: usize) -> Result<Vec<Bytes>, SinkError> {
    // Only the keys are encoded, not the measures beside them.
    let keys = rows
        .project(&(0..n_keys).collect::<Vec<_>>())
        .map_err(|e| SinkError::Fatal(e.to_string()))?;
    let mut out = Vec::with_capacity(rows.num_rows());
    for_each_tuple(&keys, |fields| out.push(fields.concat().into()))?;
    Ok(out)
}

/// Calls `f` with each row's COPY BINARY fields (the length word included, so
/// NULL is `ff ff ff ff` and differs from any value).
fn for_each_tuple(rows: &RecordBatch, mut f: impl FnMut(&[&[u8]])) -> Result<(), SinkError> {
    let mut buf = BytesMut::new();
    copy::encode_batch(rows, &mut buf).map_err(|e| SinkError::Fatal(e.to_string()))?;
    let mut at = copy::HEADER_LEN;
    let mut fields: Vec<&[u8]> = Vec::with_capacity(rows.num_columns());
    for _ in 0..rows.num_rows() {
        let n = i16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
        at += 2;
        fields.clear();
        for _ in 0..n {
            let len = field_len(&buf[at..]);
            fields.push(&buf[at..at + len]);
            at += len;
        }
        f(&fields);
    }
    Ok(())
}

/// The length of a COPY field, its length word included.
fn field_len(b: &[u8]) -> usize {
    let n = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    4 + n.max(0) as usize
}

fn field_i32(field: &[u8]) -> i32 {
    match field.len() {
        8 => i32::from_be_bytes([field[4], field[5], field[6], field[7]]),
        _ => 0,
    }
}

/// A log row's members: each COPY field followed by its flags (big-endian i32).
fn pack(members: &[(Bytes, i32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(members.iter().map(|(m, _)| m.len() + 4).sum());
    for (m, f) in members {
        out.extend_from_slice(m);
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// Adds a log row's members to a group; returns how many were not held.
fn absorb(g: &mut Group, packed: &[u8]) -> Result<usize, SinkError> {
    let mut added = 0;
    let mut at = 0;
    while at < packed.len() {
        let corrupt = || SinkError::Fatal("a membership log row is corrupt".into());
        if packed.len() - at < 4 {
            return Err(corrupt());
        }
        let len = field_len(&packed[at..]);
        if packed.len() - at < len + 4 {
            return Err(corrupt());
        }
        let m = &packed[at..at + len];
        let f = i32::from_be_bytes(
            packed[at + len..at + len + 4]
                .try_into()
                .expect("four bytes"),
        );
        at += len + 4;
        if g.add(m, f) {
            added += 1;
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn rows(r: &[(Option<i64>, &str, i32)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k0", DataType::Int64, true),
            Field::new("v", DataType::Utf8, true),
            Field::new("f", DataType::Int32, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(r.iter().map(|x| x.0).collect::<Vec<_>>())),
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
                Arc::new(Int32Array::from_iter_values(r.iter().map(|x| x.2))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn rows_split_by_group_and_null_keys_are_their_own_group() {
        let groups = parse_set(
            &rows(&[
                (Some(1), "a", 1),
                (None, "a", 2),
                (Some(1), "b", 3),
                (Some(0), "a", 1),
            ]),
            1,
        )
        .unwrap();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].members.len(), 2);
        assert_eq!(groups[0].members[1].1, 3);
        assert_eq!(groups[1].members[0].1, 2);
        assert_ne!(groups[0].grp, groups[1].grp);
        assert_ne!(groups[1].grp, groups[2].grp);
    }

    #[test]
    fn packed_members_read_back_and_merge_flags() {
        let groups = parse_set(&rows(&[(Some(1), "a", 1), (Some(1), "", 2)]), 1).unwrap();
        let packed = pack(&groups[0].members);
        let mut g = Group::new(0);
        assert_eq!(absorb(&mut g, &packed).unwrap(), 2);
        // The same members with another flag: nothing new, flags OR-ed.
        let again = pack(&[(groups[0].members[0].0.clone(), 4)]);
        assert_eq!(absorb(&mut g, &again).unwrap(), 0);
        assert_eq!(g.flags(&groups[0].members[0].0), 5);
        assert_eq!(g.flags(&groups[0].members[1].0), 2);
        assert_eq!(g.flags(b"\0\0\0\x01z"), 0);
        assert!(absorb(&mut g, &packed[..packed.len() - 1]).is_err());
    }

    #[test]
    fn commit_takes_in_only_batches_that_follow_the_memory() {
        let m = Memberships::new(100);
        let groups = parse_set(&rows(&[(Some(1), "a", 1), (Some(1), "b", 1)]), 1).unwrap();
        let grp = groups[0].grp.clone();
        {
            let mut inner = m.lock();
            let mut set = HashMap::new();
            set.insert(grp.clone(), Group::new(1));
            inner.kpis.insert(
                "k".into(),
                KpiMem {
                    epoch: 7,
                    generation: 3,
                    sets: vec![set],
                },
            );
        }
        let pending = |prev, members: Vec<(Bytes, i32)>| {
            Pending(vec![PendingKpi {
                kpi: "k".into(),
                epoch: 7,
                prev,
                generation: prev + 1,
                sets: vec![(0, vec![(grp.clone(), members)])],
            }])
        };
        // A batch that found generation 2 is older than the memory: ignored.
        m.commit(pending(2, groups[0].members.clone()));
        assert_eq!(m.len(), 0);
        m.commit(pending(3, groups[0].members.clone()));
        assert_eq!(m.len(), 2);
        assert_eq!(m.lock().kpis["k"].generation, 4);
    }

    #[test]
    fn eviction_drops_the_least_recently_used_groups() {
        let m = Memberships::new(4);
        {
            let mut inner = m.lock();
            let mut set = HashMap::new();
            for (used, n) in [(1u64, 3usize), (2, 2), (3, 1)] {
                let mut g = Group::new(used);
                for i in 0..n {
                    // A two-byte COPY field.
                    assert!(g.add(&[0, 0, 0, 2, used as u8, i as u8], 1));
                }
                set.insert(vec![used as u8].into(), g);
            }
            inner.total = 6;
            inner.kpis.insert(
                "k".into(),
                KpiMem {
                    epoch: 0,
                    generation: 0,
                    sets: vec![set],
                },
            );
        }
        m.commit(Pending::default());
        let inner = m.lock();
        let left: Vec<u8> = {
            let mut v: Vec<u8> = inner.kpis["k"].sets[0].keys().map(|k| k[0]).collect();
            v.sort();
            v
        };
        assert_eq!(left, vec![2, 3]);
        assert_eq!(inner.total, 3);
    }
}
