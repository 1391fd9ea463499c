//! Conversions between Milvus's column-wise wire types and the engine's row types: collection
//! schemas, inserted field data, placeholder groups (query vectors), output-field lists and the
//! result columns. Every function validates in full and answers a Milvus [`Status`] the user can
//! act on; nothing here reaches a backend, so a refused request changes nothing.
//!
//! The engine's data model is the quick form: an Int64 primary key, one float vector and the
//! dynamic fields (`$meta`). Declared scalar fields are kept in the dynamic part (see the README's
//! Milvus compatibility table); everything the model cannot hold is refused here.

use super::pb::common::{PlaceholderGroup, PlaceholderType, Status};
use super::pb::schema::{
    self as ps, CollectionSchema, DataType, FieldData, FieldSchema, field_data, scalar_field,
    vector_field,
};
use super::status::{invalid, not_supported};
use crate::api::backend::ReadFields;
use crate::core::storage::collection::{RowOut, Schema};
use crate::core::storage::wal::RowBatch;
use crate::core::types::Metric;
use serde_json::{Map, Value};

/// Name of the dynamic field in schemas and results, as Milvus names it.
pub const DYNAMIC_FIELD: &str = "$meta";
const PK_FIELD_ID: i64 = 100;
const VECTOR_FIELD_ID: i64 = 101;
const DYNAMIC_FIELD_ID: i64 = 102;

/// The engine schema for a `CreateCollection` request. The metric is the collection's default
/// (COSINE, what Milvus's quick setup uses) until an index names another (see the service's
/// `CreateIndex`).
pub fn schema_from_pb(collection_name: &str, s: &CollectionSchema) -> Result<Schema, Status> {
    if !s.name.is_empty() && s.name != collection_name {
        return Err(invalid(format!(
            "schema name {:?} differs from collection_name {collection_name:?}",
            s.name
        )));
    }
    if !s.functions.is_empty() {
        return Err(not_supported("a schema with functions (BM25, embeddings)"));
    }
    if !s.struct_array_fields.is_empty() {
        return Err(not_supported("a schema with struct array fields"));
    }
    let mut pk: Option<&FieldSchema> = None;
    let mut vector: Option<(&FieldSchema, usize)> = None;
    let mut has_scalars = false;
    for f in &s.fields {
        let ty = DataType::try_from(f.data_type).unwrap_or(DataType::None);
        let name = f.name.as_str();
        if name.is_empty() {
            return Err(invalid("every field needs a name"));
        }
        if f.is_partition_key || f.is_clustering_key {
            return Err(not_supported(&format!(
                "field {name:?}: partition and clustering keys"
            )));
        }
        if f.nullable || !f.default_value.is_empty() {
            return Err(not_supported(&format!(
                "field {name:?}: nullable fields and default values"
            )));
        }
        if f.is_dynamic {
            continue;
        }
        if f.is_primary_key {
            if pk.is_some() {
                return Err(invalid("a schema has exactly one primary key field"));
            }
            if ty != DataType::Int64 {
                return Err(not_supported(&format!(
                    "primary key {name:?} of type {}: Shoal's primary keys are Int64 for now",
                    ty.as_str_name()
                )));
            }
            pk = Some(f);
            continue;
        }
        match ty {
            DataType::FloatVector => {
                if vector.is_some() {
                    return Err(not_supported("more than one vector field"));
                }
                let dim = f
                    .type_params
                    .iter()
                    .find(|kv| kv.key == "dim")
                    .ok_or_else(|| invalid(format!("vector field {name:?} needs a dim")))?;
                let dim = dim.value.trim().parse::<usize>().map_err(|_| {
                    invalid(format!(
                        "vector field {name:?}: dim {:?} is not a positive integer",
                        dim.value
                    ))
                })?;
                vector = Some((f, dim));
            }
            DataType::Bool
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Float
            | DataType::Double
            | DataType::String
            | DataType::VarChar
            | DataType::Json => has_scalars = true,
            other => {
                return Err(not_supported(&format!(
                    "field {name:?} of type {}",
                    other.as_str_name()
                )));
            }
        }
    }
    let pk = pk.ok_or_else(|| invalid("the schema has no primary key field"))?;
    let (vf, dim) = vector.ok_or_else(|| invalid("the schema has no FloatVector field"))?;
    Ok(Schema {
        name: collection_name.to_string(),
        dim,
        metric: Metric::COSINE,
        auto_id: pk.auto_id || s.auto_id,
        pk_field: pk.name.clone(),
        vector_field: vf.name.clone(),
        // Declared scalar fields live in the dynamic part.
        dynamic: s.enable_dynamic_field || has_scalars,
    })
}

