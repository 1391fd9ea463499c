//! HNSW (Malkov & Yashunin) over one segment: a parallel build with per-node locks over flat
//! atomic neighbour arrays, frozen into contiguous `u32` lists (layer 0: `count, nbrs[2M]` per
//! node; upper layers: `count, nbrs[M]` per level, located by per-node offsets) that persist
//! and mmap as they are. Searches reuse pooled visited lists.
//!
//! An unfiltered layer search keeps the best `ef` nodes seen in one sorted array (hnswlib keeps
//! two heaps; both expand the same nodes). Filters and tombstones apply inside the base-layer
//! search: every node is still traversed, but only allowed rows enter the result set
//! (hnswlib's `isIdAllowed` rule). When a filter keeps so few rows that a graph walk would
//! visit most of the graph anyway, the allowed rows are scanned exactly instead.

use super::common::{check_queries, dist, prepare};
use super::persist::{Buf, FileReader, FileWriter};
use super::{IndexError, SearchParams, VectorIndex, VectorIndexRead};
use crate::bitset::Bitset;
use crate::distance;
use crate::topk::TopK;
use crate::types::{IndexType, Metric, Neighbor};
use parking_lot::{Mutex, RwLock};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

/// Milvus (knowhere) defaults.
pub const DEFAULT_M: usize = 30;
pub const DEFAULT_EF_CONSTRUCTION: usize = 360;
pub const DEFAULT_EF: usize = 16;
const SEED: u64 = 100;
/// Below this fraction of allowed rows a filtered search scans the allowed rows exactly.
const BRUTE_FORCE_FRACTION: f64 = 0.02;
/// How many neighbours ahead of the one being scored a search prefetches.
const PREFETCH_AHEAD: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    metric: Metric,
    dim: usize,
    n: usize,
    m: usize,
    ef_construction: usize,
    max_level: usize,
    entry: u32,
}

#[derive(Clone, Copy, Debug)]
struct Cand {
    d: f32,
    id: u32,
}
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

/// Generation-stamped visited set, reset in O(1) per search.
struct Visited {
    marks: Vec<u16>,
    stamp: u16,
}

impl Visited {
    fn new(n: usize) -> Self {
        Self {
            marks: vec![0; n],
            stamp: 0,
        }
    }
    fn reset(&mut self) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.marks.fill(0);
            self.stamp = 1;
        }
    }
    /// Marks `i`; returns whether it was already marked.
    #[inline]
    fn check_and_mark(&mut self, i: u32) -> bool {
        let m = &mut self.marks[i as usize];
        let seen = *m == self.stamp;
        *m = self.stamp;
        seen
    }
}

/// The best `cap` candidates of a layer search, nearest first, each marked once expanded.
struct Beam {
    items: Vec<(Cand, bool)>,
    cap: usize,
    /// No item before this index is unexpanded.
    next: usize,
}

impl Beam {
    fn new(cap: usize) -> Self {
        Self {
            items: Vec::with_capacity(cap + 1),
            cap: cap.max(1),
            next: 0,
        }
    }
    /// Keeps `c` if it is among the best `cap` seen so far; says whether it did.
    #[inline]
    fn push(&mut self, c: Cand) -> bool {
        if self.items.len() >= self.cap {
            match self.items.last() {
                Some((worst, _)) if c < *worst => {
                    self.items.pop();
                }
                _ => return false,
            }
        }
        let at = self.items.partition_point(|(x, _)| *x < c);
        self.items.insert(at, (c, false));
        self.next = self.next.min(at);
        true
    }
    /// Marks the nearest unexpanded node expanded and returns it.
    #[inline]
    fn expand_next(&mut self) -> Option<u32> {
        while let Some((c, done)) = self.items.get_mut(self.next) {
            self.next += 1;
            if !*done {
                *done = true;
                return Some(c.id);
            }
        }
        None
    }
    fn into_sorted(self) -> Vec<Cand> {
        self.items.into_iter().map(|(c, _)| c).collect()
    }
}

