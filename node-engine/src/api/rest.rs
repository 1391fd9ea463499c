//! The public REST API: the Milvus RESTful v2 subset (`POST /v2/vectordb/...`), its envelope,
//! error codes, token auth and the `Accept-Type-Allow-Int64` rule. Request validation happens
//! here in full before anything reaches the backend, so a rejected request changes nothing, and
//! every role (standalone over the local engine, router over the cluster) answers the same bad
//! request with the same code: the handlers are generic over [`Backend`].

use super::backend::{
    Backend, CollectionMeta, FilterExpr, LocalBackend, QueryRequest, ReadFields, SearchRequest,
    WriteRows,
};
use super::error::{ApiError, code};
use super::indexes;
use super::metrics::Metrics;
use crate::core::filter::Filter;
use crate::core::index::SearchParams;
use crate::core::storage::collection::{RowOut, Schema};
use crate::core::types::Metric;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Largest `limit + offset` accepted by search and query (Milvus's max top-k).
pub const MAX_TOPK: usize = 16_384;

/// Shared state of the REST server over backend `B`. Derefs to the backend, so the standalone
/// state reads as the engine's (`state.engine`).
pub struct RestState<B> {
    pub backend: Arc<B>,
    /// `user:password` required as `Authorization: Bearer ...` when set.
    pub auth_token: Option<String>,
    pub metrics: Arc<Metrics>,
}

impl<B> std::ops::Deref for RestState<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.backend
    }
}

/// The standalone (and writer) REST state: the local engine.
pub type AppState = RestState<LocalBackend>;

/// Per-request context from headers.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Milvus rule: int64 values are JSON numbers unless the client sends
    /// `Accept-Type-Allow-Int64: false` (JavaScript clients), then they are strings.
    pub int64_numbers: bool,
}

impl Ctx {
    pub fn id(&self, id: i64) -> Value {
        if self.int64_numbers {
            Value::from(id)
        } else {
            Value::from(id.to_string())
        }
    }
}

/// A successful reply: `data` plus optional top-level extras (e.g. `topks`).
pub struct Reply {
    data: Value,
    extra: Vec<(&'static str, Value)>,
}

impl Reply {
    pub fn data(data: Value) -> Self {
        Self {
            data,
            extra: Vec::new(),
        }
    }
}

fn json_response(status: axum::http::StatusCode, v: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn check_auth<B>(st: &RestState<B>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &st.auth_token else {
        return Ok(());
    };
    let got = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time-ish comparison: no early exit on the first differing byte.
    match got {
        Some(g)
            if g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0 =>
        {
            Ok(())
        }
        _ => Err(ApiError::unauthorized()),
    }
}

fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            code::BAD_JSON,
            "request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            code::BAD_JSON,
            format!("malformed JSON body: {e}"),
        )),
    }
}

async fn call<B, F, Fut>(
    st: Arc<RestState<B>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: &'static str,
    f: F,
) -> Response
where
    F: FnOnce(Arc<RestState<B>>, Ctx, Map<String, Value>) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    call_with(st, headers, body, endpoint, |b| parse_body(&b), f).await
}

/// [`call`] with the body parser supplied: `entities/insert|upsert` take the raw body and parse
/// it typed in one pass (see [`super::rows`]).
async fn call_with<B, T, P, F, Fut>(
    st: Arc<RestState<B>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: &'static str,
    parse: P,
    f: F,
) -> Response
where
    P: FnOnce(Bytes) -> Result<T, ApiError>,
    F: FnOnce(Arc<RestState<B>>, Ctx, T) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    let started = Instant::now();
    let ctx = Ctx {
        int64_numbers: headers
            .get("Accept-Type-Allow-Int64")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| !v.trim().eq_ignore_ascii_case("false")),
    };
    let res = match check_auth(&st, &headers) {
        Ok(()) => match body.map(parse) {
            Ok(Ok(req)) => f(st.clone(), ctx, req).await,
            Ok(Err(e)) => Err(e),
            Err(rejection) => Err(ApiError::invalid(
                "body",
                format!(
                    "{rejection} (requests may carry at most {} MiB; split large inserts into batches)",
                    MAX_BODY_BYTES >> 20
                ),
            )),
        },
        Err(e) => Err(e),
    };
    let (status, v, category) = match res {
        Ok(r) => {
            let mut m = Map::new();
            m.insert("code".into(), Value::from(0));
            m.insert("data".into(), r.data);
            for (k, v) in r.extra {
                m.insert(k.into(), v);
            }
            (axum::http::StatusCode::OK, Value::Object(m), "ok")
        }
        Err(e) => (
            e.status,
            json!({"code": e.code, "message": e.message}),
            e.category(),
        ),
    };
    st.metrics
        .observe_request(endpoint, category, started.elapsed());
    json_response(status, v)
}

