//! The background index builder: one task that walks the open collections for sealed segments
//! lacking their ANN index, builds each on a bounded, low-priority pool of OS threads
//! (`max(1, cores / 2)` by default, so searches and writes always keep CPUs), writes it next to
//! its segment (temp file + fsync + rename, checksummed), commits it in the metadata store and
//! only then serves it. Searches never wait for it: a segment without an index is searched
//! with FLAT.
//!
//! Builds resume after a restart by construction: a segment with no committed, verified index
//! file is simply picked up again. No network types here.

use crate::engine::Engine;
use crate::index::{self, VectorIndexRead};
use crate::storage::ann::IndexJob;
use crate::storage::collection::Collection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the builder looks for work without being woken (a fallback: flushes, compactions
/// and restarts wake it explicitly).
const POLL: Duration = Duration::from_secs(1);

/// Counters of the builder since start.
#[derive(Debug, Default)]
pub struct BuilderStats {
    pub built: AtomicU64,
    pub failed: AtomicU64,
    pub discarded: AtomicU64,
}

/// Handle to the builder: wake it, stop it, read its counters.
pub struct IndexBuilder {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub stats: BuilderStats,
}

impl std::fmt::Debug for IndexBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexBuilder")
            .field("threads", &self.threads)
            .finish()
    }
}

/// Lower the calling thread's scheduling priority (Linux: nice is per thread), so index builds
/// yield to request handling on a busy machine.
#[allow(unsafe_code)]
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; `who = 0` names the calling
        // thread on Linux. A failure (e.g. a sandbox forbidding it) just keeps the priority.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if rc != 0 {
            tracing::debug!("could not lower the index builder's thread priority");
        }
    }
}

impl IndexBuilder {
    /// A builder with `threads` pool threads (0 = max(1, cores / 2)); not yet running.
    ///
    /// Errors: the OS refused to start the pool's threads.
    pub fn new(threads: usize) -> Result<Arc<Self>, String> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| (n.get() / 2).max(1))
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("shoal-ixbuild-{i}"))
            .start_handler(|_| lower_thread_priority())
            .build()
            .map_err(|e| format!("start index builder pool: {e}"))?;
        Ok(Arc::new(Self {
            pool: Arc::new(pool),
            threads,
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            task: parking_lot::Mutex::new(None),
            stats: BuilderStats::default(),
        }))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Look for work now (after a flush, a compaction or a new index definition).
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Start the builder loop over `engine`'s collections (on the current tokio runtime).
    pub fn start(self: &Arc<Self>, engine: Weak<Engine>) {
        let me = self.clone();
        let h = tokio::spawn(async move { me.run(engine).await });
        *self.task.lock() = Some(h);
    }

    /// Stop after the build in progress (if any) is committed or discarded.
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let h = self.task.lock().take();
        if let Some(h) = h {
            let _ = h.await;
        }
    }

    async fn run(&self, engine: Weak<Engine>) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut worked = false;
            let collections = match engine.upgrade() {
                Some(e) => e.all(),
                None => return,
            };
            for c in collections {
                while !self.stop.load(Ordering::SeqCst) {
                    let Some(job) = c.claim_index_job() else {
                        break;
                    };
                    worked = true;
                    self.build_one(&c, job).await;
                }
            }
            if !worked {
                let _ = tokio::time::timeout(POLL, self.wake.notified()).await;
            }
        }
    }

    /// Build, persist, commit, then serve one segment's index. Every failure is logged and
    /// leaves the segment on FLAT.
    async fn build_one(&self, c: &Arc<Collection>, job: IndexJob) {
        let started = Instant::now();
        let pool = self.pool.clone();
        let j = job.clone();
        let built = tokio::task::spawn_blocking(move || {
            let ix = pool.install(|| {
                index::build(
                    j.def.index_type,
                    j.metric,
                    j.dim,
                    &j.def.params,
                    j.data.flat().data(),
                )
            })?;
            ix.persist(&j.dir)?;
            drop(ix);
            let (crc, bytes) = index::stored_crc(&j.dir)?;
            // Serve the file just written (mapped), exactly as a restart or a reader would.
            let mapped = index::load(&j.dir)?;
            Ok::<_, index::IndexError>((crc, bytes, mapped))
        })
        .await;
        let (crc, bytes, mapped) = match built {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!(collection = %job.collection, segment = job.segment_id, index = %job.def.index_name, error = %e, "index build failed; the segment stays on FLAT");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                remove_dir(&job);
                c.finish_index(&job, Err(e.to_string()));
                return;
            }
            Err(e) => {
                tracing::error!(collection = %job.collection, segment = job.segment_id, error = %e, "index build task failed");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                remove_dir(&job);
                c.finish_index(&job, Err(format!("build task failed: {e}")));
                return;
            }
        };
        let built_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let rec = job.index_record(crc, bytes, built_ms);
        let committed = match c.meta().commit_segment_index(&rec).await {
            Ok(b) => b,
            Err(e) => {
                // Not recorded as a failed build: the next pass retries the whole job.
                tracing::error!(collection = %job.collection, segment = job.segment_id, error = %e, "committing a built index failed; it will be rebuilt");
                drop(mapped);
                remove_dir(&job);
                c.finish_index(&job, Err(format!("commit failed: {e}")));
                c.forget_index_failure(job.segment_id);
                return;
            }
        };
        if !committed {
            // The segment was compacted away or the definition changed meanwhile.
            self.stats.discarded.fetch_add(1, Ordering::Relaxed);
            drop(mapped);
            remove_dir(&job);
            c.finish_index(&job, Err("superseded".into()));
            c.forget_index_failure(job.segment_id);
            return;
        }
        let ix: Arc<dyn VectorIndexRead> = Arc::from(mapped);
        let served = c.finish_index(&job, Ok(ix));
        self.stats.built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            collection = %job.collection,
            segment = job.segment_id,
            index = %job.def.index_name,
            index_type = %job.def.index_type,
            rows = job.data.rows(),
            bytes,
            served,
            ms = started.elapsed().as_millis() as u64,
            "built segment index"
        );
    }
}

fn remove_dir(job: &IndexJob) {
    if let Err(e) = std::fs::remove_dir_all(&job.dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %job.dir.display(), error = %e, "could not remove an unused index directory");
    }
}
