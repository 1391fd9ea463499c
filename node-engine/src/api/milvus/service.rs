//! [`MilvusApi`]: `milvus.proto.milvus.MilvusService` over a [`Backend`]. Each RPC validates its
//! request in full (through [`super::convert`] and, for index definitions, the same parser as
//! REST `indexes/create`), then calls the backend; every failure is a Milvus status inside an
//! OK gRPC response, as Milvus answers, so the SDKs raise `MilvusException` with its text.

use super::convert::{
    columns, count_column, ids_pb, output_plan, queries_from_placeholder, rows_from_pb,
    schema_from_pb, schema_to_pb,
};
use super::pb::common::{
    ErrorCode, IndexState, KeyValuePair, LoadState, ServerInfo, Status as PbStatus,
};
use super::pb::milvus::milvus_service_server::MilvusService;
use super::pb::milvus::*;
use super::pb::schema::{CollectionSchema, LongArray, SearchResultData};
use super::status::{MERR_INDEX_NOT_FOUND, failed, invalid, not_supported, ok, status_of};
use crate::api::backend::{
    Backend, CollectionMeta, FilterExpr, QueryRequest as BQuery, SearchRequest as BSearch,
    WriteRows,
};
use crate::api::error::ApiError;
use crate::api::indexes;
use crate::api::rest::{Ctx, MAX_TOPK, RestState};
use crate::core::filter::Filter;
use crate::core::index::SearchParams;
use crate::core::types::Metric;
use prost::Message as _;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tonic::{Request, Response};

type RpcResult<T> = Result<Response<T>, tonic::Status>;

/// The version reported by `GetVersion`/`Connect`: the Milvus API level Shoal follows, then
/// Shoal's own version.
pub fn version() -> String {
    format!("v2.5.0-shoal-{}", env!("CARGO_PKG_VERSION"))
}

/// The only partition a Shoal collection has.
const DEFAULT_PARTITION: &str = "_default";

/// Search parameters that select features Shoal does not serve.
const UNSUPPORTED_SEARCH_PARAMS: &[&str] = &[
    "group_by_field",
    "group_by_fields",
    "group_size",
    "strict_group_size",
    "iterator",
    "search_iter_v2",
    "search_iter_batch_size",
    "search_iter_last_bound",
    "search_iter_id",
    "order_by_fields",
];

/// The Milvus service over backend `B` (shares the REST state: backend, token, metrics).
pub struct MilvusApi<B> {
    state: Arc<RestState<B>>,
    connections: AtomicI64,
}

impl<B> MilvusApi<B> {
    pub fn new(state: Arc<RestState<B>>) -> Self {
        Self {
            state,
            connections: AtomicI64::new(1),
        }
    }
}

/// Responses that carry a status as field 1.
trait WithStatus: Default {
    fn set_status(&mut self, s: PbStatus);
    fn failed(s: PbStatus) -> Self {
        let mut r = Self::default();
        r.set_status(s);
        r
    }
}

macro_rules! with_status {
    ($($t:ty),* $(,)?) => {$(
        impl WithStatus for $t {
            fn set_status(&mut self, s: PbStatus) {
                self.status = Some(s);
            }
        }
    )*};
}

with_status!(
    BoolResponse,
    DescribeCollectionResponse,
    GetCollectionStatisticsResponse,
    ShowCollectionsResponse,
    GetPartitionStatisticsResponse,
    ShowPartitionsResponse,
    GetLoadingProgressResponse,
    GetLoadStateResponse,
    DescribeAliasResponse,
    ListAliasesResponse,
    DescribeIndexResponse,
    GetIndexStateResponse,
    GetIndexBuildProgressResponse,
    MutationResult,
    SearchResults,
    FlushResponse,
    GetFlushStateResponse,
    QueryResults,
    GetVersionResponse,
    CheckHealthResponse,
    ConnectResponse,
    ListDatabasesResponse,
    AllocTimestampResponse,
);

fn answer<T: WithStatus>(r: Result<T, PbStatus>) -> RpcResult<T> {
    Ok(Response::new(match r {
        Ok(mut v) => {
            v.set_status(ok());
            v
        }
        Err(s) => T::failed(s),
    }))
}

fn answer_status(r: Result<(), PbStatus>) -> RpcResult<PbStatus> {
    Ok(Response::new(r.err().unwrap_or_else(ok)))
}

fn api(e: ApiError) -> PbStatus {
    status_of(&e)
}

fn check_db(db: &str) -> Result<(), PbStatus> {
    match db {
        "" | "default" => Ok(()),
        other => Err(invalid(format!(
            "database {other:?} not found: Shoal has only the \"default\" database"
        ))),
    }
}

/// Partition names a request may carry: none, or only `_default`.
fn check_partitions<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<(), PbStatus> {
    for n in names {
        if !n.is_empty() && n != DEFAULT_PARTITION {
            return Err(failed(
                ErrorCode::UnexpectedError,
                200,
                format!(
                    "partition not found[partition={n}]: Shoal collections have only the \
                     {DEFAULT_PARTITION} partition"
                ),
            ));
        }
    }
    Ok(())
}