macro_rules! ep {
    ($r:expr, $b:ty, $path:literal, $f:expr) => {
        $r.route(
            concat!("/v2/vectordb/", $path),
            post(
                |State(s): State<Arc<RestState<$b>>>,
                 h: HeaderMap,
                 b: Result<Bytes, BytesRejection>| { call(s, h, b, $path, $f) },
            ),
        )
    };
    ($r:expr, $b:ty, $path:literal, $f:expr, parse = $p:expr) => {
        $r.route(
            concat!("/v2/vectordb/", $path),
            post(
                |State(s): State<Arc<RestState<$b>>>,
                 h: HeaderMap,
                 b: Result<Bytes, BytesRejection>| {
                    call_with(s, h, b, $path, $p, $f)
                },
            ),
        )
    };
}

/// Largest request body accepted: a 10,000-row insert of 1,024-d vectors is about 100 MiB of
/// JSON; beyond this the answer is code 1100 naming the limit (axum's default is 2 MiB).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// The REST router with every endpoint, over any backend.
pub fn router<B: Backend>(state: Arc<RestState<B>>) -> Router {
    let r = Router::new();
    let r = ep!(r, B, "collections/create", create_collection::<B>);
    let r = ep!(r, B, "collections/describe", describe_collection::<B>);
    let r = ep!(r, B, "collections/list", list_collections::<B>);
    let r = ep!(r, B, "collections/has", has_collection::<B>);
    let r = ep!(r, B, "collections/drop", drop_collection::<B>);
    let r = ep!(r, B, "collections/get_stats", get_stats::<B>);
    let r = ep!(r, B, "collections/load", load_collection::<B>);
    let r = ep!(r, B, "collections/release", release_collection::<B>);
    let r = ep!(r, B, "collections/get_load_state", get_load_state::<B>);
    let r = ep!(r, B, "collections/flush", flush_collection::<B>);
    let r = ep!(r, B, "entities/insert", insert::<B>, parse = Ok);
    let r = ep!(r, B, "entities/upsert", upsert::<B>, parse = Ok);
    let r = ep!(r, B, "entities/delete", delete::<B>);
    let r = ep!(r, B, "entities/get", get::<B>);
    let r = ep!(r, B, "entities/query", query::<B>);
    let r = ep!(r, B, "entities/search", search::<B>);
    let r = ep!(r, B, "indexes/create", indexes::create::<B>);
    let r = ep!(r, B, "indexes/describe", indexes::describe::<B>);
    let r = ep!(r, B, "indexes/list", indexes::list::<B>);
    let r = ep!(r, B, "indexes/drop", indexes::drop::<B>);
    r.fallback(|| async {
        json_response(
            axum::http::StatusCode::NOT_FOUND,
            json!({"code": code::INVALID_PARAMETER, "message": "unknown endpoint; see /v2/vectordb/..."}),
        )
    })
    .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

// ---------- request field helpers ----------

pub fn req_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Err(ApiError::missing(k)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(ApiError::missing(k)),
        Some(_) => Err(ApiError::invalid(k, "must be a string")),
    }
}

pub fn opt_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(k, "must be a string")),
    }
}

fn opt_bool(m: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::invalid(k, "must be a boolean")),
    }
}

fn opt_i64(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(k, "must be an integer")),
    }
}

