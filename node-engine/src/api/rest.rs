//! The public REST API: the Milvus RESTful v2 subset (`POST /v2/vectordb/...`), its envelope,
//! error codes, token auth and the `Accept-Type-Allow-Int64` rule. Request validation happens
//! here in full before anything reaches the engine, so a rejected request changes nothing.

use super::error::{ApiError, code};
use super::indexes;
use super::metrics::Metrics;
use super::rows;
use crate::core::engine::Engine;
use crate::core::filter::Filter;
use crate::core::index::SearchParams;
use crate::core::storage::collection::{
    Collection, CollectionRead, CollectionWrite, Output, RowOut, Schema,
};
use crate::core::types::Metric;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Largest `limit + offset` accepted by search and query (Milvus's max top-k).
pub const MAX_TOPK: usize = 16_384;

/// Largest request body accepted (Milvus's default gRPC receive size, 64 MiB). 10,000 rows of
/// 128-d vectors as JSON text are about 14 MB; axum's own default (2 MiB) refuses ~1,500.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Shared state of the REST server.
pub struct AppState {
    pub engine: Arc<Engine>,
    /// `user:password` required as `Authorization: Bearer ...` when set.
    pub auth_token: Option<String>,
    pub metrics: Arc<Metrics>,
    pub indexes: indexes::IndexService,
}

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

fn check_auth(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

async fn call<F, Fut>(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: &'static str,
    f: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Ctx, Map<String, Value>) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    call_with(st, headers, body, endpoint, |b| parse_body(&b), f).await
}

/// [`call`] with the body parser supplied (`entities/insert|upsert` take the raw body and parse
/// it typed, see `rows`).
async fn call_with<T, P, F, Fut>(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: &'static str,
    parse: P,
    f: F,
) -> Response
where
    P: FnOnce(Bytes) -> Result<T, ApiError>,
    F: FnOnce(Arc<AppState>, Ctx, T) -> Fut,
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
        Ok(()) => match parse(body) {
            Ok(req) => f(st.clone(), ctx, req).await,
            Err(e) => Err(e),
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
    ($r:expr, $path:literal, $f:expr) => {
        $r.route(
            concat!("/v2/vectordb/", $path),
            post(|State(s): State<Arc<AppState>>, h: HeaderMap, b: Bytes| call(s, h, b, $path, $f)),
        )
    };
    ($r:expr, $path:literal, $f:expr, parse = $p:expr) => {
        $r.route(
            concat!("/v2/vectordb/", $path),
            post(|State(s): State<Arc<AppState>>, h: HeaderMap, b: Bytes| {
                call_with(s, h, b, $path, $p, $f)
            }),
        )
    };
}

/// The REST router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let r = Router::new();
    let r = ep!(r, "collections/create", create_collection);
    let r = ep!(r, "collections/describe", describe_collection);
    let r = ep!(r, "collections/list", list_collections);
    let r = ep!(r, "collections/has", has_collection);
    let r = ep!(r, "collections/drop", drop_collection);
    let r = ep!(r, "collections/get_stats", get_stats);
    let r = ep!(r, "collections/load", load_collection);
    let r = ep!(r, "collections/release", release_collection);
    let r = ep!(r, "collections/get_load_state", get_load_state);
    let r = ep!(r, "collections/flush", flush_collection);
    let r = ep!(r, "entities/insert", insert, parse = Ok);
    let r = ep!(r, "entities/upsert", upsert, parse = Ok);
    let r = ep!(r, "entities/delete", delete);
    let r = ep!(r, "entities/get", get);
    let r = ep!(r, "entities/query", query);
    let r = ep!(r, "entities/search", search);
    let r = ep!(r, "indexes/create", indexes::create);
    let r = ep!(r, "indexes/describe", indexes::describe);
    let r = ep!(r, "indexes/list", indexes::list);
    let r = ep!(r, "indexes/drop", indexes::drop);
    r.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .fallback(|| async {
        json_response(
            axum::http::StatusCode::NOT_FOUND,
            json!({"code": code::INVALID_PARAMETER, "message": "unknown endpoint; see /v2/vectordb/..."}),
        )
    })
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

fn check_db(m: &Map<String, Value>) -> Result<(), ApiError> {
    match opt_str(m, "dbName")? {
        None | Some("" | "default" | "_default") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "dbName",
            format!("database {other:?} does not exist; only \"default\""),
        )),
    }
}