fn parse_filter(expr: &str) -> Result<Option<FilterExpr>, PbStatus> {
    if expr.trim().is_empty() {
        return Ok(None);
    }
    Filter::parse(expr)
        .map(|parsed| {
            Some(FilterExpr {
                text: expr.to_string(),
                parsed,
            })
        })
        .map_err(|e| invalid(format!("cannot parse expression {expr:?}: {e}")))
}

fn no_templates<V>(m: &std::collections::HashMap<String, V>) -> Result<(), PbStatus> {
    if m.is_empty() {
        Ok(())
    } else {
        Err(not_supported("filter templates (expr_template_values)"))
    }
}

fn kv(k: &str, v: impl ToString) -> KeyValuePair {
    KeyValuePair {
        key: k.into(),
        value: v.to_string(),
    }
}

fn parse_int(key: &str, v: &str) -> Result<i64, PbStatus> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| invalid(format!("{key} {v:?} is not an integer")))
}

/// The validated parts of a search's `search_params`.
#[derive(Debug, Default)]
struct SearchOptions {
    limit: usize,
    offset: usize,
    params: SearchParams,
    radius: Option<f32>,
    round_decimal: Option<i32>,
}

fn search_options(
    s: &crate::core::storage::collection::Schema,
    kvs: &[KeyValuePair],
) -> Result<SearchOptions, PbStatus> {
    let mut o = SearchOptions::default();
    let mut topk = None;
    for p in kvs {
        let (k, v) = (p.key.as_str(), p.value.as_str());
        if UNSUPPORTED_SEARCH_PARAMS.contains(&k) {
            if k == "iterator" && v.eq_ignore_ascii_case("false") {
                continue;
            }
            return Err(not_supported(&format!("search parameter {k:?}")));
        }
        match k {
            "topk" => topk = Some(parse_int("limit", v)?),
            "offset" => {
                let n = parse_int("offset", v)?;
                o.offset =
                    usize::try_from(n).map_err(|_| invalid(format!("offset {n} must be >= 0")))?;
            }
            "anns_field" if !v.is_empty() && v != s.vector_field => {
                return Err(invalid(format!(
                    "anns_field {v:?} is not the vector field {:?}",
                    s.vector_field
                )));
            }
            "metric_type" if !v.is_empty() => {
                let m = v
                    .parse::<Metric>()
                    .map_err(|e| invalid(format!("metric_type: {e}")))?;
                if m != s.metric {
                    return Err(invalid(format!(
                        "metric type not match: the index uses {}, the search asks {m}",
                        s.metric
                    )));
                }
            }
            "round_decimal" => {
                let n = parse_int("round_decimal", v)?;
                if !(-1..=6).contains(&n) {
                    return Err(invalid(format!("round_decimal {n} is outside [-1, 6]")));
                }
                o.round_decimal = (n >= 0).then_some(n as i32);
            }
            "params" if !v.trim().is_empty() => {
                let m: Map<String, Value> = serde_json::from_str(v).map_err(|e| {
                    invalid(format!("search params {v:?} are not a JSON object: {e}"))
                })?;
                for (pk, pv) in &m {
                    match pk.as_str() {
                        "nprobe" | "ef" => {
                            let n = pv
                                .as_u64()
                                .filter(|n| (1..=65_536).contains(n))
                                .ok_or_else(|| {
                                    invalid(format!("params.{pk} must be an integer in [1, 65536]"))
                                })?;
                            if pk == "nprobe" {
                                o.params.nprobe = Some(n as usize);
                            } else {
                                o.params.ef = Some(n as usize);
                            }
                        }
                        "radius" => {
                            o.radius = Some(
                                pv.as_f64()
                                    .ok_or_else(|| invalid("params.radius must be a number"))?
                                    as f32,
                            )
                        }
                        "range_filter" => {
                            return Err(not_supported(
                                "range search with range_filter (radius alone is served)",
                            ));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let topk = topk.ok_or_else(|| invalid("search_params has no topk (limit)"))?;
    let max = MAX_TOPK as i64;
    if !(1..=max).contains(&topk) {
        return Err(invalid(format!("limit {topk} is outside [1, {MAX_TOPK}]")));
    }
    o.limit = topk as usize;
    if o.limit + o.offset > MAX_TOPK {
        return Err(invalid(format!(
            "limit + offset ({}) exceeds {MAX_TOPK}",
            o.limit + o.offset
        )));
    }
    Ok(o)
}

/// Index definition keys Milvus SDKs send in `extra_params` besides the build parameters.
fn index_definition(
    c: &CollectionMeta,
    r: &CreateIndexRequest,
) -> Result<(Map<String, Value>, Option<Metric>), PbStatus> {
    let s = &c.schema;
    if !r.field_name.is_empty() && r.field_name != s.vector_field {
        return Err(not_supported(&format!(
            "an index on {:?} (only the vector field {:?} is indexed)",
            r.field_name, s.vector_field
        )));
    }
    let mut def = Map::new();
    def.insert("fieldName".into(), json!(s.vector_field));
    if !r.index_name.is_empty() {
        def.insert("indexName".into(), json!(r.index_name));
    }
    let mut params = Map::new();
    let mut metric = None;
    for p in &r.extra_params {
        match p.key.as_str() {
            "index_type" => {
                def.insert("indexType".into(), json!(p.value));
            }
            "metric_type" => {
                let m = p
                    .value
                    .parse::<Metric>()
                    .map_err(|e| invalid(format!("metric_type: {e}")))?;
                metric = Some(m);
                def.insert("metricType".into(), json!(m.as_str()));
            }
            "params" => match serde_json::from_str::<Value>(&p.value) {
                Ok(Value::Object(m)) => params.extend(m),
                _ => {
                    return Err(invalid(format!(
                        "index params {:?} are not a JSON object",
                        p.value
                    )));
                }
            },
            // Older SDKs send build parameters (nlist, M, ...) at the top level.
            k => {
                let v = serde_json::from_str::<Value>(&p.value).unwrap_or(json!(p.value));
                params.insert(k.to_string(), v);
            }
        }
    }
    if !params.is_empty() {
        def.insert("params".into(), Value::Object(params));
    }
    Ok((def, metric))
}

impl<B: Backend> MilvusApi<B> {
    fn backend(&self) -> &B {
        &self.state.backend
    }

    async fn collection(&self, db: &str, name: &str) -> Result<CollectionMeta, PbStatus> {
        check_db(db)?;
        if name.is_empty() {
            return Err(failed(
                ErrorCode::IllegalArgument,
                1101,
                "missing required parameter collection_name",
            ));
        }
        self.backend().collection(name).await.map_err(api)
    }

    /// The REST request envelope for the shared index helpers.
    fn envelope(name: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("collectionName".into(), json!(name));
        m
    }

    /// Collection `c` with metric `m`: Shoal keeps the metric on the collection, so an index
    /// that names another metric re-creates a collection that holds no rows (Milvus's quick
    /// setup creates the collection, then names the metric in its index); with rows it is
    /// refused.
    async fn adopt_metric(&self, c: CollectionMeta, m: Metric) -> Result<CollectionMeta, PbStatus> {
        if m == c.schema.metric {
            return Ok(c);
        }
        // Through a router the count covers flushed rows only: flush first, so rows
        // acknowledged before this request are counted and never dropped with the collection.
        // (A write that races this request is not covered: open, see the README.)
        self.backend().flush(&c).await.map_err(api)?;
        let rows = self.backend().row_count(&c).await.map_err(api)?;
        if rows > 0 {
            return Err(invalid(format!(
                "metric type {m} differs from the collection's {} and the collection holds \
                 {rows} rows: Shoal keeps one metric per collection; re-create it to change it",
                c.schema.metric
            )));
        }
        let mut schema = c.schema.clone();
        schema.metric = m;
        self.backend().drop_collection(&c).await.map_err(api)?;
        self.backend()
            .create_collection(schema.clone())
            .await
            .map_err(api)?;
        let fresh = self.backend().collection(&schema.name).await.map_err(api)?;
        if c.loaded && !fresh.loaded {
            self.backend().set_loaded(&fresh, true).await.map_err(api)?;
        }
        self.backend().collection(&schema.name).await.map_err(api)
    }

    /// The index records matching a request's index and field names (empty names match all).
    async fn find_indexes(
        &self,
        c: &CollectionMeta,
        index_name: &str,
        field_name: &str,
    ) -> Result<Vec<crate::core::meta::IndexRecord>, PbStatus> {
        let recs: Vec<_> = self
            .backend()
            .indexes(c)
            .await
            .map_err(api)?
            .into_iter()
            .filter(|r| index_name.is_empty() || r.index_name == index_name)
            .filter(|r| field_name.is_empty() || r.field_name == field_name)
            .collect();
        if recs.is_empty() {
            return Err(failed(
                ErrorCode::IndexNotExist,
                MERR_INDEX_NOT_FOUND,
                format!(
                    "index not found[collection={}, index={index_name:?}]",
                    c.schema.name
                ),
            ));
        }
        Ok(recs)
    }

    async fn write(
        &self,
        db: &str,
        name: &str,
        partition: &str,
        fields: &[super::pb::schema::FieldData],
        num_rows: u32,
        upsert: bool,
    ) -> Result<MutationResult, PbStatus> {
        let c = self.collection(db, name).await?;
        check_partitions([&partition.to_string()])?;
        let batch = rows_from_pb(&c.schema, fields, num_rows, upsert)?;
        let n = batch.vectors.len() / batch.dim.max(1);
        let ids = self
            .backend()
            .write(
                &c,
                WriteRows {
                    batch,
                    rows: n,
                    upsert,
                },
            )
            .await
            .map_err(api)?;
        self.state.metrics.rows_inserted(n);
        let count = ids.len() as i64;
        Ok(MutationResult {
            succ_index: (0..ids.len() as u32).collect(),
            insert_cnt: if upsert { 0 } else { count },
            upsert_cnt: if upsert { count } else { 0 },
            i_ds: Some(ids_pb(ids)),
            ..MutationResult::default()
        })
    }
}

#[tonic::async_trait]
impl<B: Backend> MilvusService for MilvusApi<B> {
    async fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                check_db(&r.db_name)?;
                if r.collection_name.is_empty() {
                    return Err(invalid("collection_name is empty"));
                }
                if let Some(p) = r.properties.first() {
                    return Err(not_supported(&format!("collection property {:?}", p.key)));
                }
                let pb = CollectionSchema::decode(r.schema.as_slice())
                    .map_err(|e| invalid(format!("malformed collection schema: {e}")))?;
                let schema = schema_from_pb(&r.collection_name, &pb)?;
                crate::core::engine::validate_schema(&schema)
                    .map_err(|e| api(ApiError::from(e)))?;
                if let Ok(existing) = self.backend().collection(&schema.name).await {
                    // Milvus: re-creating an identical collection succeeds.
                    let mut same = existing.schema.clone();
                    same.metric = schema.metric;
                    return if same == schema {
                        Ok(())
                    } else {
                        Err(invalid(format!(
                            "collection {:?} already exists with a different schema",
                            schema.name
                        )))
                    };
                }
                self.backend().create_collection(schema).await.map_err(api)
            }
            .await,
        )
    }

    async fn drop_collection(&self, req: Request<DropCollectionRequest>) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                match self.collection(&r.db_name, &r.collection_name).await {
                    Ok(c) => self.backend().drop_collection(&c).await.map_err(api),
                    // Milvus: dropping a collection that does not exist succeeds.
                    Err(s) if s.code == 100 => Ok(()),
                    Err(s) => Err(s),
                }
            }
            .await,
        )
    }

    async fn has_collection(&self, req: Request<HasCollectionRequest>) -> RpcResult<BoolResponse> {
        let r = req.into_inner();
        answer(
            async {
                let value = match self.collection(&r.db_name, &r.collection_name).await {
                    Ok(_) => true,
                    Err(s) if s.code == 100 => false,
                    Err(s) => return Err(s),
                };
                Ok(BoolResponse {
                    value,
                    ..BoolResponse::default()
                })
            }
            .await,
        )
    }

    async fn load_collection(&self, req: Request<LoadCollectionRequest>) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                self.backend().set_loaded(&c, true).await.map_err(api)
            }
            .await,
        )
    }

    async fn release_collection(
        &self,
        req: Request<ReleaseCollectionRequest>,
    ) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                self.backend().set_loaded(&c, false).await.map_err(api)
            }
            .await,
        )
    }

    async fn describe_collection(
        &self,
        req: Request<DescribeCollectionRequest>,
    ) -> RpcResult<DescribeCollectionResponse> {
        let r = req.into_inner();
        answer(
            async {
                if r.collection_name.is_empty() && r.collection_id != 0 {
                    return Err(not_supported("DescribeCollection by collectionID"));
                }
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                Ok(DescribeCollectionResponse {
                    schema: Some(schema_to_pb(&c.schema)),
                    collection_id: c.id,
                    collection_name: c.schema.name.clone(),
                    db_name: "default".into(),
                    shards_num: 1,
                    num_partitions: 1,
                    // Standalone reads see every acknowledged write; through a router rows are read once
                    // sealed (Bounded staleness): report what holds for both.
                    consistency_level: super::pb::common::ConsistencyLevel::Bounded as i32,
                    virtual_channel_names: vec![format!("shoal-{}", c.id)],
                    physical_channel_names: vec![format!("shoal-{}", c.id)],
                    ..DescribeCollectionResponse::default()
                })
            }
            .await,
        )
    }

    async fn get_collection_statistics(
        &self,
        req: Request<GetCollectionStatisticsRequest>,
    ) -> RpcResult<GetCollectionStatisticsResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let n = self.backend().row_count(&c).await.map_err(api)?;
                Ok(GetCollectionStatisticsResponse {
                    stats: vec![kv("row_count", n)],
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn show_collections(
        &self,
        req: Request<ShowCollectionsRequest>,
    ) -> RpcResult<ShowCollectionsResponse> {
        let r = req.into_inner();
        answer(
            async {
                check_db(&r.db_name)?;
                let names = self.backend().list_collections().await.map_err(api)?;
                let mut out = ShowCollectionsResponse::default();
                for n in names {
                    // A collection dropped since the listing is skipped.
                    let Ok(c) = self.backend().collection(&n).await else {
                        continue;
                    };
                    out.collection_ids.push(c.id);
                    out.created_timestamps.push(0);
                    out.created_utc_timestamps.push(0);
                    out.in_memory_percentages
                        .push(if c.loaded { 100 } else { 0 });
                    out.query_service_available.push(c.loaded);
                    out.shards_num.push(1);
                    out.collection_names.push(n);
                }
                Ok(out)
            }
            .await,
        )
    }

    async fn has_partition(&self, req: Request<HasPartitionRequest>) -> RpcResult<BoolResponse> {
        let r = req.into_inner();
        answer(
            async {
                self.collection(&r.db_name, &r.collection_name).await?;
                Ok(BoolResponse {
                    value: r.partition_name == DEFAULT_PARTITION,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn load_partitions(&self, req: Request<LoadPartitionsRequest>) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions(&r.partition_names)?;
                self.backend().set_loaded(&c, true).await.map_err(api)
            }
            .await,
        )
    }

    async fn release_partitions(
        &self,
        req: Request<ReleasePartitionsRequest>,
    ) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions(&r.partition_names)?;
                self.backend().set_loaded(&c, false).await.map_err(api)
            }
            .await,
        )
    }

    async fn get_partition_statistics(
        &self,
        req: Request<GetPartitionStatisticsRequest>,
    ) -> RpcResult<GetPartitionStatisticsResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions([&r.partition_name])?;
                let n = self.backend().row_count(&c).await.map_err(api)?;
                Ok(GetPartitionStatisticsResponse {
                    stats: vec![kv("row_count", n)],
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn show_partitions(
        &self,
        req: Request<ShowPartitionsRequest>,
    ) -> RpcResult<ShowPartitionsResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions(&r.partition_names)?;
                Ok(ShowPartitionsResponse {
                    partition_names: vec![DEFAULT_PARTITION.into()],
                    partition_i_ds: vec![c.id],
                    created_timestamps: vec![0],
                    created_utc_timestamps: vec![0],
                    in_memory_percentages: vec![if c.loaded { 100 } else { 0 }],
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn get_loading_progress(
        &self,
        req: Request<GetLoadingProgressRequest>,
    ) -> RpcResult<GetLoadingProgressResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions(&r.partition_names)?;
                if !c.loaded {
                    return Err(api(ApiError::from(
                        crate::core::storage::collection::CollectionError::NotLoaded(
                            c.schema.name.clone(),
                        ),
                    )));
                }
                Ok(GetLoadingProgressResponse {
                    progress: 100,
                    refresh_progress: 100,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn get_load_state(
        &self,
        req: Request<GetLoadStateRequest>,
    ) -> RpcResult<GetLoadStateResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions(&r.partition_names)?;
                let state = if c.loaded {
                    LoadState::Loaded
                } else {
                    LoadState::NotLoad
                };
                Ok(GetLoadStateResponse {
                    state: state as i32,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn describe_alias(
        &self,
        req: Request<DescribeAliasRequest>,
    ) -> RpcResult<DescribeAliasResponse> {
        let r = req.into_inner();
        answer(
            async {
                check_db(&r.db_name)?;
                Err(invalid(format!(
                    "alias {:?} not found: Shoal has no aliases (CreateAlias is not supported)",
                    r.alias
                )))
            }
            .await,
        )
    }

    async fn list_aliases(
        &self,
        req: Request<ListAliasesRequest>,
    ) -> RpcResult<ListAliasesResponse> {
        let r = req.into_inner();
        answer(
            async {
                check_db(&r.db_name)?;
                if !r.collection_name.is_empty() {
                    self.collection(&r.db_name, &r.collection_name).await?;
                }
                Ok(ListAliasesResponse {
                    db_name: "default".into(),
                    collection_name: r.collection_name.clone(),
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn create_index(&self, req: Request<CreateIndexRequest>) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let (def, metric) = index_definition(&c, &r)?;
                let c = match metric {
                    Some(m) => self.adopt_metric(c, m).await?,
                    None => c,
                };
                let mut m = Self::envelope(&c.schema.name);
                m.insert("indexParams".into(), Value::Array(vec![Value::Object(def)]));
                indexes::create(
                    self.state.clone(),
                    Ctx {
                        int64_numbers: true,
                    },
                    m,
                )
                .await
                .map(|_| ())
                .map_err(api)
            }
            .await,
        )
    }

    async fn describe_index(
        &self,
        req: Request<DescribeIndexRequest>,
    ) -> RpcResult<DescribeIndexResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let recs = self.find_indexes(&c, &r.index_name, &r.field_name).await?;
                let mut out = DescribeIndexResponse::default();
                for (i, rec) in recs.iter().enumerate() {
                    let p = self.backend().index_progress(&c, rec).await.map_err(api)?;
                    let mut params = vec![
                        kv("index_type", &rec.index_type),
                        kv("metric_type", &rec.metric),
                    ];
                    if rec.params != "{}" && !rec.params.is_empty() {
                        params.push(kv("params", &rec.params));
                    }
                    out.index_descriptions.push(IndexDescription {
                        index_name: rec.index_name.clone(),
                        index_id: i as i64 + 1,
                        params,
                        field_name: rec.field_name.clone(),
                        indexed_rows: p.indexed_rows as i64,
                        total_rows: p.total_rows as i64,
                        pending_index_rows: p.pending_rows as i64,
                        state: index_state(&p) as i32,
                        index_state_fail_reason: p.fail_reason.clone(),
                    });
                }
                Ok(out)
            }
            .await,
        )
    }

    async fn get_index_state(
        &self,
        req: Request<GetIndexStateRequest>,
    ) -> RpcResult<GetIndexStateResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let recs = self.find_indexes(&c, &r.index_name, &r.field_name).await?;
                let p = self
                    .backend()
                    .index_progress(&c, &recs[0])
                    .await
                    .map_err(api)?;
                Ok(GetIndexStateResponse {
                    state: index_state(&p) as i32,
                    fail_reason: p.fail_reason,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn get_index_build_progress(
        &self,
        req: Request<GetIndexBuildProgressRequest>,
    ) -> RpcResult<GetIndexBuildProgressResponse> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let recs = self.find_indexes(&c, &r.index_name, &r.field_name).await?;
                let p = self
                    .backend()
                    .index_progress(&c, &recs[0])
                    .await
                    .map_err(api)?;
                Ok(GetIndexBuildProgressResponse {
                    indexed_rows: p.indexed_rows as i64,
                    total_rows: p.total_rows as i64,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn drop_index(&self, req: Request<DropIndexRequest>) -> RpcResult<PbStatus> {
        let r = req.into_inner();
        answer_status(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let recs = self.find_indexes(&c, &r.index_name, &r.field_name).await?;
                for rec in recs {
                    let mut m = Self::envelope(&c.schema.name);
                    m.insert("indexName".into(), json!(rec.index_name));
                    indexes::drop(
                        self.state.clone(),
                        Ctx {
                            int64_numbers: true,
                        },
                        m,
                    )
                    .await
                    .map_err(api)?;
                }
                Ok(())
            }
            .await,
        )
    }

    async fn insert(&self, req: Request<InsertRequest>) -> RpcResult<MutationResult> {
        let r = req.into_inner();
        answer(
            self.write(
                &r.db_name,
                &r.collection_name,
                &r.partition_name,
                &r.fields_data,
                r.num_rows,
                false,
            )
            .await,
        )
    }

    async fn upsert(&self, req: Request<UpsertRequest>) -> RpcResult<MutationResult> {
        let r = req.into_inner();
        if r.partial_update {
            return answer::<MutationResult>(Err(not_supported("partial upsert")));
        }
        answer(
            self.write(
                &r.db_name,
                &r.collection_name,
                &r.partition_name,
                &r.fields_data,
                r.num_rows,
                true,
            )
            .await,
        )
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> RpcResult<MutationResult> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                check_partitions([&r.partition_name])?;
                no_templates(&r.expr_template_values)?;
                let filter = parse_filter(&r.expr)?
                    .ok_or_else(|| invalid("delete needs an expression (expr is empty)"))?;
                let n = self.backend().delete(&c, filter).await.map_err(api)?;
                Ok(MutationResult {
                    delete_cnt: n as i64,
                    i_ds: Some(ids_pb(Vec::new())),
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn search(&self, req: Request<SearchRequest>) -> RpcResult<SearchResults> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let s = &c.schema;
                if !r.sub_reqs.is_empty() {
                    return Err(not_supported("hybrid search (sub-requests)"));
                }
                if !r.ids.is_empty() {
                    return Err(not_supported("search by primary keys"));
                }
                if !r.function_score.is_empty() {
                    return Err(not_supported("search with a function score (rerankers)"));
                }
                no_templates(&r.expr_template_values)?;
                check_partitions(&r.partition_names)?;
                let o = search_options(s, &r.search_params)?;
                let (queries, nq) = queries_from_placeholder(&r.placeholder_group, s.dim)?;
                if r.nq != 0 && r.nq != nq as i64 {
                    return Err(invalid(format!(
                        "nq is {} but the placeholder group holds {nq} vectors",
                        r.nq
                    )));
                }
                let plan = output_plan(s, &r.output_fields)?;
                if plan.count {
                    return Err(invalid("count(*) is only valid in query"));
                }
                let filter = parse_filter(&r.dsl)?;
                let hits = self
                    .backend()
                    .search(
                        &c,
                        BSearch {
                            queries,
                            nq,
                            top_k: o.limit + o.offset,
                            params: o.params,
                            filter,
                            fields: plan.read.clone(),
                        },
                    )
                    .await
                    .map_err(api)?;
                let mut kept = Vec::new();
                let mut topks = Vec::with_capacity(hits.len());
                for q in hits {
                    let before = kept.len();
                    kept.extend(
                        q.into_iter()
                            .skip(o.offset)
                            .take(o.limit)
                            .filter(|h| in_radius(s.metric, o.radius, h.score)),
                    );
                    topks.push((kept.len() - before) as i64);
                }
                let scores = kept
                    .iter()
                    .map(|h| round(h.score, o.round_decimal))
                    .collect();
                let ids = kept.iter().map(|h| h.row.id).collect();
                // As Milvus does, the primary key is a result column and an output field too
                // (the Node SDK reads hit ids from there).
                let fields_data = columns(s, &plan, kept.iter().map(|h| &h.row), true);
                let mut names = vec![s.pk_field.clone()];
                names.extend(plan.names.iter().filter(|n| **n != s.pk_field).cloned());
                Ok(SearchResults {
                    collection_name: s.name.clone(),
                    results: Some(SearchResultData {
                        num_queries: nq as i64,
                        top_k: o.limit as i64,
                        fields_data,
                        scores,
                        ids: Some(ids_pb(ids)),
                        topks,
                        output_fields: names,
                        primary_field_name: s.pk_field.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn flush(&self, req: Request<FlushRequest>) -> RpcResult<FlushResponse> {
        let r = req.into_inner();
        answer(
            async {
                let mut out = FlushResponse {
                    db_name: "default".into(),
                    ..Default::default()
                };
                // Validate every name before flushing any.
                let mut cs = Vec::new();
                for n in &r.collection_names {
                    cs.push(self.collection(&r.db_name, n).await?);
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                for c in cs {
                    self.backend().flush(&c).await.map_err(api)?;
                    let n = c.schema.name.clone();
                    out.coll_seg_i_ds.insert(n.clone(), LongArray::default());
                    out.flush_coll_seg_i_ds
                        .insert(n.clone(), LongArray::default());
                    out.coll_seal_times.insert(n.clone(), now);
                    out.coll_flush_ts.insert(n, 0);
                }
                Ok(out)
            }
            .await,
        )
    }

    async fn get_flush_state(
        &self,
        req: Request<GetFlushStateRequest>,
    ) -> RpcResult<GetFlushStateResponse> {
        let r = req.into_inner();
        answer(
            async {
                if !r.collection_name.is_empty() {
                    self.collection(&r.db_name, &r.collection_name).await?;
                }
                // Flush returns only once the data is sealed and searchable.
                Ok(GetFlushStateResponse {
                    flushed: true,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn query(&self, req: Request<QueryRequest>) -> RpcResult<QueryResults> {
        let r = req.into_inner();
        answer(
            async {
                let c = self.collection(&r.db_name, &r.collection_name).await?;
                let s = &c.schema;
                no_templates(&r.expr_template_values)?;
                check_partitions(&r.partition_names)?;
                let mut limit = None;
                let mut offset = 0usize;
                for p in &r.query_params {
                    match p.key.as_str() {
                        "limit" => {
                            let n = parse_int("limit", &p.value)?;
                            if !(1..=MAX_TOPK as i64).contains(&n) {
                                return Err(invalid(format!(
                                    "limit {n} is outside [1, {MAX_TOPK}]"
                                )));
                            }
                            limit = Some(n as usize);
                        }
                        "offset" => {
                            let n = parse_int("offset", &p.value)?;
                            offset = usize::try_from(n)
                                .map_err(|_| invalid(format!("offset {n} must be >= 0")))?;
                        }
                        "iterator" if !p.value.eq_ignore_ascii_case("false") => {
                            return Err(not_supported("query iterators"));
                        }
                        _ => {}
                    }
                }
                let plan = output_plan(s, &r.output_fields)?;
                let filter = parse_filter(&r.expr)?;
                if plan.count {
                    if !plan.names.iter().all(|n| *n == s.pk_field) {
                        return Err(invalid("count(*) cannot be mixed with other output fields"));
                    }
                    let n = self.backend().count(&c, filter).await.map_err(api)?;
                    return Ok(QueryResults {
                        collection_name: s.name.clone(),
                        fields_data: vec![count_column(n)],
                        output_fields: vec!["count(*)".into()],
                        ..Default::default()
                    });
                }
                if filter.is_none() && limit.is_none() {
                    return Err(invalid(
                        "empty expression should be used with limit: give a filter or a limit",
                    ));
                }
                if limit.unwrap_or(0) + offset > MAX_TOPK {
                    return Err(invalid(format!("limit + offset exceeds {MAX_TOPK}")));
                }
                // Without a limit Milvus returns every match; Shoal returns at most MAX_TOPK
                // (offset included) and says so instead of truncating.
                let fetch = limit.unwrap_or(MAX_TOPK.saturating_sub(offset));
                let rows = self
                    .backend()
                    .query(
                        &c,
                        BQuery {
                            filter: filter.clone(),
                            offset,
                            limit: fetch,
                            fields: plan.read.clone(),
                        },
                    )
                    .await
                    .map_err(api)?;
                if limit.is_none() && rows.len() == fetch {
                    let total = self.backend().count(&c, filter).await.map_err(api)?;
                    if total > (offset + fetch) as u64 {
                        return Err(invalid(format!(
                            "{total} rows match; a query without a limit returns at most \
                             {MAX_TOPK}: add a limit (and offset) to page"
                        )));
                    }
                }
                let mut names = vec![s.pk_field.clone()];
                names.extend(plan.names.iter().filter(|n| **n != s.pk_field).cloned());
                Ok(QueryResults {
                    collection_name: s.name.clone(),
                    fields_data: columns(s, &plan, rows.iter(), true),
                    output_fields: names,
                    primary_field_name: s.pk_field.clone(),
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn get_version(&self, _req: Request<GetVersionRequest>) -> RpcResult<GetVersionResponse> {
        answer(Ok(GetVersionResponse {
            version: version(),
            ..Default::default()
        }))
    }

    async fn check_health(
        &self,
        _req: Request<CheckHealthRequest>,
    ) -> RpcResult<CheckHealthResponse> {
        let (healthy, reasons) = match self.backend().ready().await {
            Ok(()) => (true, Vec::new()),
            Err(why) => (false, vec![why]),
        };
        answer(Ok(CheckHealthResponse {
            is_healthy: healthy,
            reasons,
            ..Default::default()
        }))
    }

    async fn connect(&self, _req: Request<ConnectRequest>) -> RpcResult<ConnectResponse> {
        answer(Ok(ConnectResponse {
            server_info: Some(ServerInfo {
                build_tags: version(),
                deploy_mode: "shoal".into(),
                ..Default::default()
            }),
            identifier: self.connections.fetch_add(1, Ordering::Relaxed),
            ..Default::default()
        }))
    }

    async fn list_databases(
        &self,
        _req: Request<ListDatabasesRequest>,
    ) -> RpcResult<ListDatabasesResponse> {
        answer(Ok(ListDatabasesResponse {
            db_names: vec!["default".into()],
            created_timestamp: vec![0],
            db_ids: vec![1],
            ..Default::default()
        }))
    }

    async fn alloc_timestamp(
        &self,
        _req: Request<AllocTimestampRequest>,
    ) -> RpcResult<AllocTimestampResponse> {
        answer(Ok(AllocTimestampResponse {
            timestamp: hybrid_now(),
            ..Default::default()
        }))
    }
}

/// Now as a Milvus hybrid timestamp (physical milliseconds << 18, logical 0).
fn hybrid_now() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms << 18
}

fn index_state(p: &crate::api::backend::IndexProgress) -> IndexState {
    if !p.fail_reason.is_empty() {
        IndexState::Failed
    } else if p.pending_rows == 0 {
        IndexState::Finished
    } else {
        IndexState::InProgress
    }
}

/// Milvus range search with `radius` only: L2 keeps distances below it, IP and COSINE keep
/// similarities above it.
fn in_radius(metric: Metric, radius: Option<f32>, score: f32) -> bool {
    match (radius, metric) {
        (None, _) => true,
        (Some(r), Metric::L2) => score < r,
        (Some(r), Metric::IP | Metric::COSINE) => score > r,
    }
}

fn round(score: f32, decimals: Option<i32>) -> f32 {
    match decimals {
        None => score,
        Some(d) => {
            let f = 10f64.powi(d);
            ((f64::from(score) * f).round() / f) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> crate::core::storage::collection::Schema {
        crate::core::storage::collection::Schema {
            name: "c".into(),
            dim: 2,
            metric: Metric::L2,
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
        }
    }

    #[test]
    fn search_params_are_validated_and_unsupported_features_named() {
        let s = schema();
        let o = search_options(
            &s,
            &[
                kv("topk", 3),
                kv("offset", 2),
                kv("params", r#"{"nprobe": 8, "radius": 1.5}"#),
                kv("metric_type", "L2"),
            ],
        )
        .expect("valid");
        assert_eq!((o.limit, o.offset, o.params.nprobe), (3, 2, Some(8)));
        assert_eq!(o.radius, Some(1.5));
        let e = search_options(&s, &[kv("topk", 3), kv("metric_type", "IP")]).expect_err("metric");
        assert!(e.reason.contains("metric type not match"), "{}", e.reason);
        let e = search_options(&s, &[kv("topk", 3), kv("group_by_field", "x")]).expect_err("gb");
        assert!(e.reason.contains("not supported by Shoal"), "{}", e.reason);
        let e = search_options(&s, &[kv("topk", 20_000)]).expect_err("topk");
        assert_eq!(e.code, 1100);
        assert!(search_options(&s, &[]).is_err());
        assert!(in_radius(Metric::L2, Some(1.0), 0.5));
        assert!(!in_radius(Metric::COSINE, Some(0.9), 0.5));
        assert_eq!(round(0.123_456, Some(2)), 0.12);
    }
}