pub fn check_db(m: &Map<String, Value>) -> Result<(), ApiError> {
    match opt_str(m, "dbName")? {
        None | Some("" | "default" | "_default") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "dbName",
            format!("database {other:?} does not exist; only \"default\""),
        )),
    }
}

/// Check `dbName`, read `collectionName` and look the collection up (code 100 when unknown).
pub async fn collection<B: Backend>(
    st: &RestState<B>,
    m: &Map<String, Value>,
) -> Result<CollectionMeta, ApiError> {
    check_db(m)?;
    let name = req_str(m, "collectionName")?;
    st.backend.collection(name).await
}

fn parse_filter(m: &Map<String, Value>) -> Result<Option<FilterExpr>, ApiError> {
    match opt_str(m, "filter")? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => Filter::parse(s)
            .map(|parsed| {
                Some(FilterExpr {
                    text: s.to_string(),
                    parsed,
                })
            })
            .map_err(|e| ApiError::invalid("filter", e)),
    }
}

/// Which fields a read returns, and whether `count(*)` was asked.
struct Fields {
    read: ReadFields,
    count: bool,
}

fn parse_output_fields(
    s: &Schema,
    m: &Map<String, Value>,
    default_all: bool,
) -> Result<Fields, ApiError> {
    let mut f = Fields {
        read: ReadFields::default(),
        count: false,
    };
    let list = match m.get("outputFields") {
        None | Some(Value::Null) => {
            if default_all {
                vec!["*".to_string()]
            } else {
                Vec::new()
            }
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid("outputFields", "must be a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "outputFields",
                "must be a list of strings",
            ));
        }
    };
    for name in list {
        if name == "*" {
            f.read.vector = true;
            f.read.all_dynamic = true;
        } else if name == s.vector_field {
            f.read.vector = true;
        } else if name == s.pk_field {
        } else if name.eq_ignore_ascii_case("count(*)") {
            f.count = true;
        } else if s.dynamic {
            f.read.names.push(name);
        } else {
            return Err(ApiError::invalid(
                "outputFields",
                format!("field {name:?} does not exist"),
            ));
        }
    }
    Ok(f)
}

impl Fields {
    fn render(&self, s: &Schema, ctx: Ctx, r: RowOut, distance: Option<f32>) -> Value {
        let mut o = Map::new();
        o.insert(s.pk_field.clone(), ctx.id(r.id));
        if let Some(d) = distance {
            o.insert("distance".into(), json!(d));
        }
        if let Some(v) = r.vector {
            o.insert(s.vector_field.clone(), json!(v));
        }
        if self.read.all_dynamic {
            for (k, v) in r.fields {
                o.entry(k).or_insert(v);
            }
        } else {
            let mut fields = r.fields;
            for n in &self.read.names {
                if let Some(v) = fields.remove(n) {
                    o.insert(n.clone(), v);
                }
            }
        }
        Value::Object(o)
    }
}

// ---------- collections ----------

async fn create_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    check_db(&m)?;
    let name = req_str(&m, "collectionName")?.to_string();
    if m.get("schema").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "schema",
            "custom schemas are not supported; use the quick form (dimension, metricType)",
        ));
    }
    let dim = match m.get("dimension") {
        None | Some(Value::Null) => return Err(ApiError::missing("dimension")),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::invalid("dimension", "must be a positive integer"))?,
    };
    let metric = match opt_str(&m, "metricType")? {
        None => Metric::COSINE,
        Some(s) => s
            .parse::<Metric>()
            .map_err(|e| ApiError::invalid("metricType", e))?,
    };
    match opt_str(&m, "idType")? {
        None => {}
        Some(t) if t.eq_ignore_ascii_case("int64") => {}
        Some(t) => {
            return Err(ApiError::invalid(
                "idType",
                format!("{t:?} is not supported; only Int64"),
            ));
        }
    }
    let auto_id = opt_bool(&m, "autoID")?
        .or(opt_bool(&m, "autoId")?)
        .unwrap_or(false);
    let dynamic = match m.get("params") {
        None | Some(Value::Null) => true,
        Some(Value::Object(p)) => opt_bool(p, "enableDynamicField")?.unwrap_or(true),
        Some(_) => return Err(ApiError::invalid("params", "must be an object")),
    };
    let schema = Schema {
        name,
        dim: usize::try_from(dim).unwrap_or(usize::MAX),
        metric,
        auto_id,
        pk_field: opt_str(&m, "primaryFieldName")?.unwrap_or("id").to_string(),
        vector_field: opt_str(&m, "vectorFieldName")?
            .unwrap_or("vector")
            .to_string(),
        dynamic,
    };
    crate::core::engine::validate_schema(&schema)?;
    st.backend.create_collection(schema).await?;
    Ok(Reply::data(json!({})))
}

