//! Catalogue-version synchronisation between the writer, the readers and the router.
//!
//! Every metadata commit has a catalogue version (the lease row's commit sequence, see
//! [`super::lease::fence`]). A reader serves "version V" once it has loaded every segment and
//! tombstone committed up to V. This module owns:
//! - [`VersionGate`]: the reader's served version, advanced by its poller or a push, and
//!   awaited by `NotifySegments` / `min_catalog_version` requests;
//! - [`wait_readers_caught_up`]: the router side of `collections/flush` — push the version to
//!   every live reader in parallel and wait until each serves it (or report the laggards, which
//!   the router marks suspect so no request is planned on a reader missing the new data).
//!
//! Must not depend on the storage core.

use super::fanout::ReaderClients;
use super::pb::NotifySegmentsRequest;
use std::time::Duration;
use tokio::sync::watch;

/// A reader could not reach the wanted version in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("catalogue version {wanted} not reached within the deadline (serving {have})")]
pub struct NotCaughtUp {
    pub wanted: u64,
    pub have: u64,
}

/// The version a reader serves; monotonic.
#[derive(Debug)]
pub struct VersionGate {
    tx: watch::Sender<u64>,
}

impl VersionGate {
    pub fn new(initial: u64) -> Self {
        let (tx, _rx) = watch::channel(initial);
        Self { tx }
    }

    pub fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Record that version `v` is served; never moves backwards.
    pub fn advance(&self, v: u64) {
        self.tx.send_if_modified(|cur| {
            if v > *cur {
                *cur = v;
                true
            } else {
                false
            }
        });
    }

    /// Wait until the served version is at least `wanted`.
    ///
    /// Errors: [`NotCaughtUp`] when `timeout` passes first.
    pub async fn wait_for(&self, wanted: u64, timeout: Duration) -> Result<u64, NotCaughtUp> {
        let mut rx = self.tx.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= wanted)).await;
        match res {
            Ok(Ok(v)) => Ok(*v),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Ok(Err(_)) | Err(_) => Err(NotCaughtUp {
                wanted,
                have: self.current(),
            }),
        }
    }
}

/// Push `version` to every reader in `readers` and wait until each serves it.
/// Returns the readers that did not confirm within `timeout` (error or too slow).
pub async fn wait_readers_caught_up(
    clients: &ReaderClients,
    readers: &[String],
    version: u64,
    timeout: Duration,
) -> Vec<String> {
    let calls = readers.iter().map(|addr| async move {
        let ok = match clients.get(addr) {
            Err(_) => false,
            Ok(mut c) => {
                let mut req = tonic::Request::new(NotifySegmentsRequest {
                    catalog_version: version,
                });
                req.set_timeout(timeout);
                match tokio::time::timeout(timeout, c.notify_segments(req)).await {
                    Ok(Ok(resp)) => resp.into_inner().catalog_version >= version,
                    Ok(Err(_)) | Err(_) => false,
                }
            }
        };
        (addr.clone(), ok)
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(a, _)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pb::reader_server::{Reader, ReaderServer};
    use crate::cluster::pb::{
        GetRowsRequest, HealthRequest, HealthResponse, NotifySegmentsResponse, QueryShardRequest,
        RowsResponse, SearchShardRequest, SearchShardResponse,
    };
    use std::sync::Arc;
    use tonic::{Request, Response, Status};

    #[tokio::test]
    async fn the_gate_only_moves_forward_and_wakes_waiters() {
        let g = Arc::new(VersionGate::new(3));
        g.advance(2);
        assert_eq!(g.current(), 3);
        assert_eq!(g.wait_for(3, Duration::from_millis(1)).await, Ok(3));
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_for(5, Duration::from_secs(10)).await });
        g.advance(4);
        g.advance(6);
        assert_eq!(waiter.await.unwrap(), Ok(6));
        assert_eq!(
            g.wait_for(9, Duration::from_millis(20)).await,
            Err(NotCaughtUp { wanted: 9, have: 6 })
        );
    }

    /// A reader whose gate is advanced by a "poller" after a delay.
    struct GateReader {
        gate: Arc<VersionGate>,
    }

    #[tonic::async_trait]
    impl Reader for GateReader {
        async fn search_shard(
            &self,
            _: Request<SearchShardRequest>,
        ) -> Result<Response<SearchShardResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn get_rows(
            &self,
            _: Request<GetRowsRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn query_shard(
            &self,
            _: Request<QueryShardRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn notify_segments(
            &self,
            req: Request<NotifySegmentsRequest>,
        ) -> Result<Response<NotifySegmentsResponse>, Status> {
            let v = req.into_inner().catalog_version;
            match self.gate.wait_for(v, Duration::from_secs(5)).await {
                Ok(have) => Ok(Response::new(NotifySegmentsResponse {
                    catalog_version: have,
                })),
                Err(e) => Err(Status::deadline_exceeded(e.to_string())),
            }
        }
        async fn health(
            &self,
            _: Request<HealthRequest>,
        ) -> Result<Response<HealthResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
    }

    async fn spawn(gate: Arc<VersionGate>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ReaderServer::new(GateReader { gate }))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn flush_waits_until_every_reader_serves_the_version_and_names_laggards() {
        let fast = Arc::new(VersionGate::new(0));
        let slow = Arc::new(VersionGate::new(0));
        let stuck = Arc::new(VersionGate::new(0));
        let addrs = vec![
            spawn(fast.clone()).await,
            spawn(slow.clone()).await,
            spawn(stuck.clone()).await,
        ];
        fast.advance(7);
        let slow2 = slow.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            slow2.advance(7);
        });
        let clients = ReaderClients::new(Duration::from_secs(1));
        let laggards =
            wait_readers_caught_up(&clients, &addrs, 7, Duration::from_millis(1500)).await;
        assert_eq!(laggards, vec![addrs[2].clone()]);
        assert_eq!(slow.current(), 7);
    }
}