/// Neighbour storage shared by the build (atomics) and the frozen index (plain u32).
trait Links {
    fn l0(&self, node: u32, out: &mut Vec<u32>);
    fn upper(&self, node: u32, level: usize, out: &mut Vec<u32>);
    /// Hint that `node`'s layer-0 list will be read soon.
    fn prefetch_l0(&self, _node: u32) {}
}

struct Layout {
    m: usize,
    m0: usize,
    /// Start (in u32 slots) of each node's upper-level block; `n + 1` entries.
    upper_off: Vec<u64>,
}

impl Layout {
    fn l0_slot(&self, node: u32) -> usize {
        node as usize * (self.m0 + 1)
    }
    fn upper_slot(&self, node: u32, level: usize) -> usize {
        self.upper_off[node as usize] as usize + (level - 1) * (self.m + 1)
    }
}

struct BuildGraph {
    layout: Layout,
    l0: Vec<AtomicU32>,
    up: Vec<AtomicU32>,
}

fn read_list(arr: &[AtomicU32], slot: usize, out: &mut Vec<u32>) {
    out.clear();
    let cnt = arr[slot].load(AtomicOrdering::Acquire) as usize;
    out.extend(
        arr[slot + 1..slot + 1 + cnt]
            .iter()
            .map(|a| a.load(AtomicOrdering::Relaxed)),
    );
}

fn write_list(arr: &[AtomicU32], slot: usize, list: &[u32]) {
    for (a, &v) in arr[slot + 1..].iter().zip(list) {
        a.store(v, AtomicOrdering::Relaxed);
    }
    arr[slot].store(list.len() as u32, AtomicOrdering::Release);
}

impl Links for BuildGraph {
    fn l0(&self, node: u32, out: &mut Vec<u32>) {
        read_list(&self.l0, self.layout.l0_slot(node), out)
    }
    fn upper(&self, node: u32, level: usize, out: &mut Vec<u32>) {
        read_list(&self.up, self.layout.upper_slot(node, level), out)
    }
}

/// An HNSW index over one segment.
pub struct HnswIndex {
    meta: Meta,
    vectors: Buf<f32>,
    level0: Buf<u32>,
    upper_off: Buf<u64>,
    upper: Buf<u32>,
    pool: Mutex<Vec<Visited>>,
}

struct Frozen<'a> {
    m: usize,
    m0: usize,
    level0: &'a [u32],
    upper_off: &'a [u64],
    upper: &'a [u32],
}

impl Links for Frozen<'_> {
    fn l0(&self, node: u32, out: &mut Vec<u32>) {
        let s = node as usize * (self.m0 + 1);
        let cnt = self.level0[s] as usize;
        out.clear();
        out.extend_from_slice(&self.level0[s + 1..s + 1 + cnt]);
    }
    fn prefetch_l0(&self, node: u32) {
        let s = node as usize * (self.m0 + 1);
        if let Some(list) = self.level0.get(s..s + self.m0 + 1) {
            distance::prefetch(list);
        }
    }
    fn upper(&self, node: u32, level: usize, out: &mut Vec<u32>) {
        let s = self.upper_off[node as usize] as usize + (level - 1) * (self.m + 1);
        let cnt = self.upper[s] as usize;
        out.clear();
        out.extend_from_slice(&self.upper[s + 1..s + 1 + cnt]);
    }
}

struct Ctx<'a> {
    metric: Metric,
    dim: usize,
    vectors: &'a [f32],
}

