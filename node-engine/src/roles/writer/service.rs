//! The writer role's gRPC service, generic over the storage that applies the writes.
//!
//! Owns: the `Writer` gRPC surface the router forwards to (collection DDL, insert/upsert,
//! delete, flush, health), the rule that a write is acknowledged only while this process holds
//! the writer lease (checked before the write and again after it is durable, so a writer that
//! lost its lease mid-write never acknowledges), and the exhaustive mapping from write errors
//! to gRPC codes.
//!
//! Does not own the WAL, segments or metadata: a [`WriterBackend`] does (the adapter over the
//! storage core is `super::EngineWriter`; its metadata store is fenced with the lease epoch via
//! `MetaStore::set_fence`, so every commit runs [`super::lease::fence`]'s check). The
//! "answered by the writer" mark on its errors is [`crate::rpc::status::answered`].

use super::lease::{LeaseError, LeaseKeeper};
use crate::rpc::pb::writer_server::Writer;
use crate::rpc::pb::{
    CreateCollectionRequest, CreateCollectionResponse, CreateIndexRequest, CreateIndexResponse,
    DeleteRequest, DeleteResponse, DropCollectionRequest, DropCollectionResponse, DropIndexRequest,
    DropIndexResponse, FlushRequest, FlushResponse, HealthRequest, HealthResponse, InsertRequest,
    InsertResponse, SetLoadedRequest, SetLoadedResponse,
};
use crate::rpc::status::answered;
use std::future::Future;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Errors a writer backend reports.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("collection {0:?} not found")]
    CollectionNotFound(String),
    #[error("collection {0:?} already exists")]
    CollectionExists(String),
    /// The request is wrong (dimension, NaN component, bad filter, bad row): nothing changed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A metadata commit was refused because a newer writer took over.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Disk, WAL or metadata store failure.
    #[error("storage failure: {0}")]
    Storage(String),
}

/// The one mapping from write errors to gRPC codes (no catch-all arm).
pub fn to_status(e: &WriteError) -> Status {
    answered(match e {
        WriteError::CollectionNotFound(_) => Status::not_found(e.to_string()),
        WriteError::CollectionExists(_) => Status::already_exists(e.to_string()),
        WriteError::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
        WriteError::Fenced(_) => Status::failed_precondition(e.to_string()),
        WriteError::Storage(_) => Status::unavailable(e.to_string()),
    })
}

/// Lease problems surface as "not the writer": the router must not retry on this process.
fn lease_status(e: &LeaseError) -> Status {
    answered(match e {
        LeaseError::Lost { .. }
        | LeaseError::Expired { .. }
        | LeaseError::Fenced { .. }
        | LeaseError::Held { .. } => {
            Status::failed_precondition(format!("this process is not the writer: {e}"))
        }
        LeaseError::Store { .. } => Status::unavailable(e.to_string()),
    })
}