fn collection(st: &AppState, m: &Map<String, Value>) -> Result<Arc<Collection>, ApiError> {
    check_db(m)?;
    let name = req_str(m, "collectionName")?;
    Ok(st.engine.collection(name)?)
}

fn loaded(c: &Collection) -> Result<(), ApiError> {
    if c.is_loaded() {
        Ok(())
    } else {
        Err(
            crate::core::storage::collection::CollectionError::NotLoaded(c.schema().name.clone())
                .into(),
        )
    }
}

fn parse_filter(m: &Map<String, Value>) -> Result<Option<Filter>, ApiError> {
    match opt_str(m, "filter")? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => Filter::parse(s)
            .map(Some)
            .map_err(|e| ApiError::invalid("filter", e)),
    }
}

/// Which fields a read returns.
struct Fields {
    vector: bool,
    all_dynamic: bool,
    names: Vec<String>,
    count: bool,
}

fn parse_output_fields(
    s: &Schema,
    m: &Map<String, Value>,
    default_all: bool,
) -> Result<Fields, ApiError> {
    let mut f = Fields {
        vector: false,
        all_dynamic: false,
        names: Vec::new(),
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
            f.vector = true;
            f.all_dynamic = true;
        } else if name == s.vector_field {
            f.vector = true;
        } else if name == s.pk_field {
        } else if name.eq_ignore_ascii_case("count(*)") {
            f.count = true;
        } else if s.dynamic {
            f.names.push(name);
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
    fn output(&self) -> Output {
        Output {
            vector: self.vector,
            fields: self.all_dynamic || !self.names.is_empty(),
        }
    }
    fn render(&self, s: &Schema, ctx: Ctx, r: RowOut, distance: Option<f32>) -> Value {
        let mut o = Map::new();
        o.insert(s.pk_field.clone(), ctx.id(r.id));
        if let Some(d) = distance {
            o.insert("distance".into(), json!(d));
        }
        if let Some(v) = r.vector {
            o.insert(s.vector_field.clone(), json!(v));
        }
        if self.all_dynamic {
            for (k, v) in r.fields {
                o.entry(k).or_insert(v);
            }
        } else {
            let mut fields = r.fields;
            for n in &self.names {
                if let Some(v) = fields.remove(n) {
                    o.insert(n.clone(), v);
                }
            }
        }
        Value::Object(o)
    }
}

// ---------- collections ----------

async fn create_collection(
    st: Arc<AppState>,
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
    let c = st.engine.create_collection(schema).await?;
    st.indexes.register_default(&c).await?;
    Ok(Reply::data(json!({})))
}

async fn describe_collection(
    st: Arc<AppState>,
    ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let s = c.schema();
    let stats = c.stats();
    let idx = st.indexes.describe_all(&c).await?;
    Ok(Reply::data(json!({
        "collectionName": s.name,
        "collectionID": ctx.id(c.collection_id()),
        "description": "",
        "autoId": s.auto_id,
        "enableDynamicField": s.dynamic,
        "fields": [
            {"name": s.pk_field, "type": "Int64", "primaryKey": true, "autoId": s.auto_id, "description": ""},
            {"name": s.vector_field, "type": "FloatVector", "primaryKey": false, "description": "",
             "params": [{"key": "dim", "value": s.dim.to_string()}]},
        ],
        "indexes": idx,
        "load": if c.is_loaded() { "LoadStateLoaded" } else { "LoadStateNotLoad" },
        "shardsNum": 1,
        "consistencyLevel": "Strong",
        "properties": [],
        "metricType": s.metric.as_str(),
        "memoryBytes": stats.memory_bytes,
        "corruptSegments": stats.corrupt_segments.iter().map(|(id, r)| json!({"segmentID": id, "reason": r})).collect::<Vec<_>>(),
    })))
}

async fn list_collections(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    check_db(&m)?;
    Ok(Reply::data(json!(st.engine.list())))
}

async fn has_collection(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    check_db(&m)?;
    let name = req_str(&m, "collectionName")?;
    Ok(Reply::data(
        json!({"has": st.engine.collection(name).is_ok()}),
    ))
}

async fn drop_collection(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    st.indexes.forget(&c);
    st.engine.drop_collection(&c.schema().name).await?;
    Ok(Reply::data(json!({})))
}

async fn get_stats(st: Arc<AppState>, _ctx: Ctx, m: Map<String, Value>) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    Ok(Reply::data(json!({"rowCount": c.stats().live_rows})))
}

