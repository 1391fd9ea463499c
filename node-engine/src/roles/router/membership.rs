//! Reader membership as the router sees it: discovery (a static list or the DNS records of a
//! Kubernetes headless Service) and a per-reader health state machine.
//!
//! States: `Joining` (discovered, not yet answered a health check) → `Live` (answered) →
//! `Suspect` (a health check or a request failed) → `Dead` (`dead_after` consecutive
//! failures). One success from any state makes a reader `Live` again. A reader that answers
//! that it is shutting down is `Draining`: it keeps serving for its shutdown delay, so it is not
//! counted as failing. A reader that disappears from discovery is removed. Only `Live` readers
//! get traffic; when none is live, `Draining` and `Suspect` ones are tried rather than failing
//! every request — a single reader replaced by a rolling upgrade keeps serving until the router
//! has found and probed its successor, however late discovery shows it.
//!
//! Owns no network client: the health loop takes a probe function, so the state machine is
//! tested without sockets and the router plugs in its gRPC `Health` call. Must not depend on the
//! storage core.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Where the router learns the reader addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of `host:port` addresses.
    Static(Vec<String>),
    /// Every A/AAAA record of `name` (a headless Service), each with `port`.
    Dns { name: String, port: u16 },
    /// `host:port` lines of a file, re-read at every discovery round (`#` starts a comment):
    /// for deployments outside Kubernetes, where a supervisor rewrites the file (atomically, by
    /// rename) as readers come and go.
    File(std::path::PathBuf),
}

/// Discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `--readers-dns` was not `NAME:PORT`.
    #[error("invalid reader DNS name {value:?}: expected NAME:PORT")]
    ParseDnsTarget { value: String },
    /// The readers file could not be read (the router keeps its last known reader set).
    #[error("reading the readers file {path} failed")]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The resolver failed (the router keeps its last known reader set).
    #[error("resolving readers at {name}:{port} failed")]
    Resolve {
        name: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

impl Discovery {
    /// Parse `--readers-dns NAME:PORT`.
    pub fn dns(target: &str) -> Result<Self, DiscoveryError> {
        let err = || DiscoveryError::ParseDnsTarget {
            value: target.to_string(),
        };
        let (name, port) = target.rsplit_once(':').ok_or_else(err)?;
        let port: u16 = port.parse().map_err(|_| err())?;
        if name.is_empty() || port == 0 {
            return Err(err());
        }
        Ok(Discovery::Dns {
            name: name.to_string(),
            port,
        })
    }

    /// Parse `--readers A,B,C` (empty entries ignored).
    pub fn static_list(list: &str) -> Self {
        Discovery::Static(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Parse the contents of a readers file: one `host:port` per line, blank lines and `#`
    /// comments ignored.
    pub fn parse_file(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Current reader addresses, sorted and without duplicates.
    ///
    /// Errors: `Resolve` when the DNS lookup fails, `ReadFile` when the readers file cannot be
    /// read (callers keep the previous set).
    pub async fn resolve(&self) -> Result<Vec<String>, DiscoveryError> {
        let mut out: Vec<String> = match self {
            Discovery::Static(list) => list.clone(),
            Discovery::Dns { name, port } => tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|source| DiscoveryError::Resolve {
                    name: name.clone(),
                    port: *port,
                    source,
                })?
                .map(|a| a.to_string())
                .collect(),
            Discovery::File(path) => {
                let text = tokio::fs::read_to_string(path).await.map_err(|source| {
                    DiscoveryError::ReadFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                Self::parse_file(&text)
            }
        };
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// What one health check of a reader found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// It answered and serves.
    Serving,
    /// It answered that it is shutting down (it still serves for its shutdown delay).
    Draining,
    /// No answer: an error or a timeout.
    Failed,
}

/// Health state of one reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderState {
    Joining,
    Live,
    /// Answered that it is shutting down: a last resort while no reader is `Live`.
    Draining,
    Suspect {
        failures: u32,
    },
    Dead {
        failures: u32,
    },
}

/// When a reader counts as dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive failures after which a reader is `Dead` (at least 1).
    pub dead_after: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self { dead_after: 3 }
    }
}

/// What one discovery sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipChange {
    pub joined: Vec<String>,
    pub left: Vec<String>,
}

/// The router's view of its readers.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    readers: BTreeMap<String, ReaderState>,
    policy: HealthPolicy,
}

impl Membership {
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            readers: BTreeMap::new(),
            policy,
        }
    }

    /// Make the set of known readers equal `discovered`: new ones start `Joining`, missing
    /// ones are removed, known ones keep their state.
    pub fn sync(&mut self, discovered: &[String]) -> MembershipChange {
        let mut change = MembershipChange::default();
        let keep: std::collections::BTreeSet<&String> = discovered.iter().collect();
        self.readers.retain(|addr, _| {
            let k = keep.contains(addr);
            if !k {
                change.left.push(addr.clone());
            }
            k
        });
        for addr in discovered {
            if !self.readers.contains_key(addr) {
                self.readers.insert(addr.clone(), ReaderState::Joining);
                change.joined.push(addr.clone());
            }
        }
        change
    }

    /// A health check or request to `addr` succeeded. Unknown addresses are ignored.
    pub fn record_success(&mut self, addr: &str) {
        if let Some(s) = self.readers.get_mut(addr) {
            *s = ReaderState::Live;
        }
    }

    /// A health check of `addr` answered that it is shutting down. Unknown addresses are
    /// ignored.
    pub fn record_draining(&mut self, addr: &str) {
        if let Some(s) = self.readers.get_mut(addr) {
            *s = ReaderState::Draining;
        }
    }

    /// Record the outcome of one health check of `addr`.
    pub fn record_probe(&mut self, addr: &str, probe: Probe) {
        match probe {
            Probe::Serving => self.record_success(addr),
            Probe::Draining => self.record_draining(addr),
            Probe::Failed => self.record_failure(addr),
        }
    }

    /// A health check or request to `addr` failed (error or timeout).
    pub fn record_failure(&mut self, addr: &str) {
        let dead_after = self.policy.dead_after.max(1);
        if let Some(s) = self.readers.get_mut(addr) {
            let failures = match *s {
                ReaderState::Joining | ReaderState::Live | ReaderState::Draining => 1,
                ReaderState::Suspect { failures } | ReaderState::Dead { failures } => {
                    failures.saturating_add(1)
                }
            };
            *s = if failures >= dead_after {
                ReaderState::Dead { failures }
            } else {
                ReaderState::Suspect { failures }
            };
        }
    }

    pub fn state(&self, addr: &str) -> Option<ReaderState> {
        self.readers.get(addr).copied()
    }

    /// Every known reader address (any state), sorted.
    pub fn known(&self) -> Vec<String> {
        self.readers.keys().cloned().collect()
    }

    /// The readers that get traffic, sorted: the `Live` ones, or when none is live the
    /// `Draining` and `Suspect` ones (a last resort better than failing every request).
    pub fn routable(&self) -> Vec<String> {
        let live: Vec<String> = self
            .readers
            .iter()
            .filter(|(_, s)| **s == ReaderState::Live)
            .map(|(a, _)| a.clone())
            .collect();
        if !live.is_empty() {
            return live;
        }
        self.readers
            .iter()
            .filter(|(_, s)| matches!(s, ReaderState::Draining | ReaderState::Suspect { .. }))
            .map(|(a, _)| a.clone())
            .collect()
    }
}