/// What applies the writes. Every method gets the epoch it must carry into metadata commits.
pub trait WriterBackend: Send + Sync + 'static {
    /// Create a collection; returns the catalogue version of the commit.
    fn create_collection(
        &self,
        r: CreateCollectionRequest,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    fn drop_collection(
        &self,
        name: String,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Make the rows durable (WAL fsynced); returns their ids in request order.
    fn insert(
        &self,
        r: InsertRequest,
        epoch: u64,
    ) -> impl Future<Output = Result<Vec<i64>, WriteError>> + Send;
    /// Delete rows matching a filter durably; returns how many were live.
    fn delete(
        &self,
        collection: String,
        filter: String,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Seal and commit everything acknowledged so far (one collection, or all when `None`);
    /// returns the catalogue version readers must reach to serve it.
    fn flush(
        &self,
        collection: Option<String>,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Load or release a collection; returns the catalogue version of the commit.
    fn set_loaded(
        &self,
        collection: String,
        loaded: bool,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Create (or replace) an index definition, as REST `indexes/create` does for one entry;
    /// returns the catalogue version of the commit.
    fn create_index(
        &self,
        r: CreateIndexRequest,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Drop an index definition, as REST `indexes/drop` does; returns the catalogue version.
    fn drop_index(
        &self,
        collection: String,
        index_name: String,
        epoch: u64,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// The latest committed catalogue version.
    fn catalog_version(&self) -> u64;
}

/// The writer's gRPC service.
pub struct WriterService<B> {
    backend: Arc<B>,
    keeper: LeaseKeeper,
    node_id: String,
}

impl<B: WriterBackend> WriterService<B> {
    pub fn new(backend: Arc<B>, keeper: LeaseKeeper, node_id: String) -> Self {
        Self {
            backend,
            keeper,
            node_id,
        }
    }

    fn epoch(&self) -> Result<u64, Status> {
        self.keeper.check().map_err(|e| lease_status(&e))
    }
}

#[tonic::async_trait]
impl<B: WriterBackend> Writer for WriterService<B> {
    async fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let epoch = self.epoch()?;
        let v = self
            .backend
            .create_collection(req.into_inner(), epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(CreateCollectionResponse {
            catalog_version: v,
        }))
    }

    async fn drop_collection(
        &self,
        req: Request<DropCollectionRequest>,
    ) -> Result<Response<DropCollectionResponse>, Status> {
        let epoch = self.epoch()?;
        let v = self
            .backend
            .drop_collection(req.into_inner().collection, epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(DropCollectionResponse { catalog_version: v }))
    }

    async fn insert(
        &self,
        req: Request<InsertRequest>,
    ) -> Result<Response<InsertResponse>, Status> {
        let epoch = self.epoch()?;
        let ids = self
            .backend
            .insert(req.into_inner(), epoch)
            .await
            .map_err(|e| to_status(&e))?;
        // Durable now; acknowledge only if the lease still holds (a successor may replay it).
        let still = self.epoch()?;
        if still != epoch {
            return Err(answered(Status::failed_precondition(format!(
                "writer epoch changed from {epoch} to {still} during the write"
            ))));
        }
        Ok(Response::new(InsertResponse { ids, epoch }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let epoch = self.epoch()?;
        let r = req.into_inner();
        let n = self
            .backend
            .delete(r.collection, r.filter, epoch)
            .await
            .map_err(|e| to_status(&e))?;
        self.epoch()?;
        Ok(Response::new(DeleteResponse { delete_count: n }))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let epoch = self.epoch()?;
        let c = Some(req.into_inner().collection).filter(|c| !c.is_empty());
        let v = self
            .backend
            .flush(c, epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(FlushResponse { catalog_version: v }))
    }

    async fn set_loaded(
        &self,
        req: Request<SetLoadedRequest>,
    ) -> Result<Response<SetLoadedResponse>, Status> {
        let epoch = self.epoch()?;
        let r = req.into_inner();
        let v = self
            .backend
            .set_loaded(r.collection, r.loaded, epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(SetLoadedResponse { catalog_version: v }))
    }

    async fn create_index(
        &self,
        req: Request<CreateIndexRequest>,
    ) -> Result<Response<CreateIndexResponse>, Status> {
        let epoch = self.epoch()?;
        let v = self
            .backend
            .create_index(req.into_inner(), epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(CreateIndexResponse { catalog_version: v }))
    }

    async fn drop_index(
        &self,
        req: Request<DropIndexRequest>,
    ) -> Result<Response<DropIndexResponse>, Status> {
        let epoch = self.epoch()?;
        let r = req.into_inner();
        let v = self
            .backend
            .drop_index(r.collection, r.index_name, epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(DropIndexResponse { catalog_version: v }))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let epoch = self.keeper.check().ok();
        Ok(Response::new(HealthResponse {
            node_id: self.node_id.clone(),
            role: "writer".into(),
            ready: epoch.is_some(),
            catalog_version: self.backend.catalog_version(),
            epoch: epoch.unwrap_or(0),
            draining: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::writer::lease;
    use crate::rpc::pb::Row;
    use crate::rpc::pb::writer_client::WriterClient;
    use crate::rpc::pb::writer_server::WriterServer;
    use crate::rpc::status::is_answer;
    use parking_lot::Mutex;
    use sqlx::any::AnyPoolOptions;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Rows kept in memory; metadata commits are fenced on the real lease table.
    struct MemWriter {
        pool: sqlx::AnyPool,
        rows: Mutex<Vec<i64>>,
    }

    impl WriterBackend for MemWriter {
        async fn create_collection(
            &self,
            r: CreateCollectionRequest,
            _epoch: u64,
        ) -> Result<u64, WriteError> {
            if r.collection == "unwritable" {
                return Err(WriteError::Storage(
                    "failed to create WAL directory /wal/c1: Permission denied (os error 13)"
                        .into(),
                ));
            }
            Ok(0)
        }
        async fn drop_collection(&self, _name: String, _epoch: u64) -> Result<u64, WriteError> {
            Ok(0)
        }
        async fn insert(&self, r: InsertRequest, _epoch: u64) -> Result<Vec<i64>, WriteError> {
            if r.collection != "c" {
                return Err(WriteError::CollectionNotFound(r.collection));
            }
            let ids: Vec<i64> = r.rows.iter().map(|row| row.id.unwrap_or(0)).collect();
            self.rows.lock().extend(&ids);
            Ok(ids)
        }
        async fn delete(&self, _c: String, _f: String, _epoch: u64) -> Result<u64, WriteError> {
            Ok(0)
        }
        async fn flush(&self, _c: Option<String>, epoch: u64) -> Result<u64, WriteError> {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| WriteError::Storage(e.to_string()))?;
            let v = lease::fence(&mut tx, epoch).await.map_err(|e| match e {
                LeaseError::Fenced { .. } => WriteError::Fenced(e.to_string()),
                other => WriteError::Storage(other.to_string()),
            })?;
            tx.commit()
                .await
                .map_err(|e| WriteError::Storage(e.to_string()))?;
            Ok(v)
        }
        async fn set_loaded(&self, c: String, _l: bool, _epoch: u64) -> Result<u64, WriteError> {
            Err(WriteError::CollectionNotFound(c))
        }
        async fn create_index(&self, r: CreateIndexRequest, _e: u64) -> Result<u64, WriteError> {
            Err(WriteError::InvalidRequest(format!(
                "index type {:?} is not supported",
                r.index_type
            )))
        }
        async fn drop_index(&self, c: String, _i: String, _e: u64) -> Result<u64, WriteError> {
            Err(WriteError::CollectionNotFound(c))
        }
        fn catalog_version(&self) -> u64 {
            0
        }
    }

    #[tokio::test]
    async fn a_storage_error_is_the_writers_answer_and_is_relayed_not_reported_as_a_broken_connection()
     {
        use crate::rpc::status::{ForwardFailure, forward_failure, status_to_api};
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
        let pool = AnyPoolOptions::new().connect(&url).await.unwrap();
        lease::ensure_schema(&pool).await.unwrap();
        let ttl = Duration::from_secs(30);
        let t = Instant::now();
        let l = lease::try_acquire(&pool, "w1", ttl, lease::now_ms())
            .await
            .unwrap();
        let keeper = LeaseKeeper::new(&l, ttl, Duration::from_secs(1), t);
        let backend = Arc::new(MemWriter {
            pool: pool.clone(),
            rows: Mutex::new(vec![]),
        });
        let svc = WriterService::new(backend, keeper, "w1".into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(WriterServer::new(svc))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        let mut c = WriterClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let s = c
            .create_collection(CreateCollectionRequest {
                collection: "unwritable".into(),
                dimension: 4,
                ..Default::default()
            })
            .await
            .expect_err("the backend's storage failure");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(is_answer(&s), "{s:?}");
        assert_eq!(forward_failure(&s), ForwardFailure::Answered);
        let api = status_to_api("writer", &s);
        assert_eq!(api.code, crate::api::error::code::INTERNAL);
        assert!(api.message.contains("Permission denied"), "{api:?}");
        assert!(!api.message.contains("connection"), "{api:?}");

        // The same code from the transport (nothing listens) is not an answer.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let s = WriterClient::connect(format!("http://{closed}"))
            .await
            .map(|_| ())
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
            .expect_err("nothing listens");
        assert!(!is_answer(&s));
        assert_ne!(forward_failure(&s), ForwardFailure::Answered);
    }

    #[tokio::test]
    async fn a_writer_that_loses_its_lease_stops_acknowledging_and_its_flush_is_fenced() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap();
        lease::ensure_schema(&pool).await.unwrap();
        let ttl = Duration::from_millis(400);
        let t = Instant::now();
        let l = lease::try_acquire(&pool, "w1", ttl, lease::now_ms())
            .await
            .unwrap();
        let keeper = LeaseKeeper::new(&l, ttl, Duration::from_millis(100), t);
        let renewer = tokio::spawn(keeper.clone().run(pool.clone(), l.clone()));
        let backend = Arc::new(MemWriter {
            pool: pool.clone(),
            rows: Mutex::new(vec![]),
        });
        let svc = WriterService::new(backend.clone(), keeper, "w1".into());

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(WriterServer::new(svc))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        let mut c = WriterClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let row = |id| Row {
            id: Some(id),
            vector: vec![1.0],
            dynamic_json: b"{}".to_vec(),
        };
        let ok = c
            .insert(InsertRequest {
                collection: "c".into(),
                rows: vec![row(1)],
                upsert: false,
            })
            .await
            .unwrap();
        assert_eq!(
            ok.into_inner(),
            InsertResponse {
                ids: vec![1],
                epoch: l.epoch
            }
        );
        let v1 = c
            .flush(FlushRequest::default())
            .await
            .unwrap()
            .into_inner()
            .catalog_version;
        assert!(v1 > 0);
        let nf = c
            .insert(InsertRequest {
                collection: "x".into(),
                rows: vec![row(2)],
                upsert: false,
            })
            .await;
        assert_eq!(nf.unwrap_err().code(), tonic::Code::NotFound);
        // The catalogue RPCs carry backend errors through the same mapping.
        let bad_index = c
            .create_index(CreateIndexRequest {
                collection: "c".into(),
                index_type: "BOGUS".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad_index.code(), tonic::Code::InvalidArgument);
        let nf = c
            .set_loaded(SetLoadedRequest {
                collection: "x".into(),
                loaded: true,
            })
            .await
            .unwrap_err();
        assert_eq!(nf.code(), tonic::Code::NotFound);
        let nf = c
            .drop_index(DropIndexRequest {
                collection: "x".into(),
                index_name: "i".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(nf.code(), tonic::Code::NotFound);
        let h = c.health(HealthRequest {}).await.unwrap().into_inner();
        assert!(h.ready && h.epoch == l.epoch && h.role == "writer");

        // A second writer takes over after expiry (simulated by taking over at a later clock).
        let l2 = lease::try_acquire(&pool, "w2", ttl, lease::now_ms() + 10_000)
            .await
            .unwrap();
        assert_eq!(l2.epoch, l.epoch + 1);
        renewer.await.unwrap();
        let refused = c
            .insert(InsertRequest {
                collection: "c".into(),
                rows: vec![row(3)],
                upsert: false,
            })
            .await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            *backend.rows.lock(),
            vec![1],
            "a refused write reached storage"
        );
        let fenced = c.flush(FlushRequest::default()).await.unwrap_err();
        assert_eq!(fenced.code(), tonic::Code::FailedPrecondition);
        assert!(!c.health(HealthRequest {}).await.unwrap().into_inner().ready);
        // Directly: the old epoch's commit is refused by the store itself.
        let direct = backend.flush(None, l.epoch).await.unwrap_err();
        assert!(matches!(direct, WriteError::Fenced(_)), "{direct:?}");
    }

    #[test]
    fn write_errors_map_to_distinct_codes() {
        let codes: Vec<tonic::Code> = [
            WriteError::CollectionNotFound("c".into()),
            WriteError::CollectionExists("c".into()),
            WriteError::InvalidRequest("dim".into()),
            WriteError::Fenced("old".into()),
            WriteError::Storage("disk".into()),
        ]
        .iter()
        .map(|e| to_status(e).code())
        .collect();
        assert_eq!(
            codes,
            vec![
                tonic::Code::NotFound,
                tonic::Code::AlreadyExists,
                tonic::Code::InvalidArgument,
                tonic::Code::FailedPrecondition,
                tonic::Code::Unavailable
            ]
        );
    }
}