impl Ctx<'_> {
    #[inline]
    fn vec(&self, id: u32) -> &[f32] {
        &self.vectors[id as usize * self.dim..(id as usize + 1) * self.dim]
    }
    #[inline]
    fn d(&self, q: &[f32], id: u32) -> f32 {
        dist(self.metric, q, self.vec(id))
    }

    fn greedy(
        &self,
        g: &(impl Links + ?Sized),
        q: &[f32],
        mut cur: u32,
        top: usize,
        bottom: usize,
        buf: &mut Vec<u32>,
    ) -> u32 {
        let mut cd = self.d(q, cur);
        for lev in (bottom..=top).rev() {
            if lev == 0 {
                break;
            }
            loop {
                let mut changed = false;
                g.upper(cur, lev, buf);
                for &nb in buf.iter() {
                    let d = self.d(q, nb);
                    if d < cd {
                        cd = d;
                        cur = nb;
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        cur
    }

    /// Scores the unvisited neighbours of `node` on `level`, marking them visited, and hands
    /// each to `keep`, which says whether it became a candidate for expansion. A graph walk is
    /// bound by memory loads, so the vectors of the next few neighbours are already on their
    /// way while one is scored, and on layer 0 a new candidate's neighbour list is fetched
    /// as soon as it is kept, well before it is expanded.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn score_neighbours(
        &self,
        g: &(impl Links + ?Sized),
        q: &[f32],
        node: u32,
        level: usize,
        visited: &mut Visited,
        buf: &mut Vec<u32>,
        mut keep: impl FnMut(Cand) -> bool,
    ) {
        if level == 0 {
            g.l0(node, buf)
        } else {
            g.upper(node, level, buf)
        }
        buf.retain(|&nb| !visited.check_and_mark(nb));
        for &nb in buf.iter().take(PREFETCH_AHEAD) {
            distance::prefetch(self.vec(nb));
        }
        for (i, &nb) in buf.iter().enumerate() {
            if let Some(&next) = buf.get(i + PREFETCH_AHEAD) {
                distance::prefetch(self.vec(next));
            }
            let kept = keep(Cand {
                d: self.d(q, nb),
                id: nb,
            });
            if kept && level == 0 {
                g.prefetch_l0(nb);
            }
        }
    }

    /// Beam search on one layer where every node may enter the results (no filter): the
    /// best `ef` nodes seen, nearest first.
    ///
    /// It expands exactly the nodes that hnswlib's candidate and result heaps would: a
    /// candidate is only ever expanded while it is among the best `ef` seen, so one sorted
    /// array of those (each marked once expanded) replaces both heaps, and the next node to
    /// expand is the nearest unmarked one.
    #[allow(clippy::too_many_arguments)]
    fn search_layer(
        &self,
        g: &(impl Links + ?Sized),
        q: &[f32],
        entry: u32,
        ef: usize,
        level: usize,
        visited: &mut Visited,
        buf: &mut Vec<u32>,
    ) -> Vec<Cand> {
        visited.reset();
        let mut beam = Beam::new(ef);
        visited.check_and_mark(entry);
        beam.push(Cand {
            d: self.d(q, entry),
            id: entry,
        });
        while let Some(node) = beam.expand_next() {
            self.score_neighbours(g, q, node, level, visited, buf, |c| beam.push(c));
        }
        beam.into_sorted()
    }

    /// The layer-0 search with a filter: only allowed nodes enter the results, but every node
    /// is traversed (hnswlib's rule). Up to `ef` results, in no order.
    #[allow(clippy::too_many_arguments)]
    fn search_layer0_filtered(
        &self,
        g: &(impl Links + ?Sized),
        q: &[f32],
        entry: u32,
        ef: usize,
        visited: &mut Visited,
        allowed: &Bitset,
        buf: &mut Vec<u32>,
    ) -> Vec<Cand> {
        visited.reset();
        let ok = |id: u32| allowed.contains(id as usize);
        let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
        let mut cands: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 2);
        let e = Cand {
            d: self.d(q, entry),
            id: entry,
        };
        visited.check_and_mark(entry);
        cands.push(Reverse(e));
        if ok(entry) {
            results.push(e);
        }
        let mut bound = if results.len() >= ef {
            e.d
        } else {
            f32::INFINITY
        };
        while let Some(Reverse(c)) = cands.pop() {
            if c.d > bound {
                break;
            }
            self.score_neighbours(g, q, c.id, 0, visited, buf, |c| {
                let kept = results.len() < ef || c.d < bound;
                if kept {
                    cands.push(Reverse(c));
                    if ok(c.id) {
                        results.push(c);
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                    if results.len() >= ef {
                        bound = results.peek().map_or(f32::INFINITY, |r| r.d);
                    }
                }
                kept
            });
        }
        results.into_vec()
    }

    /// hnswlib's neighbour-selection heuristic: keep a candidate only if it is closer to the
    /// base than to every neighbour already kept.
    fn select(&self, mut cands: Vec<Cand>, m: usize) -> Vec<u32> {
        if cands.len() <= m {
            cands.sort();
            return cands.into_iter().map(|c| c.id).collect();
        }
        cands.sort();
        let mut kept: Vec<Cand> = Vec::with_capacity(m);
        for c in cands {
            if kept.len() >= m {
                break;
            }
            let cv = self.vec(c.id);
            if kept
                .iter()
                .all(|k| dist(self.metric, cv, self.vec(k.id)) >= c.d)
            {
                kept.push(c);
            }
        }
        kept.into_iter().map(|c| c.id).collect()
    }
}

impl HnswIndex {
    /// Build with `m` links per node (2m on layer 0) and `ef_construction`, on the current
    /// rayon pool.
    pub fn build(
        metric: Metric,
        dim: usize,
        m: usize,
        ef_construction: usize,
        vectors: &[f32],
    ) -> Self {
        let n = vectors.len() / dim;
        let data = prepare(metric, dim, vectors);
        let m0 = 2 * m;
        let mult = 1.0 / (m as f64).ln();
        let mut rng = ChaCha8Rng::seed_from_u64(SEED);
        let levels: Vec<u8> = (0..n)
            .map(|_| {
                let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                ((-u.ln() * mult) as usize).min(31) as u8
            })
            .collect();
        let mut upper_off = vec![0u64; n + 1];
        for i in 0..n {
            upper_off[i + 1] = upper_off[i] + levels[i] as u64 * (m as u64 + 1);
        }
        let graph = BuildGraph {
            layout: Layout { m, m0, upper_off },
            l0: (0..n * (m0 + 1)).map(|_| AtomicU32::new(0)).collect(),
            up: (0..levels.iter().map(|&l| l as usize * (m + 1)).sum::<usize>())
                .map(|_| AtomicU32::new(0))
                .collect(),
        };
        let locks: Vec<Mutex<()>> = (0..n).map(|_| Mutex::new(())).collect();
        let ctx = Ctx {
            metric,
            dim,
            vectors: &data,
        };
        let top = RwLock::new((0u32, levels.first().copied().unwrap_or(0) as usize));
        if n > 1 {
            (1..n as u32).into_par_iter().for_each_init(
                || (Visited::new(n), Vec::new()),
                |(visited, buf), node| {
                    insert(
                        &ctx,
                        &graph,
                        &locks,
                        &top,
                        &levels,
                        node,
                        ef_construction,
                        visited,
                        buf,
                    );
                },
            );
        }
        let (entry, max_level) = *top.read();
        let BuildGraph { layout, l0, up } = graph;
        Self {
            meta: Meta {
                metric,
                dim,
                n,
                m,
                ef_construction,
                max_level,
                entry,
            },
            vectors: data.into(),
            level0: l0
                .into_iter()
                .map(AtomicU32::into_inner)
                .collect::<Vec<_>>()
                .into(),
            upper_off: layout.upper_off.into(),
            upper: up
                .into_iter()
                .map(AtomicU32::into_inner)
                .collect::<Vec<_>>()
                .into(),
            pool: Mutex::new(Vec::new()),
        }
        .hot_arrays_on_huge_pages()
    }

    /// The arrays every hop reads (vectors and layer-0 lists) on transparent huge pages.
    fn hot_arrays_on_huge_pages(self) -> Self {
        Self {
            vectors: self.vectors.into_huge_pages(),
            level0: self.level0.into_huge_pages(),
            ..self
        }
    }

    pub fn load(reader: &FileReader) -> Result<Self, IndexError> {
        let meta: Meta = serde_json::from_value(reader.meta()["hnsw"].clone())
            .map_err(|e| reader.corrupt(format!("bad HNSW header: {e}")))?;
        let (n, dim, m) = (meta.n, meta.dim, meta.m);
        let idx = Self {
            vectors: reader.section("vectors", Some(n * dim))?,
            level0: reader.section("level0", Some(n * (2 * m + 1)))?,
            upper_off: reader.section("upper_off", Some(n + 1))?,
            upper: reader.section("upper", None)?,
            pool: Mutex::new(Vec::new()),
            meta,
        };
        // Structural checks so a search can never index out of bounds.
        let bad_l0 = idx.level0.chunks_exact(2 * m + 1).any(|l| {
            l[0] as usize > 2 * m || l[1..=l[0] as usize].iter().any(|&x| x as usize >= n)
        });
        let offs = &*idx.upper_off;
        let bad_off = offs.first() != Some(&0)
            || offs.last().is_none_or(|&l| l as usize != idx.upper.len())
            || offs
                .windows(2)
                .any(|w| w[1] < w[0] || (w[1] - w[0]) % (m as u64 + 1) != 0);
        let bad_up = idx
            .upper
            .chunks_exact(m + 1)
            .any(|l| l[0] as usize > m || l[1..=l[0] as usize].iter().any(|&x| x as usize >= n));
        if bad_l0 || bad_off || bad_up || (n > 0 && idx.meta.entry as usize >= n) {
            return Err(reader.corrupt("HNSW graph structure is inconsistent"));
        }
        Ok(idx.hot_arrays_on_huge_pages())
    }

    fn frozen(&self) -> Frozen<'_> {
        Frozen {
            m: self.meta.m,
            m0: 2 * self.meta.m,
            level0: &self.level0,
            upper_off: &self.upper_off,
            upper: &self.upper,
        }
    }

    fn search_one(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Bitset>,
        allowed: usize,
    ) -> Vec<Neighbor> {
        let meta = &self.meta;
        if meta.n == 0 || k == 0 || allowed == 0 {
            return Vec::new();
        }
        let q = prepare(meta.metric, meta.dim, q);
        let ctx = Ctx {
            metric: meta.metric,
            dim: meta.dim,
            vectors: &self.vectors,
        };
        if let Some(f) = filter
            && (allowed as f64) < BRUTE_FORCE_FRACTION * meta.n as f64
        {
            let mut top = TopK::new(k);
            for row in f.iter_ones().take_while(|&r| r < meta.n) {
                top.push_row(row as u32, ctx.d(&q, row as u32));
            }
            return top.into_sorted();
        }
        let g = self.frozen();
        let mut visited = self
            .pool
            .lock()
            .pop()
            .unwrap_or_else(|| Visited::new(meta.n));
        let mut buf = Vec::with_capacity(2 * meta.m);
        let ep = ctx.greedy(&g, &q, meta.entry, meta.max_level, 1, &mut buf);
        let res = match filter {
            None => ctx.search_layer(&g, &q, ep, ef.max(k), 0, &mut visited, &mut buf),
            Some(f) => ctx.search_layer0_filtered(&g, &q, ep, ef.max(k), &mut visited, f, &mut buf),
        };
        self.pool.lock().push(visited);
        let mut top = TopK::new(k);
        for c in res {
            top.push_row(c.id, c.d);
        }
        top.into_sorted()
    }
}

#[allow(clippy::too_many_arguments)]
fn insert(
    ctx: &Ctx<'_>,
    g: &BuildGraph,
    locks: &[Mutex<()>],
    top: &RwLock<(u32, usize)>,
    levels: &[u8],
    node: u32,
    ef_c: usize,
    visited: &mut Visited,
    buf: &mut Vec<u32>,
) {
    let level = levels[node as usize] as usize;
    // A node that raises the top level holds the write lock for its whole insert (hnswlib).
    let mut top_w = None;
    let (entry, max_level) = if level > top.read().1 {
        let w = top.write();
        let v = *w;
        top_w = Some(w);
        v
    } else {
        *top.read()
    };
    let q = ctx.vec(node).to_vec();
    let layout = &g.layout;
    let mut cur = entry;
    if level < max_level {
        cur = ctx.greedy(g, &q, entry, max_level, level + 1, buf);
    }
    for lev in (0..=level.min(max_level)).rev() {
        let cands = ctx.search_layer(g, &q, cur, ef_c, lev, visited, buf);
        if let Some(best) = cands.first() {
            cur = best.id;
        }
        let (cap, arr) = if lev == 0 {
            (layout.m0, &g.l0)
        } else {
            (layout.m, &g.up)
        };
        let chosen = ctx.select(cands, layout.m);
        {
            let _l = locks[node as usize].lock();
            let slot = if lev == 0 {
                layout.l0_slot(node)
            } else {
                layout.upper_slot(node, lev)
            };
            write_list(arr, slot, &chosen);
        }
        for &nb in &chosen {
            let _l = locks[nb as usize].lock();
            let slot = if lev == 0 {
                layout.l0_slot(nb)
            } else {
                layout.upper_slot(nb, lev)
            };
            let mut list = Vec::with_capacity(cap + 1);
            read_list(arr, slot, &mut list);
            if list.contains(&node) {
                continue;
            }
            if list.len() < cap {
                list.push(node);
                write_list(arr, slot, &list);
            } else {
                let base = ctx.vec(nb);
                let mut cs: Vec<Cand> = list
                    .iter()
                    .map(|&x| Cand {
                        d: dist(ctx.metric, base, ctx.vec(x)),
                        id: x,
                    })
                    .collect();
                cs.push(Cand {
                    d: dist(ctx.metric, base, &q),
                    id: node,
                });
                let kept = ctx.select(cs, cap);
                write_list(arr, slot, &kept);
            }
        }
    }
    if let Some(mut w) = top_w
        && level > w.1
    {
        *w = (node, level);
    }
}

impl VectorIndexRead for HnswIndex {
    fn index_type(&self) -> IndexType {
        IndexType::HNSW
    }
    fn metric(&self) -> Metric {
        self.meta.metric
    }
    fn dim(&self) -> usize {
        self.meta.dim
    }
    fn len(&self) -> usize {
        self.meta.n
    }
    fn memory_bytes(&self) -> usize {
        self.vectors.bytes() + self.level0.bytes() + self.upper_off.bytes() + self.upper.bytes()
    }
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError> {
        let nq = check_queries(queries, self.meta.dim)?;
        let ef = params.ef.unwrap_or(DEFAULT_EF.max(k));
        if ef < k || ef > super::registry::MAX_EF {
            return Err(IndexError::InvalidParam {
                name: "ef".into(),
                reason: format!(
                    "must be in [k = {k}, {}], got {ef}",
                    super::registry::MAX_EF
                ),
            });
        }
        let allowed = filter.map_or(self.meta.n, |f| f.count_ones());
        let dim = self.meta.dim;
        if nq <= 1 {
            return Ok(queries
                .chunks_exact(dim)
                .map(|q| self.search_one(q, k, ef, filter, allowed))
                .collect());
        }
        Ok(queries
            .par_chunks_exact(dim)
            .map(|q| self.search_one(q, k, ef, filter, allowed))
            .collect())
    }
}

impl VectorIndex for HnswIndex {
    fn persist(&self, dir: &Path) -> Result<(), IndexError> {
        let mut w = FileWriter::new(serde_json::json!({ "kind": "hnsw", "hnsw": self.meta }));
        w.add("vectors", &self.vectors);
        w.add("level0", &self.level0);
        w.add("upper_off", &self.upper_off);
        w.add("upper", &self.upper);
        w.write(dir)
    }
}