/// One round of the membership loop: resolve (keeping the old set when DNS fails), probe every
/// reader of the new set concurrently, then apply the new set and the outcomes together.
/// Probing before applying means a reader that leaves discovery is never dropped while its
/// successor is still `Joining` (a moment in which no reader would be routable). Returns what
/// discovery changed.
pub async fn refresh<P, F>(
    membership: &Arc<Mutex<Membership>>,
    discovery: &Discovery,
    probe: &P,
) -> MembershipChange
where
    P: Fn(String) -> F,
    F: Future<Output = Probe>,
{
    let found = match discovery.resolve().await {
        Ok(found) => Some(found),
        Err(e) => {
            tracing::warn!(error = %e, "reader discovery failed; keeping the last known readers");
            None
        }
    };
    // The readers the round ends with: the discovered set, or the known one when discovery
    // failed. One that left is not probed (it is removed anyway, and an address that is gone
    // would hold the round up until its probe times out).
    let targets = match &found {
        Some(found) => found.clone(),
        None => membership.lock().known(),
    };
    let results = futures::future::join_all(targets.into_iter().map(|addr| {
        let fut = probe(addr.clone());
        async move { (addr, fut.await) }
    }))
    .await;
    let mut m = membership.lock();
    let change = match &found {
        Some(found) => m.sync(found),
        None => MembershipChange::default(),
    };
    for joined in &change.joined {
        tracing::info!(reader = %joined, "reader discovered");
    }
    for left in &change.left {
        tracing::info!(reader = %left, "reader left discovery");
    }
    for (addr, probe) in results {
        let before = m.state(&addr);
        m.record_probe(&addr, probe);
        let after = m.state(&addr);
        if before.is_some() && before != after {
            tracing::info!(reader = %addr, ?before, ?after, "reader health changed");
        }
    }
    change
}

