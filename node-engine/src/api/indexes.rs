//! `indexes/create|describe|list|drop`: parsing and validating index definitions (shared by
//! every backend), and [`IndexService`], the local engine's index bookkeeping. FLAT is exact and
//! needs no build; IVF_FLAT, IVF_SQ8, IVF_PQ and HNSW are built per sealed segment in the
//! background ([`Engine::put_indexes`], [`Engine::drop_index`]) and searched once committed.

use super::backend::{Backend, CollectionMeta};
use super::error::ApiError;
use super::rest::{Ctx, Reply, RestState, collection, opt_str, req_str};
use crate::core::engine::Engine;
use crate::core::meta::IndexRecord;
use crate::core::storage::collection::Collection;
use crate::core::types::{IndexType, Metric};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Index bookkeeping for the REST layer.
#[derive(Debug, Clone)]
pub struct IndexService {
    engine: Arc<Engine>,
}

impl IndexService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// A collection was dropped: its builds stop at the next claim (the collection is closed).
    pub fn forget(&self, _c: &Collection) {}

    /// A flush sealed segments: let the index builder look for work now.
    pub fn kick(&self, _c: &Collection) {
        self.engine.index_builder().kick();
    }

    pub fn maybe_kick(&self, _c: &Collection) {}
}

fn parse_index_param(c: &CollectionMeta, p: &Map<String, Value>) -> Result<IndexRecord, ApiError> {
    let s = &c.schema;
    let field = req_str(p, "fieldName")?;
    if field != s.vector_field {
        return Err(ApiError::invalid(
            "indexParams.fieldName",
            format!("{field:?} is not the vector field {:?}", s.vector_field),
        ));
    }
    let index_name = opt_str(p, "indexName")?.unwrap_or(field).to_string();
    crate::core::engine::validate_name("indexParams.indexName", &index_name)?;
    let metric = match opt_str(p, "metricType")? {
        None => s.metric,
        Some(m) => m
            .parse::<Metric>()
            .map_err(|e| ApiError::invalid("indexParams.metricType", e))?,
    };
    if metric != s.metric {
        return Err(ApiError::invalid(
            "indexParams.metricType",
            format!("{metric} differs from the collection's {}", s.metric),
        ));
    }
    let index_type = match opt_str(p, "indexType")? {
        None => IndexType::FLAT,
        Some(t) if t.eq_ignore_ascii_case("AUTOINDEX") => IndexType::FLAT,
        Some(t) => t
            .parse::<IndexType>()
            .map_err(|e| ApiError::invalid("indexParams.indexType", e))?,
    };
    let params = match p.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::invalid("indexParams.params", "must be an object")),
    };
    // Milvus clients repeat these inside params; they are not build parameters. The values of
    // the rest are checked by the engine (`Engine::put_indexes`), which names each one's range.
    let mut params = params;
    params.remove("metric_type");
    params.remove("index_type");
    if index_type == IndexType::FLAT
        && let Some(k) = params.keys().next()
    {
        return Err(ApiError::invalid(
            &format!("indexParams.params.{k}"),
            "FLAT takes no build parameters",
        ));
    }
    Ok(IndexRecord {
        collection_id: c.id,
        index_name,
        field_name: field.to_string(),
        index_type: index_type.as_str().into(),
        metric: metric.as_str().into(),
        params: Value::Object(params).to_string(),
    })
}

/// REST `indexes/create` (also called by the writer role's gRPC `CreateIndex`).
pub(crate) async fn create<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let list = match m.get("indexParams") {
        None | Some(Value::Null) => return Err(ApiError::missing("indexParams")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => {
            return Err(ApiError::invalid(
                "indexParams",
                "must be a non-empty list of index definitions",
            ));
        }
    };
    // Validate every definition before writing any, so a bad one changes nothing.
    let mut recs = Vec::new();
    for p in list {
        let p = p
            .as_object()
            .ok_or_else(|| ApiError::invalid("indexParams", "each entry must be an object"))?;
        recs.push(parse_index_param(&c, p)?);
    }
    let existing = st.backend.indexes(&c).await?;
    for r in &recs {
        if existing
            .iter()
            .any(|e| e.field_name == r.field_name && e.index_name != r.index_name)
        {
            return Err(ApiError::invalid(
                "indexParams.indexName",
                format!(
                    "field {:?} already has an index with another name; drop it first",
                    r.field_name
                ),
            ));
        }
    }
    st.backend.create_indexes(&c, recs).await?;
    Ok(Reply::data(json!({})))
}

pub(super) async fn describe<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let name = req_str(&m, "indexName")?;
    let recs = st.backend.indexes(&c).await?;
    let r = recs
        .iter()
        .find(|r| r.index_name == name)
        .ok_or_else(|| ApiError::invalid("indexName", format!("index {name:?} does not exist")))?;
    let p = st.backend.index_progress(&c, r).await?;
    let params: Value = serde_json::from_str(&r.params).unwrap_or(json!({}));
    let state = if p.pending_rows == 0 {
        "Finished"
    } else {
        "InProgress"
    };
    Ok(Reply::data(json!([{
        "indexName": r.index_name,
        "fieldName": r.field_name,
        "indexType": r.index_type,
        "metricType": r.metric,
        "params": params,
        "indexState": state,
        "indexedRows": p.indexed_rows,
        "totalRows": p.total_rows,
        "pendingIndexRows": p.pending_rows,
        "pendingRows": p.pending_rows,
        "failReason": p.fail_reason,
        "indexBytes": p.index_bytes,
        "indexedSegments": p.indexed_segments,
        "flatSegments": p.flat_segments,
        "indexLoadFailures": p.load_failures,
        "indexLoadFailureReasons": p.load_failure_reasons.iter()
            .map(|(seg, why)| json!({"segmentID": seg, "reason": why})).collect::<Vec<_>>(),
    }])))
}

pub(super) async fn list<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let recs = st.backend.indexes(&c).await?;
    Ok(Reply::data(json!(
        recs.iter()
            .map(|r| r.index_name.clone())
            .collect::<Vec<_>>()
    )))
}

/// REST `indexes/drop` (also called by the writer role's gRPC `DropIndex`).
pub(crate) async fn drop<B: Backend>(
    st: Arc<RestState<B>>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = collection(&st, &m).await?;
    let name = req_str(&m, "indexName")?;
    let recs = st.backend.indexes(&c).await?;
    if !recs.iter().any(|r| r.index_name == name) {
        return Err(ApiError::invalid(
            "indexName",
            format!("index {name:?} does not exist"),
        ));
    }
    st.backend.drop_index(&c, name).await?;
    Ok(Reply::data(json!({})))
}