/// The Milvus schema of an engine collection: the primary key and the vector. Like Milvus's
/// proxy, the dynamic field is not listed (`enable_dynamic_field` says it exists); SDKs add
/// `$meta` themselves when they pack rows.
pub fn schema_to_pb(s: &Schema) -> CollectionSchema {
    let kv = |k: &str, v: String| super::pb::common::KeyValuePair {
        key: k.into(),
        value: v,
    };
    let fields = vec![
        FieldSchema {
            field_id: PK_FIELD_ID,
            name: s.pk_field.clone(),
            is_primary_key: true,
            data_type: DataType::Int64 as i32,
            auto_id: s.auto_id,
            ..FieldSchema::default()
        },
        FieldSchema {
            field_id: VECTOR_FIELD_ID,
            name: s.vector_field.clone(),
            data_type: DataType::FloatVector as i32,
            type_params: vec![kv("dim", s.dim.to_string())],
            ..FieldSchema::default()
        },
    ];
    CollectionSchema {
        name: s.name.clone(),
        auto_id: s.auto_id,
        fields,
        enable_dynamic_field: s.dynamic,
        ..CollectionSchema::default()
    }
}

fn scalar_column(name: &str, f: &FieldData) -> Result<Vec<Value>, Status> {
    use scalar_field::Data;
    let Some(field_data::Field::Scalars(s)) = &f.field else {
        return Err(invalid(format!("field {name:?}: expected scalar data")));
    };
    let Some(data) = &s.data else {
        return Err(invalid(format!("field {name:?}: no data")));
    };
    Ok(match data {
        Data::BoolData(a) => a.data.iter().map(|v| Value::from(*v)).collect(),
        Data::IntData(a) => a.data.iter().map(|v| Value::from(*v)).collect(),
        Data::LongData(a) => a.data.iter().map(|v| Value::from(*v)).collect(),
        Data::FloatData(a) => a.data.iter().map(|v| Value::from(f64::from(*v))).collect(),
        Data::DoubleData(a) => a.data.iter().map(|v| Value::from(*v)).collect(),
        Data::StringData(a) => a.data.iter().map(|v| Value::from(v.as_str())).collect(),
        Data::JsonData(a) => a
            .data
            .iter()
            .enumerate()
            .map(|(i, b)| {
                serde_json::from_slice::<Value>(b)
                    .map_err(|e| invalid(format!("field {name:?}, row {i}: malformed JSON: {e}")))
            })
            .collect::<Result<_, _>>()?,
        Data::BytesData(_) | Data::ArrayData(_) => {
            return Err(not_supported(&format!(
                "field {name:?}: bytes and array columns"
            )));
        }
    })
}