fn load_state(c: &CollectionMeta) -> &'static str {
    if c.loaded {
        "LoadStateLoaded"
    } else {
        "LoadStateNotLoad"
    }
}

async fn describe_collection<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let d = st.backend.describe_collection(&c).await?;
    let s = &c.schema;
    let idx: Vec<Value> = d
        .indexes
        .iter()
        .map(|r| {
            json!({"fieldName": r.field_name, "indexName": r.index_name, "metricType": r.metric,
                   "indexType": r.index_type,
                   "indexBytes": d.index_bytes.get(&r.index_name).copied().unwrap_or(0)})
        })
        .collect();
    Ok(Reply::data(json!({
        "collectionName": s.name,
        "collectionID": ctx.id(c.id),
        "description": "",
        "autoId": s.auto_id,
        "enableDynamicField": s.dynamic,
        "fields": [
            {"name": s.pk_field, "type": "Int64", "primaryKey": true, "autoId": s.auto_id, "description": ""},
            {"name": s.vector_field, "type": "FloatVector", "primaryKey": false, "description": "",
             "params": [{"key": "dim", "value": s.dim.to_string()}]},
        ],
        "indexes": idx,
        "load": load_state(&c),
        "shardsNum": 1,
        "consistencyLevel": "Strong",
        "properties": [],
        "metricType": s.metric.as_str(),
        "memoryBytes": d.memory_bytes,
        "corruptSegments": d.corrupt_segments.iter().map(|(id, r)| json!({"segmentID": id, "reason": r})).collect::<Vec<_>>(),
    })))
}

async fn list_collections<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    check_db(&m)?;
    Ok(Reply::data(json!(st.backend.list_collections().await?)))
}

async fn has_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    check_db(&m)?;
    let name = req_str(&m, "collectionName")?;
    let has = match st.backend.collection(name).await {
        Ok(_) => true,
        Err(e) if e.code == code::COLLECTION_NOT_FOUND => false,
        Err(e) => return Err(e),
    };
    Ok(Reply::data(json!({ "has": has })))
}

async fn drop_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    st.backend.drop_collection(&c).await?;
    Ok(Reply::data(json!({})))
}

async fn get_stats<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    Ok(Reply::data(
        json!({"rowCount": st.backend.row_count(&c).await?}),
    ))
}

async fn load_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    st.backend.set_loaded(&c, true).await?;
    Ok(Reply::data(json!({})))
}

async fn release_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    st.backend.set_loaded(&c, false).await?;
    Ok(Reply::data(json!({})))
}

async fn get_load_state<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    Ok(Reply::data(json!({"loadState": load_state(&c)})))
}

async fn flush_collection<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    st.backend.flush(&c).await?;
    Ok(Reply::data(json!({})))
}

// ---------- entities ----------

