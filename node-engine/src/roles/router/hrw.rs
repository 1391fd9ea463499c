//! Rendezvous (highest-random-weight) hashing of sealed segments onto live readers.
//!
//! Owns: the weight function, the per-segment reader ranking, the search plan (which reader
//! searches which segments for one request, honouring the replication factor) and the
//! "next reader in hash order" failover rule. Pure: no I/O, no clocks, no network types, so the
//! router, the readers (to decide what to preload) and the tests all agree on one assignment.
//!
//! Why rendezvous hashing: when a reader joins or leaves, only the segments whose top-ranked
//! readers changed move, so the readers' page caches stay warm; every process computes the same
//! assignment from the same reader set without coordination.

use std::collections::{BTreeMap, BTreeSet};

/// Identifier of a sealed segment (the metadata store's segment id).
pub type SegmentId = u64;

/// FNV-1a over the reader's name: stable across processes, platforms and Rust versions
/// (unlike `std`'s `DefaultHasher`, whose algorithm is unspecified).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finaliser: a full-avalanche 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weight of `reader` for `segment`; the highest weight owns the segment.
pub fn weight(segment: SegmentId, reader: &str) -> u64 {
    mix64(fnv1a64(reader.as_bytes()) ^ mix64(segment.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Indices into `readers`, best owner first (descending weight, ties by name then index, so
/// the order is total and identical in every process).
pub fn rank<R: AsRef<str>>(segment: SegmentId, readers: &[R]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..readers.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ra, rb) = (readers[a].as_ref(), readers[b].as_ref());
        weight(segment, rb)
            .cmp(&weight(segment, ra))
            .then_with(|| ra.cmp(rb))
            .then(a.cmp(&b))
    });
    idx
}

/// The readers that hold (preload) `segment`: the first `replication` of [`rank`]
/// (fewer when fewer readers exist; `replication == 0` is treated as 1).
pub fn owners<R: AsRef<str>>(segment: SegmentId, readers: &[R], replication: usize) -> Vec<usize> {
    let mut r = rank(segment, readers);
    r.truncate(replication.max(1));
    r
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Every reader is excluded (dead, or already failed in this request).
    #[error("no live reader left to search segment {segment}")]
    NoReaderForSegment { segment: SegmentId },
}

/// Which reader (index into the reader list) searches which segments for one request.
/// Segment lists are sorted and each segment appears under exactly one reader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub per_reader: BTreeMap<usize, Vec<SegmentId>>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.per_reader.is_empty()
    }

    fn push(&mut self, reader: usize, segment: SegmentId) {
        self.per_reader.entry(reader).or_default().push(segment);
    }

    fn finish(mut self) -> Self {
        for v in self.per_reader.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        self
    }
}

/// Plan one request: each segment goes to one of its `replication` owners, picked by `spread`
/// (e.g. a per-request counter) so replicas share the load while every segment still lands
/// only on readers that preloaded it.
///
/// Errors: `NoReaderForSegment` when `readers` is empty and `segments` is not.
pub fn plan<R: AsRef<str>>(
    segments: &[SegmentId],
    readers: &[R],
    replication: usize,
    spread: u64,
) -> Result<Plan, PlanError> {
    let mut p = Plan::default();
    for &seg in segments {
        let own = owners(seg, readers, replication);
        if own.is_empty() {
            return Err(PlanError::NoReaderForSegment { segment: seg });
        }
        // Mix the spread with the segment so consecutive requests rotate replicas per segment.
        let pick = (mix64(spread ^ seg.rotate_left(17)) % own.len() as u64) as usize;
        p.push(own[pick], seg);
    }
    Ok(p.finish())
}

/// Failover: the next reader in `segment`'s hash order that is not in `excluded` (the readers
/// that already failed in this request, or are known dead).
pub fn next_reader<R: AsRef<str>>(
    segment: SegmentId,
    readers: &[R],
    excluded: &BTreeSet<usize>,
) -> Option<usize> {
    rank(segment, readers)
        .into_iter()
        .find(|i| !excluded.contains(i))
}

