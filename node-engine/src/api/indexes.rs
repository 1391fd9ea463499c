//! `indexes/create|describe|list|drop`: REST adapters over the engine's index definitions
//! ([`Engine::put_indexes`], [`Engine::drop_index`]) and build progress
//! ([`Collection::index_progress`]). FLAT is exact and needs no build; IVF_FLAT, IVF_SQ8, IVF_PQ
//! and HNSW are built per sealed segment in the background and searched once committed.

use super::error::ApiError;
use super::rest::{AppState, Ctx, Reply, opt_str, req_str};
use crate::core::engine::Engine;
use crate::core::meta::IndexRecord;
use crate::core::storage::collection::{Collection, CollectionRead};
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

    /// The quick-setup index every new collection gets (Milvus creates one on the vector field).
    pub async fn register_default(&self, c: &Collection) -> Result<(), ApiError> {
        let s = c.schema();
        self.engine
            .meta()
            .put_index(&IndexRecord {
                collection_id: c.collection_id(),
                index_name: s.vector_field.clone(),
                field_name: s.vector_field.clone(),
                index_type: IndexType::FLAT.as_str().into(),
                metric: s.metric.as_str().into(),
                params: "{}".into(),
            })
            .await?;
        Ok(())
    }

    /// Every index of `c` as `collections/describe` lists them.
    pub async fn describe_all(&self, c: &Collection) -> Result<Vec<Value>, ApiError> {
        let recs = self.engine.meta().indexes(c.collection_id()).await?;
        let p = c.index_progress();
        Ok(recs
            .iter()
            .map(|r| {
                let bytes = match &p.index {
                    Some((name, _)) if *name == r.index_name => p.index_bytes,
                    _ => 0,
                };
                json!({"fieldName": r.field_name, "indexName": r.index_name, "metricType": r.metric,
                       "indexType": r.index_type, "indexBytes": bytes})
            })
            .collect())
    }

    /// A collection was dropped: its builds stop at the next claim (the collection is closed).
    pub fn forget(&self, _c: &Collection) {}

    /// A flush sealed segments: let the builder look for work now.
    pub fn kick(&self, _c: &Collection) {
        self.engine.index_builder().kick();
    }

    /// New rows arrived: only sealed segments are indexed, and the flusher wakes the builder.
    pub fn maybe_kick(&self, _c: &Collection) {}
}

/// Turn one `indexParams` entry into a definition (shape only: values are checked by
/// [`Engine::put_indexes`], which names the parameter and its range).
fn parse_index_param(c: &Collection, p: &Map<String, Value>) -> Result<IndexRecord, ApiError> {
    let s = c.schema();
    let field = req_str(p, "fieldName")?;
    let index_name = opt_str(p, "indexName")?.unwrap_or(field).to_string();
    let metric = match opt_str(p, "metricType")? {
        None => s.metric,
        Some(m) => m
            .parse::<Metric>()
            .map_err(|e| ApiError::invalid("indexParams.metricType", e))?,
    };
    let index_type = match opt_str(p, "indexType")? {
        None => IndexType::FLAT,
        Some(t) if t.eq_ignore_ascii_case("AUTOINDEX") => IndexType::FLAT,
        Some(t) => t
            .parse::<IndexType>()
            .map_err(|e| ApiError::invalid("indexParams.indexType", e))?,
    };
    let mut params = match p.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::invalid("indexParams.params", "must be an object")),
    };
    // Milvus clients repeat these inside params; they are not build parameters.
    params.remove("metric_type");
    params.remove("index_type");
    Ok(IndexRecord {
        collection_id: c.collection_id(),
        index_name,
        field_name: field.to_string(),
        index_type: index_type.as_str().into(),
        metric: metric.as_str().into(),
        params: Value::Object(params).to_string(),
    })
}

pub(super) async fn create(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = super::rest_collection(&st, &m)?;
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
    // Every definition is validated before any is written, so a bad one changes nothing.
    let mut recs = Vec::new();
    for p in list {
        let p = p
            .as_object()
            .ok_or_else(|| ApiError::invalid("indexParams", "each entry must be an object"))?;
        recs.push(parse_index_param(&c, p)?);
    }
    st.engine
        .put_indexes(&c.schema().name, &recs)
        .await
        .map_err(|e| match e {
            crate::core::engine::EngineError::InvalidParam { name, reason } => {
                ApiError::invalid(&format!("indexParams.{name}"), reason)
            }
            crate::core::engine::EngineError::Collection(
                crate::core::storage::collection::CollectionError::Index(
                    crate::core::index::IndexError::InvalidParam { name, reason },
                ),
            ) => ApiError::invalid(&format!("indexParams.params.{name}"), reason),
            other => other.into(),
        })?;
    Ok(Reply::data(json!({})))
}

pub(super) async fn describe(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = super::rest_collection(&st, &m)?;
    let name = req_str(&m, "indexName")?;
    let recs = st.engine.meta().indexes(c.collection_id()).await?;
    let r = recs
        .iter()
        .find(|r| r.index_name == name)
        .ok_or_else(|| ApiError::invalid("indexName", format!("index {name:?} does not exist")))?;
    let params: Value = serde_json::from_str(&r.params).unwrap_or(json!({}));
    let p = c.index_progress();
    let is_ann = p.index.as_ref().is_some_and(|(n, _)| *n == r.index_name);
    let (indexed, pending) = if is_ann {
        (p.indexed_rows, p.pending_rows)
    } else {
        // FLAT searches every row exactly as soon as it is written.
        (p.total_rows, 0)
    };
    let state = if pending == 0 {
        "Finished"
    } else {
        "InProgress"
    };
    let fail_reason = if is_ann {
        p.failed
            .iter()
            .map(|(seg, why)| format!("segment {seg}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        String::new()
    };
    Ok(Reply::data(json!([{
        "indexName": r.index_name,
        "fieldName": r.field_name,
        "indexType": r.index_type,
        "metricType": r.metric,
        "params": params,
        "indexState": state,
        "indexedRows": indexed,
        "totalRows": p.total_rows,
        "pendingIndexRows": pending,
        "pendingRows": pending,
        "failReason": fail_reason,
        "indexBytes": if is_ann { p.index_bytes } else { 0 },
        "indexedSegments": if is_ann { p.indexed_segments } else { 0 },
        "flatSegments": if is_ann { p.flat_segments } else { 0 },
        "indexLoadFailures": if is_ann { p.load_failures } else { 0 },
        "indexLoadFailureReasons": p.load_failure_reasons.iter()
            .map(|(seg, why)| json!({"segmentID": seg, "reason": why})).collect::<Vec<_>>(),
    }])))
}

pub(super) async fn list(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = super::rest_collection(&st, &m)?;
    let recs = st.engine.meta().indexes(c.collection_id()).await?;
    Ok(Reply::data(json!(
        recs.iter()
            .map(|r| r.index_name.clone())
            .collect::<Vec<_>>()
    )))
}

pub(super) async fn drop(
    st: Arc<AppState>,
    _ctx: Ctx,
    m: Map<String, Value>,
) -> Result<Reply, ApiError> {
    let c = super::rest_collection(&st, &m)?;
    let name = req_str(&m, "indexName")?;
    st.engine.drop_index(&c.schema().name, name).await?;
    Ok(Reply::data(json!({})))
}