pub(super) fn parse_id(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn parse_vector(v: &Value, dim: usize, out: &mut Vec<f32>) -> Result<(), String> {
    let Value::Array(a) = v else {
        return Err("vector must be an array of numbers".into());
    };
    if a.len() != dim {
        return Err(format!(
            "vector has dimension {}, the collection has {dim}",
            a.len()
        ));
    }
    for x in a {
        let f = x.as_f64().ok_or("vector components must be numbers")? as f32;
        if !f.is_finite() {
            return Err(
                "vector has a NaN or infinite component (or one outside the float32 range)".into(),
            );
        }
        out.push(f);
    }
    Ok(())
}

/// Parses an insert or upsert body with the typed one-pass parser ([`super::rows`]) on a
/// blocking thread (a 10,000-row batch is ~14 MB of JSON: tens of milliseconds of CPU that must
/// not stall the async workers). The collection the body names is looked up when the parser
/// reaches `data`; the body is dropped as soon as it is parsed, before the write waits for the
/// WAL.
async fn parse_write<B: Backend>(
    st: &Arc<RestState<B>>,
    body: Bytes,
    upsert: bool,
) -> Result<(CollectionMeta, WriteRows), ApiError> {
    let st = st.clone();
    let rt = tokio::runtime::Handle::current();
    let parsed = tokio::task::spawn_blocking(move || {
        let out = super::rows::parse_rows(&body, upsert, |m| rt.block_on(collection(&st, m)));
        drop(body);
        out
    })
    .await
    .map_err(|e| ApiError::internal(format!("request parser failed: {e}")))?;
    let (c, batch) = parsed?;
    // Ids are empty for an autoID insert; every row has its vector.
    let rows = batch.vectors.len() / batch.dim.max(1);
    Ok((
        c,
        WriteRows {
            batch,
            rows,
            upsert,
        },
    ))
}

async fn insert<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let (c, rows) = parse_write(&st, body, false).await?;
    let n = rows.rows;
    let ids = st.backend.write(&c, rows).await?;
    st.metrics.rows_inserted(n);
    Ok(Reply::data(
        json!({"insertCount": n, "insertIds": ids.iter().map(|i| ctx.id(*i)).collect::<Vec<_>>()}),
    ))
}

async fn upsert<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let (c, rows) = parse_write(&st, body, true).await?;
    let n = rows.rows;
    let ids = st.backend.write(&c, rows).await?;
    st.metrics.rows_inserted(n);
    Ok(Reply::data(
        json!({"upsertCount": n, "upsertIds": ids.iter().map(|i| ctx.id(*i)).collect::<Vec<_>>()}),
    ))
}

async fn delete<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let filter = match parse_filter(&m)? {
        Some(f) => f,
        None => return Err(ApiError::missing("filter")),
    };
    let n = st.backend.delete(&c, filter).await?;
    Ok(Reply::data(json!({"deleteCount": n})))
}

fn parse_ids(m: &Map<String, Value>) -> Result<Vec<i64>, ApiError> {
    match m.get("id") {
        None | Some(Value::Null) => Err(ApiError::missing("id")),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| parse_id(v).ok_or_else(|| ApiError::invalid("id", "must be int64 values")))
            .collect(),
        Some(v) => parse_id(v)
            .map(|i| vec![i])
            .ok_or_else(|| ApiError::invalid("id", "must be an int64 or a list of them")),
    }
}

async fn get<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let ids = parse_ids(&m)?;
    let f = parse_output_fields(&c.schema, &m, true)?;
    let rows = st.backend.get(&c, ids, f.read.clone()).await?;
    Ok(Reply::data(Value::Array(
        rows.into_iter()
            .map(|r| f.render(&c.schema, ctx, r, None))
            .collect(),
    )))
}

fn limit_offset(m: &Map<String, Value>, default_limit: usize) -> Result<(usize, usize), ApiError> {
    let limit = match opt_i64(m, "limit")? {
        None => default_limit,
        Some(l) if l >= 1 && l as usize <= MAX_TOPK => l as usize,
        Some(l) => {
            return Err(ApiError::invalid(
                "limit",
                format!("{l} is outside [1, {MAX_TOPK}]"),
            ));
        }
    };
    let offset = match opt_i64(m, "offset")? {
        None => 0,
        Some(o) if o >= 0 && o as usize + limit <= MAX_TOPK => o as usize,
        Some(o) => {
            return Err(ApiError::invalid(
                "offset",
                format!("{o} must be >= 0 and limit + offset <= {MAX_TOPK}"),
            ));
        }
    };
    Ok((limit, offset))
}

