//! The one bounded top-k accumulator, [`TopK<T>`], for everything that keeps the best `k` of a
//! stream: FLAT scans, IVF lists, HNSW results, GPU tiles and per-segment merges.
//!
//! The ranking rule is [`Rank::rank_cmp`]: internal distance ascending (smaller is better for
//! every metric, see [`Neighbor`]; `total_cmp`, so NaN sorts after +inf and never panics), ties
//! by the item's identity (row, or segment then row). The cluster-wide merge of reader answers
//! uses the same rule on user ids ([`crate::merge::cmp_hits`]); the user-facing score is
//! converted once, by [`crate::types::Metric::user_score`].

use crate::types::Neighbor;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Something ranked by internal distance, smaller is better, ties broken by identity.
pub trait Rank {
    /// The total order: `Less` means `self` ranks better.
    fn rank_cmp(&self, other: &Self) -> Ordering;
    /// The internal distance the order starts with.
    fn rank_dist(&self) -> f32;
}

impl Rank for Neighbor {
    #[inline]
    fn rank_cmp(&self, other: &Self) -> Ordering {
        self.cmp_rank(other)
    }
    #[inline]
    fn rank_dist(&self) -> f32 {
        self.dist
    }
}

/// Heap entry ordered by [`Rank::rank_cmp`] (max at the top: the worst kept item).
#[derive(Clone, Copy, Debug)]
struct ByRank<T>(T);

impl<T: Rank> PartialEq for ByRank<T> {
    fn eq(&self, o: &Self) -> bool {
        self.0.rank_cmp(&o.0) == Ordering::Equal
    }
}
impl<T: Rank> Eq for ByRank<T> {}
impl<T: Rank> PartialOrd for ByRank<T> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<T: Rank> Ord for ByRank<T> {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.rank_cmp(&o.0)
    }
}

/// Keeps the `k` best items seen (a max-heap on rank, the worst kept item on top).
///
/// Guarantees: [`TopK::into_sorted`] returns the `min(k, pushed)` best items by
/// [`Rank::rank_cmp`], best first, exactly as sorting everything pushed and truncating would.
pub struct TopK<T = Neighbor> {
    k: usize,
    heap: BinaryHeap<ByRank<T>>,
}

impl<T: Rank> Default for TopK<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T: Rank> TopK<T> {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// The distance a candidate must beat to enter: +inf until `k` items are kept, then the
    /// worst kept item's (a candidate at exactly this distance enters only if it wins the tie).
    #[inline]
    pub fn bound(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::INFINITY
        } else {
            self.heap.peek().map_or(f32::INFINITY, |r| r.0.rank_dist())
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Offer `item`: kept when fewer than `k` are held or it ranks better than the worst kept.
    #[inline]
    pub fn push(&mut self, item: T) {
        if self.heap.len() < self.k {
            self.heap.push(ByRank(item));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && item.rank_cmp(&worst.0) == Ordering::Less
        {
            *worst = ByRank(item);
        }
    }

    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        for item in items {
            self.push(item);
        }
    }

    /// Empty the heap for a new search keeping `k` items, reusing its allocation.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.heap.clear();
    }

    /// The items held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.heap.iter().map(|r| &r.0)
    }

    /// The items held in no particular order, leaving the heap empty with its allocation.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.heap.drain().map(|r| r.0)
    }

    /// The kept items in rank order; the heap is left empty with its allocation (for
    /// [`reset`](Self::reset)), so only the returned vector is allocated.
    pub fn take_sorted(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.drain().collect();
        out.sort_unstable_by(T::rank_cmp);
        out
    }

    /// The kept items in rank order, best first.
    pub fn into_sorted(self) -> Vec<T> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }

    /// The kept items in no particular order.
    pub fn into_unsorted(self) -> impl Iterator<Item = T> {
        self.heap.into_iter().map(|r| r.0)
    }
}

impl TopK<Neighbor> {
    /// [`push`](Self::push) of row `row` at internal distance `dist`.
    #[inline]
    pub fn push_row(&mut self, row: u32, dist: f32) {
        self.push(Neighbor { row, dist });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_best_k_in_rank_order_with_ties_by_row() {
        let mut t = TopK::new(3);
        for (row, dist) in [
            (5, 2.0),
            (1, 1.0),
            (9, 0.5),
            (3, 1.0),
            (7, f32::NAN),
            (2, 3.0),
        ] {
            t.push_row(row, dist);
        }
        assert_eq!(t.bound(), 1.0);
        let rows: Vec<u32> = t.into_sorted().iter().map(|n| n.row).collect();
        assert_eq!(rows, vec![9, 1, 3]);
        let mut empty = TopK::<Neighbor>::new(0);
        empty.push_row(1, 0.0);
        assert!(empty.is_empty());
        assert_eq!(empty.bound(), f32::INFINITY);
    }
}