async fn load_collection(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    st.engine.set_loaded(&c.schema().name, true).await?;
    Ok(Reply::data(json!({})))
}

async fn release_collection(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    st.engine.set_loaded(&c.schema().name, false).await?;
    Ok(Reply::data(json!({})))
}

async fn get_load_state(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let state = if c.is_loaded() {
        "LoadStateLoaded"
    } else {
        "LoadStateNotLoad"
    };
    Ok(Reply::data(json!({"loadState": state})))
}

async fn flush_collection(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    c.flush().await?;
    st.indexes.kick(&c);
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

async fn insert(st: Arc<AppState>, ctx: Ctx, body: Bytes) -> Result<Reply, ApiError> {
    let (c, b) = rows::parse_rows(&body, false, |m| collection(&st, m))?;
    drop(body);
    let n = b.len();
    let ids = c.upsert(b).await?;
    st.metrics.rows_inserted(n);
    st.indexes.maybe_kick(&c);
    Ok(Reply::data(
        json!({"insertCount": n, "insertIds": ids.iter().map(|i| ctx.id(*i)).collect::<Vec<_>>()}),
    ))
}

async fn upsert(st: Arc<AppState>, ctx: Ctx, body: Bytes) -> Result<Reply, ApiError> {
    let (c, b) = rows::parse_rows(&body, true, |m| collection(&st, m))?;
    drop(body);
    let n = b.len();
    let ids = c.upsert(b).await?;
    st.metrics.rows_inserted(n);
    Ok(Reply::data(
        json!({"upsertCount": n, "upsertIds": ids.iter().map(|i| ctx.id(*i)).collect::<Vec<_>>()}),
    ))
}

async fn delete(st: Arc<AppState>, _ctx: Ctx, m: Map<String, Value>) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let filter = match parse_filter(&m)? {
        Some(f) => f,
        None => return Err(ApiError::missing("filter")),
    };
    let ids = c.ids_matching(&filter);
    let n = c.delete(ids).await?;
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

async fn get(st: Arc<AppState>, ctx: Ctx, m: Map<String, Value>) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let ids = parse_ids(&m)?;
    let f = parse_output_fields(c.schema(), &m, true)?;
    loaded(&c)?;
    let rows = c.get(&ids, f.output());
    Ok(Reply::data(Value::Array(
        rows.into_iter()
            .map(|r| f.render(c.schema(), ctx, r, None))
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

async fn query(st: Arc<AppState>, ctx: Ctx, m: Map<String, Value>) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let filter = parse_filter(&m)?;
    let f = parse_output_fields(c.schema(), &m, false)?;
    let (limit, offset) = limit_offset(&m, 100)?;
    loaded(&c)?;
    if f.count {
        let n = c.count(filter.as_ref());
        return Ok(Reply::data(json!([{"count(*)": n}])));
    }
    let rows = c.query(filter.as_ref(), offset, limit, f.output());
    Ok(Reply::data(Value::Array(
        rows.into_iter()
            .map(|r| f.render(c.schema(), ctx, r, None))
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

async fn search(st: Arc<AppState>, ctx: Ctx, m: Map<String, Value>) -> Result<Reply, ApiError> {
    let c = collection(&st, &m)?;
    let s = c.schema().clone();
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
    let f = parse_output_fields(&s, &m, false)?;
    if f.count {
        return Err(ApiError::invalid(
            "outputFields",
            "count(*) is only valid in query",
        ));
    }
    loaded(&c)?;
    let c2 = c.clone();
    let out = f.output();
    let hits = tokio::task::spawn_blocking(move || {
        c2.search(&queries, limit + offset, &params, filter.as_ref(), out)
    })
    .await
    .map_err(|e| ApiError::new(code::INTERNAL, format!("internal error: search task: {e}")))??;
    let mut flat = Vec::new();
    let mut topks = Vec::with_capacity(hits.len());
    for q in hits {
        let kept: Vec<_> = q.into_iter().skip(offset).collect();
        topks.push(kept.len());
        for h in kept {
            flat.push(f.render(&s, ctx, h.row, Some(h.score)));
        }
    }
    Ok(Reply {
        data: Value::Array(flat),
        extra: vec![("topks", json!(topks))],
    })
}