/// Re-plan the segments of failed readers within the same request: each goes to the next
/// reader in its own hash order outside `excluded`.
///
/// Errors: `NoReaderForSegment` when every reader is excluded.
pub fn replan<R: AsRef<str>>(
    segments: &[SegmentId],
    readers: &[R],
    excluded: &BTreeSet<usize>,
) -> Result<Plan, PlanError> {
    let mut p = Plan::default();
    for &seg in segments {
        let r = next_reader(seg, readers, excluded)
            .ok_or(PlanError::NoReaderForSegment { segment: seg })?;
        p.push(r, seg);
    }
    Ok(p.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:19531")).collect()
    }

    #[test]
    fn weight_is_stable_across_runs_and_processes() {
        // Pinned values: a change here would reshuffle every deployed cluster's caches.
        assert_eq!(weight(0, "a"), weight(0, "a"));
        let w = weight(42, "10.0.0.1:19531");
        assert_eq!(w, weight(42, &String::from("10.0.0.1:19531")));
        assert_ne!(weight(42, "10.0.0.1:19531"), weight(43, "10.0.0.1:19531"));
        assert_ne!(weight(42, "10.0.0.1:19531"), weight(42, "10.0.0.2:19531"));
    }

    #[test]
    fn rank_is_a_permutation_independent_of_input_order() {
        let r = readers(5);
        let mut rev = r.clone();
        rev.reverse();
        for seg in 0..200u64 {
            let a: Vec<&str> = rank(seg, &r).into_iter().map(|i| r[i].as_str()).collect();
            let b: Vec<&str> = rank(seg, &rev)
                .into_iter()
                .map(|i| rev[i].as_str())
                .collect();
            assert_eq!(a, b, "segment {seg}");
            let mut sorted = a.clone();
            sorted.sort();
            let mut all: Vec<&str> = r.iter().map(String::as_str).collect();
            all.sort();
            assert_eq!(sorted, all);
        }
    }

    #[test]
    fn segments_spread_roughly_evenly_over_readers() {
        let r = readers(4);
        let mut counts = [0usize; 4];
        for seg in 0..4000u64 {
            counts[owners(seg, &r, 1)[0]] += 1;
        }
        for c in counts {
            assert!((800..=1200).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn removing_a_reader_moves_only_its_own_segments() {
        let r = readers(4);
        let survivors: Vec<String> = r
            .iter()
            .filter(|s| s.as_str() != r[2].as_str())
            .cloned()
            .collect();
        let mut moved = 0;
        for seg in 0..1000u64 {
            let before = &r[owners(seg, &r, 1)[0]];
            let after = &survivors[owners(seg, &survivors, 1)[0]];
            if before != after {
                assert_eq!(before, &r[2], "segment {seg} moved off a surviving reader");
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn adding_a_reader_moves_segments_only_onto_the_new_reader() {
        let r = readers(3);
        let mut grown = r.clone();
        grown.push("10.0.0.9:19531".into());
        for seg in 0..1000u64 {
            let before = &r[owners(seg, &r, 1)[0]];
            let after = &grown[owners(seg, &grown, 1)[0]];
            assert!(
                before == after || after == "10.0.0.9:19531",
                "segment {seg}"
            );
        }
    }

    #[test]
    fn owners_are_the_top_replication_readers_and_capped_by_reader_count() {
        let r = readers(3);
        assert_eq!(owners(7, &r, 2), rank(7, &r)[..2].to_vec());
        assert_eq!(owners(7, &r, 10).len(), 3);
        assert_eq!(owners(7, &r, 0).len(), 1);
        assert!(owners(7, &r, 1).contains(&rank(7, &r)[0]));
        assert!(!owners(7, &r, 2).contains(&rank(7, &r)[2]));
    }

    #[test]
    fn plan_puts_every_segment_on_exactly_one_of_its_owners() {
        let r = readers(4);
        let segs: Vec<u64> = (0..100).collect();
        for spread in 0..20 {
            let p = plan(&segs, &r, 2, spread).unwrap();
            assert_eq!(
                p.per_reader.values().map(Vec::len).sum::<usize>(),
                segs.len()
            );
            let mut seen = BTreeSet::new();
            for (&reader, list) in &p.per_reader {
                for &s in list {
                    assert!(seen.insert(s), "segment {s} planned twice");
                    assert!(owners(s, &r, 2).contains(&reader));
                }
            }
        }
    }

    #[test]
    fn plan_with_replication_two_uses_both_replicas_over_requests() {
        let r = readers(2);
        let used: BTreeSet<usize> = (0..32)
            .flat_map(|spread| plan(&[5], &r, 2, spread).unwrap().per_reader.into_keys())
            .collect();
        assert_eq!(used.len(), 2);
    }

    #[test]
    fn plan_without_readers_fails_with_the_segment_named() {
        let none: Vec<String> = vec![];
        assert_eq!(
            plan(&[3], &none, 1, 0),
            Err(PlanError::NoReaderForSegment { segment: 3 })
        );
        assert!(plan(&[], &none, 1, 0).unwrap().is_empty());
    }

    #[test]
    fn failover_goes_to_the_next_reader_in_hash_order() {
        let r = readers(3);
        let order = rank(11, &r);
        let mut ex = BTreeSet::new();
        assert_eq!(next_reader(11, &r, &ex), Some(order[0]));
        ex.insert(order[0]);
        assert_eq!(next_reader(11, &r, &ex), Some(order[1]));
        ex.insert(order[1]);
        assert_eq!(next_reader(11, &r, &ex), Some(order[2]));
        ex.insert(order[2]);
        assert_eq!(next_reader(11, &r, &ex), None);
    }

    #[test]
    fn replan_of_a_failed_primary_lands_on_the_second_owner_so_replicas_stay_warm() {
        let r = readers(4);
        let segs: Vec<u64> = (0..50).collect();
        let p = plan(&segs, &r, 1, 0).unwrap();
        let (&failed, failed_segs) = p.per_reader.iter().next().unwrap();
        let ex = BTreeSet::from([failed]);
        let re = replan(failed_segs, &r, &ex).unwrap();
        assert!(!re.per_reader.contains_key(&failed));
        for (&reader, list) in &re.per_reader {
            for &s in list {
                assert_eq!(owners(s, &r, 2)[1], reader, "segment {s}");
            }
        }
        let all = BTreeSet::from([0, 1, 2, 3]);
        assert!(matches!(
            replan(&[1], &r, &all),
            Err(PlanError::NoReaderForSegment { segment: 1 })
        ));
    }
}