/// Rows to write from an `Insert`/`Upsert` request's columns.
///
/// Errors (1100 unless said): no or ragged columns, a missing primary key (required unless the
/// collection generates keys and this is an insert), a key given to an autoID insert, a vector
/// column of the wrong type or dimension or with NaN/Inf, a dynamic row that is not a JSON
/// object, a column the schema does not know while dynamic fields are off, a duplicate column.
pub fn rows_from_pb(
    s: &Schema,
    fields: &[FieldData],
    num_rows: u32,
    upsert: bool,
) -> Result<RowBatch, Status> {
    if fields.is_empty() {
        return Err(invalid("fields_data is empty: nothing to insert"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut ids: Option<Vec<i64>> = None;
    let mut vectors: Option<Vec<f32>> = None;
    let mut dynamic: Option<Vec<Map<String, Value>>> = None;
    let mut extra: Vec<(String, Vec<Value>)> = Vec::new();
    for f in fields {
        let name = f.field_name.as_str();
        if !seen.insert(name) {
            return Err(invalid(format!(
                "field {name:?} appears twice in fields_data"
            )));
        }
        if name == s.pk_field {
            if s.auto_id && !upsert {
                return Err(invalid(format!(
                    "the primary key {name:?} is generated (autoID); do not pass it on insert"
                )));
            }
            match &f.field {
                Some(field_data::Field::Scalars(ps::ScalarField {
                    data: Some(scalar_field::Data::LongData(a)),
                })) => ids = Some(a.data.clone()),
                _ => {
                    return Err(invalid(format!(
                        "the primary key {name:?} must be an Int64 column"
                    )));
                }
            }
        } else if name == s.vector_field {
            let Some(field_data::Field::Vectors(v)) = &f.field else {
                return Err(invalid(format!(
                    "field {name:?} must be a FloatVector column"
                )));
            };
            let Some(vector_field::Data::FloatVector(fa)) = &v.data else {
                return Err(invalid(format!(
                    "field {name:?} is a FloatVector field; other vector types are not accepted"
                )));
            };
            if usize::try_from(v.dim).ok() != Some(s.dim) {
                return Err(invalid(format!(
                    "the dim ({}) of field data {name:?} is not equal to the schema dim ({})",
                    v.dim, s.dim
                )));
            }
            if let Some(i) = fa.data.iter().position(|x| !x.is_finite()) {
                return Err(invalid(format!(
                    "field {name:?}: row {} has a NaN or infinite component",
                    i / s.dim.max(1)
                )));
            }
            vectors = Some(fa.data.clone());
        } else if f.is_dynamic || name == DYNAMIC_FIELD {
            if !s.dynamic {
                return Err(invalid(
                    "dynamic fields are off for this collection; $meta is not accepted",
                ));
            }
            let rows = scalar_column(name, f)?
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(m),
                    _ => Err(invalid(format!(
                        "dynamic field row {i} must be a JSON object"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            dynamic = Some(rows);
        } else if s.dynamic {
            extra.push((name.to_string(), scalar_column(name, f)?));
        } else {
            return Err(invalid(format!(
                "field {name:?} does not exist in collection {:?}",
                s.name
            )));
        }
    }
    let vectors = vectors.ok_or_else(|| {
        invalid(format!(
            "the vector field {:?} is missing from fields_data",
            s.vector_field
        ))
    })?;
    let n = vectors.len() / s.dim.max(1);
    if vectors.len() % s.dim.max(1) != 0 {
        return Err(invalid(format!(
            "the vector column holds {} floats, not a multiple of dim {}",
            vectors.len(),
            s.dim
        )));
    }
    if num_rows != 0 && num_rows as usize != n {
        return Err(invalid(format!(
            "num_rows is {num_rows} but the vector column holds {n} rows"
        )));
    }
    if n == 0 {
        return Err(invalid("no rows to insert"));
    }
    let ids = match ids {
        Some(ids) if ids.len() != n => {
            return Err(invalid(format!(
                "the primary key column has {} rows, the vector column {n}",
                ids.len()
            )));
        }
        Some(ids) => ids,
        None if s.auto_id && !upsert => Vec::new(),
        None => {
            return Err(invalid(format!(
                "the primary key {:?} is missing from fields_data",
                s.pk_field
            )));
        }
    };
    let mut rows: Vec<Map<String, Value>> = match dynamic {
        Some(d) if d.len() != n => {
            return Err(invalid(format!(
                "the dynamic field has {} rows, the vector column {n}",
                d.len()
            )));
        }
        Some(d) => d,
        None => vec![Map::new(); n],
    };
    for (name, col) in extra {
        if col.len() != n {
            return Err(invalid(format!(
                "field {name:?} has {} rows, the vector column {n}",
                col.len()
            )));
        }
        for (row, v) in rows.iter_mut().zip(col) {
            row.insert(name.clone(), v);
        }
    }
    let mut out = RowBatch::new(s.dim);
    out.ids = ids;
    out.vectors = vectors;
    out.fields = rows
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if let Some(k) = m
                .keys()
                .find(|k| **k == s.pk_field || **k == s.vector_field)
            {
                return Err(invalid(format!(
                    "dynamic field row {i} repeats the schema field {k:?}"
                )));
            }
            Ok(if m.is_empty() {
                Vec::new()
            } else {
                Value::Object(m).to_string().into_bytes()
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(out)
}

/// The query vectors of a serialized placeholder group: `nq * dim` floats.
///
/// Errors: 1100 for bytes that are not a placeholder group, not exactly one placeholder, a
/// vector of the wrong dimension or with NaN/Inf, no vectors; "not supported" for other vector
/// types and for text or primary-key placeholders.
pub fn queries_from_placeholder(bytes: &[u8], dim: usize) -> Result<(Vec<f32>, usize), Status> {
    use prost::Message as _;
    let g = PlaceholderGroup::decode(bytes)
        .map_err(|e| invalid(format!("malformed placeholder group: {e}")))?;
    let [p] = g.placeholders.as_slice() else {
        return Err(invalid(format!(
            "the placeholder group must hold exactly one placeholder, it holds {}",
            g.placeholders.len()
        )));
    };
    match PlaceholderType::try_from(p.r#type) {
        Ok(PlaceholderType::FloatVector) => {}
        Ok(other) => {
            return Err(not_supported(&format!(
                "search with {} placeholders (only FloatVector)",
                other.as_str_name()
            )));
        }
        Err(_) => return Err(invalid(format!("unknown placeholder type {}", p.r#type))),
    }
    if p.values.is_empty() {
        return Err(invalid("the placeholder holds no query vectors"));
    }
    let mut out = Vec::with_capacity(p.values.len() * dim);
    for (i, v) in p.values.iter().enumerate() {
        if v.len() != dim * 4 {
            return Err(invalid(format!(
                "query vector {i} has dimension {} (byte length {}), the collection has dimension {dim}",
                v.len() / 4,
                v.len()
            )));
        }
        for c in v.chunks_exact(4) {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if !x.is_finite() {
                return Err(invalid(format!(
                    "query vector {i} has a NaN or infinite component"
                )));
            }
            out.push(x);
        }
    }
    Ok((out, p.values.len()))
}

/// What a read returns, resolved from `output_fields` as Milvus does.
#[derive(Debug, Clone, Default)]
pub struct OutputPlan {
    pub read: ReadFields,
    /// `count(*)` was asked (query only).
    pub count: bool,
    /// `output_fields` of the reply: what pymilvus uses to pick dynamic keys out of `$meta`.
    pub names: Vec<String>,
}

/// Resolve `output_fields`: `*`, the primary key, the vector, `$meta`, `count(*)` and (with
/// dynamic fields on) any other name as a dynamic key. Errors: 1100 for a name the collection
/// cannot have.
pub fn output_plan(s: &Schema, fields: &[String]) -> Result<OutputPlan, Status> {
    let mut p = OutputPlan::default();
    let push = |names: &mut Vec<String>, n: &str| {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for raw in fields {
        let name = raw.trim();
        if name.is_empty() {
            continue;
        }
        if name == "*" {
            p.read.vector = true;
            push(&mut p.names, &s.vector_field);
            if s.dynamic {
                p.read.all_dynamic = true;
                push(&mut p.names, DYNAMIC_FIELD);
            }
        } else if name == s.pk_field {
            push(&mut p.names, name);
        } else if name == s.vector_field {
            p.read.vector = true;
            push(&mut p.names, name);
        } else if name.eq_ignore_ascii_case("count(*)") {
            p.count = true;
        } else if name == DYNAMIC_FIELD && s.dynamic {
            p.read.all_dynamic = true;
            push(&mut p.names, name);
        } else if s.dynamic {
            if !p.read.names.iter().any(|x| x == name) {
                p.read.names.push(name.to_string());
            }
            push(&mut p.names, name);
        } else {
            return Err(invalid(format!(
                "field {name:?} does not exist in collection {:?}",
                s.name
            )));
        }
    }
    Ok(p)
}

fn long_column(name: &str, id: i64, data: Vec<i64>) -> FieldData {
    FieldData {
        r#type: DataType::Int64 as i32,
        field_name: name.into(),
        field_id: id,
        field: Some(field_data::Field::Scalars(ps::ScalarField {
            data: Some(scalar_field::Data::LongData(ps::LongArray { data })),
        })),
        ..FieldData::default()
    }
}

/// The `count(*)` result column.
pub fn count_column(n: u64) -> FieldData {
    long_column("count(*)", 0, vec![i64::try_from(n).unwrap_or(i64::MAX)])
}

/// The primary keys as Milvus `IDs`.
pub fn ids_pb(ids: Vec<i64>) -> ps::IDs {
    ps::IDs {
        id_field: Some(ps::i_ds::IdField::IntId(ps::LongArray { data: ids })),
    }
}

/// Result columns for `rows` under `plan`: the primary key (`with_pk`), the vector, `$meta`
/// (only the asked-for keys unless all are asked for).
pub fn columns<'a>(
    s: &Schema,
    plan: &OutputPlan,
    rows: impl Iterator<Item = &'a RowOut> + Clone,
    with_pk: bool,
) -> Vec<FieldData> {
    let mut out = Vec::new();
    if with_pk {
        out.push(long_column(
            &s.pk_field,
            PK_FIELD_ID,
            rows.clone().map(|r| r.id).collect(),
        ));
    }
    if plan.read.vector {
        let mut data = Vec::new();
        for r in rows.clone() {
            match &r.vector {
                Some(v) => data.extend_from_slice(v),
                // A row always has its vector; keep the column aligned if one did not.
                None => data.extend(std::iter::repeat_n(0.0, s.dim)),
            }
        }
        out.push(FieldData {
            r#type: DataType::FloatVector as i32,
            field_name: s.vector_field.clone(),
            field_id: VECTOR_FIELD_ID,
            field: Some(field_data::Field::Vectors(ps::VectorField {
                dim: s.dim as i64,
                data: Some(vector_field::Data::FloatVector(ps::FloatArray { data })),
            })),
            ..FieldData::default()
        });
    }
    if plan.read.all_dynamic || !plan.read.names.is_empty() {
        let data = rows
            .map(|r| {
                let m: Map<String, Value> = if plan.read.all_dynamic {
                    r.fields.clone()
                } else {
                    plan.read
                        .names
                        .iter()
                        .filter_map(|n| r.fields.get(n).map(|v| (n.clone(), v.clone())))
                        .collect()
                };
                Value::Object(m).to_string().into_bytes()
            })
            .collect();
        out.push(FieldData {
            r#type: DataType::Json as i32,
            field_name: DYNAMIC_FIELD.into(),
            field_id: DYNAMIC_FIELD_ID,
            is_dynamic: true,
            field: Some(field_data::Field::Scalars(ps::ScalarField {
                data: Some(scalar_field::Data::JsonData(ps::JsonArray { data })),
            })),
            ..FieldData::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::milvus::pb::common::{KeyValuePair, PlaceholderValue};
    use prost::Message as _;

    fn quick(dim: usize) -> Schema {
        Schema {
            name: "c".into(),
            dim,
            metric: Metric::COSINE,
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
        }
    }

    fn field(name: &str, ty: DataType) -> FieldSchema {
        FieldSchema {
            name: name.into(),
            data_type: ty as i32,
            ..FieldSchema::default()
        }
    }

    #[test]
    fn quick_setup_schema_round_trips_and_scalars_go_to_the_dynamic_part() {
        let mut pk = field("my_id", DataType::Int64);
        pk.is_primary_key = true;
        pk.auto_id = true;
        let mut v = field("emb", DataType::FloatVector);
        v.type_params = vec![KeyValuePair {
            key: "dim".into(),
            value: "8".into(),
        }];
        let pb = CollectionSchema {
            name: "c".into(),
            fields: vec![pk, v, field("title", DataType::VarChar)],
            ..CollectionSchema::default()
        };
        let s = schema_from_pb("c", &pb).expect("valid");
        assert_eq!(
            (s.dim, s.auto_id, s.dynamic, s.pk_field.as_str()),
            (8, true, true, "my_id")
        );
        let back = schema_to_pb(&s);
        assert_eq!(back.fields.len(), 2);
        assert!(back.enable_dynamic_field);
    }

    #[test]
    fn schemas_the_model_cannot_hold_are_refused_with_a_reason() {
        let mut pk = field("id", DataType::VarChar);
        pk.is_primary_key = true;
        let pb = CollectionSchema {
            fields: vec![pk],
            ..CollectionSchema::default()
        };
        let e = schema_from_pb("c", &pb).expect_err("varchar pk");
        assert!(e.reason.contains("Int64"), "{}", e.reason);
        let mut pk = field("id", DataType::Int64);
        pk.is_primary_key = true;
        let pb = CollectionSchema {
            fields: vec![pk],
            ..CollectionSchema::default()
        };
        let e = schema_from_pb("c", &pb).expect_err("no vector");
        assert_eq!(e.code, 1100);
    }

    #[test]
    fn placeholder_groups_are_checked_for_shape_and_dimension() {
        let vec_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let g = PlaceholderGroup {
            placeholders: vec![PlaceholderValue {
                tag: "$0".into(),
                r#type: PlaceholderType::FloatVector as i32,
                values: vec![vec_bytes(&[1.0, 2.0]), vec_bytes(&[3.0, 4.0])],
            }],
        };
        let (q, nq) = queries_from_placeholder(&g.encode_to_vec(), 2).expect("valid");
        assert_eq!((q, nq), (vec![1.0, 2.0, 3.0, 4.0], 2));
        let e = queries_from_placeholder(&g.encode_to_vec(), 3).expect_err("dim");
        assert!(e.reason.contains("dimension 2"), "{}", e.reason);
        let e = queries_from_placeholder(b"\xff\xff\xff", 2).expect_err("garbage");
        assert!(
            e.reason.contains("malformed placeholder group"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn insert_columns_become_rows_with_scalars_merged_into_the_dynamic_part() {
        let s = quick(2);
        let cols = vec![
            long_column("id", 0, vec![7, 8]),
            FieldData {
                r#type: DataType::FloatVector as i32,
                field_name: "vector".into(),
                field: Some(field_data::Field::Vectors(ps::VectorField {
                    dim: 2,
                    data: Some(vector_field::Data::FloatVector(ps::FloatArray {
                        data: vec![1.0, 2.0, 3.0, 4.0],
                    })),
                })),
                ..FieldData::default()
            },
            long_column("year", 0, vec![2001, 2002]),
        ];
        let b = rows_from_pb(&s, &cols, 2, false).expect("valid");
        assert_eq!(b.ids, vec![7, 8]);
        assert_eq!(b.fields[1], br#"{"year":2002}"#.to_vec());
        let e = rows_from_pb(&s, &cols[1..], 2, false).expect_err("no pk");
        assert!(e.reason.contains("primary key"), "{}", e.reason);
        let e = rows_from_pb(&quick(3), &cols, 2, false).expect_err("dim");
        assert!(e.reason.contains("schema dim (3)"), "{}", e.reason);
    }
}