/// Run [`refresh`] every `interval` until the task is dropped.
pub async fn run_membership_loop<P, F>(
    membership: Arc<Mutex<Membership>>,
    discovery: Discovery,
    interval: Duration,
    probe: P,
) where
    P: Fn(String) -> F,
    F: Future<Output = Probe>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        refresh(&membership, &discovery, &probe).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_discovered_reader_gets_no_traffic_until_its_first_health_check_passes() {
        let mut m = Membership::new(HealthPolicy::default());
        let ch = m.sync(&addrs(&["a:1", "b:1"]));
        assert_eq!(ch.joined, addrs(&["a:1", "b:1"]));
        assert!(m.routable().is_empty());
        m.record_success("a:1");
        assert_eq!(m.routable(), addrs(&["a:1"]));
    }

    #[test]
    fn failures_move_a_reader_from_live_to_suspect_to_dead_and_one_success_revives_it() {
        let mut m = Membership::new(HealthPolicy { dead_after: 3 });
        m.sync(&addrs(&["a:1", "b:1"]));
        m.record_success("a:1");
        m.record_success("b:1");
        m.record_failure("a:1");
        assert_eq!(m.state("a:1"), Some(ReaderState::Suspect { failures: 1 }));
        assert_eq!(m.routable(), addrs(&["b:1"]));
        m.record_failure("a:1");
        m.record_failure("a:1");
        assert_eq!(m.state("a:1"), Some(ReaderState::Dead { failures: 3 }));
        m.record_success("a:1");
        assert_eq!(m.state("a:1"), Some(ReaderState::Live));
        assert_eq!(m.routable(), addrs(&["a:1", "b:1"]));
    }

    #[test]
    fn suspect_readers_are_tried_when_no_reader_is_live_but_dead_ones_never() {
        let mut m = Membership::new(HealthPolicy { dead_after: 2 });
        m.sync(&addrs(&["a:1", "b:1"]));
        m.record_failure("a:1");
        m.record_failure("b:1");
        m.record_failure("b:1");
        assert_eq!(m.routable(), addrs(&["a:1"]));
        m.record_failure("a:1");
        assert!(m.routable().is_empty());
    }

    #[test]
    fn a_draining_reader_serves_only_while_no_reader_is_live_and_is_not_counted_as_failing() {
        let mut m = Membership::new(HealthPolicy { dead_after: 2 });
        m.sync(&addrs(&["old:1"]));
        m.record_probe("old:1", Probe::Serving);
        // SIGTERM: it answers "draining" for its shutdown delay, every round.
        for _ in 0..5 {
            m.record_probe("old:1", Probe::Draining);
        }
        assert_eq!(m.state("old:1"), Some(ReaderState::Draining));
        assert_eq!(m.routable(), addrs(&["old:1"]));
        // Its successor shows up late in discovery; until its first probe the old one serves.
        m.sync(&addrs(&["new:1", "old:1"]));
        assert_eq!(m.routable(), addrs(&["old:1"]));
        m.record_probe("new:1", Probe::Serving);
        assert_eq!(m.routable(), addrs(&["new:1"]));
        // A request that failed on it counts once; the next "draining" answer restores it.
        m.record_failure("old:1");
        m.record_probe("old:1", Probe::Draining);
        assert_eq!(m.state("old:1"), Some(ReaderState::Draining));
        // Once it stops answering it dies like any other reader.
        m.record_probe("old:1", Probe::Failed);
        m.record_probe("old:1", Probe::Failed);
        assert_eq!(m.state("old:1"), Some(ReaderState::Dead { failures: 2 }));
    }

    #[test]
    fn a_reader_removed_from_discovery_is_forgotten_and_others_keep_their_state() {
        let mut m = Membership::new(HealthPolicy::default());
        m.sync(&addrs(&["a:1", "b:1"]));
        m.record_success("a:1");
        m.record_success("b:1");
        let ch = m.sync(&addrs(&["b:1", "c:1"]));
        assert_eq!(
            ch,
            MembershipChange {
                joined: addrs(&["c:1"]),
                left: addrs(&["a:1"])
            }
        );
        assert_eq!(m.state("a:1"), None);
        assert_eq!(m.state("b:1"), Some(ReaderState::Live));
        assert_eq!(m.state("c:1"), Some(ReaderState::Joining));
        m.record_success("zzz:1");
        assert_eq!(m.state("zzz:1"), None);
    }

    #[test]
    fn dns_target_must_be_name_colon_port() {
        assert_eq!(
            Discovery::dns("readers.shoal.svc:19531").unwrap(),
            Discovery::Dns {
                name: "readers.shoal.svc".into(),
                port: 19531
            }
        );
        for bad in ["readers", "readers:", ":19531", "readers:0", "readers:x"] {
            assert!(
                matches!(
                    Discovery::dns(bad),
                    Err(DiscoveryError::ParseDnsTarget { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            Discovery::static_list(" a:1, ,b:2,"),
            Discovery::Static(addrs(&["a:1", "b:2"]))
        );
    }

    #[tokio::test]
    async fn file_discovery_rereads_the_file_and_keeps_errors_visible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("readers.txt");
        std::fs::write(
            &path,
            "# readers\n127.0.0.1:2 \n\n127.0.0.1:1 # first\n127.0.0.1:2\n",
        )
        .expect("write");
        let d = Discovery::File(path.clone());
        assert_eq!(
            d.resolve().await.expect("resolve"),
            addrs(&["127.0.0.1:1", "127.0.0.1:2"])
        );
        std::fs::write(&path, "127.0.0.1:3\n").expect("rewrite");
        assert_eq!(d.resolve().await.expect("resolve"), addrs(&["127.0.0.1:3"]));
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(
            d.resolve().await,
            Err(DiscoveryError::ReadFile { .. })
        ));
    }

    #[tokio::test]
    async fn dns_discovery_resolves_every_address_of_the_name() {
        let d = Discovery::dns("localhost:19531").unwrap();
        let found = d.resolve().await.unwrap();
        assert!(found.contains(&"127.0.0.1:19531".to_string()), "{found:?}");
        let bad = Discovery::dns("no-such-host.invalid:1").unwrap();
        assert!(matches!(
            bad.resolve().await,
            Err(DiscoveryError::Resolve { .. })
        ));
    }

    #[tokio::test]
    async fn refresh_probes_every_reader_and_records_the_outcome() {
        let m = Arc::new(Mutex::new(Membership::new(HealthPolicy { dead_after: 2 })));
        let d = Discovery::Static(addrs(&["a:1", "b:1"]));
        let probe = |addr: String| async move {
            if addr == "a:1" {
                Probe::Serving
            } else {
                Probe::Failed
            }
        };
        let ch = refresh(&m, &d, &probe).await;
        assert_eq!(ch.joined.len(), 2);
        assert_eq!(m.lock().routable(), addrs(&["a:1"]));
        refresh(&m, &d, &probe).await;
        assert_eq!(
            m.lock().state("b:1"),
            Some(ReaderState::Dead { failures: 2 })
        );
    }

    #[tokio::test]
    async fn a_reader_replaced_in_discovery_hands_over_in_one_round_with_no_gap() {
        let m = Arc::new(Mutex::new(Membership::new(HealthPolicy::default())));
        let probe = |_addr: String| async move { Probe::Serving };
        refresh(&m, &Discovery::Static(addrs(&["old:1"])), &probe).await;
        assert_eq!(m.lock().routable(), addrs(&["old:1"]));
        // While the round probes, the old set stays in force; then the successor is live.
        let slow = |addr: String| {
            let m = m.clone();
            async move {
                assert_eq!(m.lock().routable(), addrs(&["old:1"]), "probing {addr}");
                // One that left is not probed: a gone address would hold the round up.
                assert_eq!(addr, "new:1", "a reader that left discovery was probed");
                Probe::Serving
            }
        };
        let ch = refresh(&m, &Discovery::Static(addrs(&["new:1"])), &slow).await;
        assert_eq!(ch.left, addrs(&["old:1"]));
        assert_eq!(m.lock().routable(), addrs(&["new:1"]));
    }

    #[tokio::test]
    async fn failed_dns_keeps_the_last_known_readers() {
        let m = Arc::new(Mutex::new(Membership::new(HealthPolicy::default())));
        let probe = |_addr: String| async move { Probe::Serving };
        refresh(&m, &Discovery::Static(addrs(&["a:1"])), &probe).await;
        let bad = Discovery::dns("no-such-host.invalid:1").unwrap();
        refresh(&m, &bad, &probe).await;
        assert_eq!(m.lock().routable(), addrs(&["a:1"]));
    }
}