async fn query<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let filter = parse_filter(&m)?;
    let f = parse_output_fields(&c.schema, &m, false)?;
    let (limit, offset) = limit_offset(&m, 100)?;
    if f.count {
        let n = st.backend.count(&c, filter).await?;
        return Ok(Reply::data(json!([{"count(*)": n}])));
    }
    let rows = st
        .backend
        .query(
            &c,
            QueryRequest {
                filter,
                offset,
                limit,
                fields: f.read.clone(),
            },
        )
        .await?;
    Ok(Reply::data(Value::Array(
        rows.into_iter()
            .map(|r| f.render(&c.schema, ctx, r, None))
            .collect(),
    )))
}

fn parse_search_params(m: &Map<String, Value>, metric: Metric) -> Result<SearchParams, ApiError> {
    let mut p = SearchParams::default();
    let sp = match m.get("searchParams") {
        None | Some(Value::Null) => return Ok(p),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::invalid("searchParams", "must be an object")),
    };
    if let Some(mt) = opt_str(sp, "metricType")? {
        let mt = mt
            .parse::<Metric>()
            .map_err(|e| ApiError::invalid("searchParams.metricType", e))?;
        if mt != metric {
            return Err(ApiError::invalid(
                "searchParams.metricType",
                format!("{mt} differs from the collection's {metric}"),
            ));
        }
    }
    let params = match sp.get("params") {
        None | Some(Value::Null) => return Ok(p),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::invalid(
                "searchParams.params",
                "must be an object",
            ));
        }
    };
    for (k, name) in [
        ("nprobe", "searchParams.params.nprobe"),
        ("ef", "searchParams.params.ef"),
    ] {
        if let Some(v) = params.get(k) {
            let n = v
                .as_u64()
                .filter(|&n| (1..=65_536).contains(&n))
                .ok_or_else(|| ApiError::invalid(name, "must be an integer in [1, 65536]"))?;
            match k {
                "nprobe" => p.nprobe = Some(n as usize),
                _ => p.ef = Some(n as usize),
            }
        }
    }
    Ok(p)
}

async fn search<B: Backend>(
    st: Arc<RestState<B>>,
    ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let s = &c.schema;
    if let Some(af) = opt_str(&m, "annsField")?.filter(|af| *af != s.vector_field) {
        return Err(ApiError::invalid(
            "annsField",
            format!("{af:?} is not the vector field {:?}", s.vector_field),
        ));
    }
    let data = match m.get("data") {
        None | Some(Value::Null) => return Err(ApiError::missing("data")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("data", "must hold at least one vector"));
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("data", "must be a list of vectors")),
    };
    let mut queries = Vec::with_capacity(data.len() * s.dim);
    // One flat vector is accepted as a single query.
    if data.iter().all(Value::is_number) {
        parse_vector(&Value::Array(data.clone()), s.dim, &mut queries)
            .map_err(|e| ApiError::invalid("data", e))?;
    } else {
        for (i, q) in data.iter().enumerate() {
            parse_vector(q, s.dim, &mut queries)
                .map_err(|e| ApiError::invalid(&format!("data[{i}]"), e))?;
        }
    }
    let (limit, offset) = limit_offset(&m, 100)?;
    let filter = parse_filter(&m)?;
    let params = parse_search_params(&m, s.metric)?;
    let f = parse_output_fields(s, &m, false)?;
    if f.count {
        return Err(ApiError::invalid(
            "outputFields",
            "count(*) is only valid in query",
        ));
    }
    let nq = queries.len() / s.dim.max(1);
    let hits = st
        .backend
        .search(
            &c,
            SearchRequest {
                queries,
                nq,
                top_k: limit + offset,
                params,
                filter,
                fields: f.read.clone(),
            },
        )
        .await?;
    let mut flat = Vec::new();
    let mut topks = Vec::with_capacity(hits.len());
    for q in hits {
        let kept: Vec<_> = q.into_iter().skip(offset).take(limit).collect();
        topks.push(kept.len());
        for h in kept {
            flat.push(f.render(s, ctx, h.row, Some(h.score)));
        }
    }
    Ok(Reply {
        data: Value::Array(flat),
        extra: vec![("topks", json!(topks))],
    })
}
