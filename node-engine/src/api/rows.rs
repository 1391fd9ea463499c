//! Typed parsing of `entities/insert` and `entities/upsert` bodies, the REST API's bulk path.
//!
//! The generic request path parses a body into a `serde_json::Value` tree, where every vector
//! component becomes a 32-byte `Value` inside a per-row `Vec`, and then converts the tree; for a
//! batch of 10,000 128-d rows that is ~40 MB of short-lived allocations and two passes over
//! every float. Here no tree is built: [`parse_rows`] reads the body once, and when it reaches
//! `data` (the collection named before it is looked up then) it writes the vector components
//! straight into the batch's contiguous `f32` buffer and keeps dynamic fields as their raw JSON
//! text (compacted, `$meta` merged), never as `Value`s. When the envelope is unusual (`data`
//! before `collectionName`, or a key repeated around `data`) it falls back to two passes: one
//! checks the syntax and finds `collectionName`, `dbName` and where `data` is, the second walks
//! `data` the same way.
//!
//! Every rule and error of the `Value`-based code is kept, in the same order: malformed JSON
//! anywhere in the body is 1801 before anything else; then the collection (dbName, name, not
//! found); then `data`: missing or null 1802, another type 1100; a non-object row anywhere
//! (1804), then an empty list (1100), then the first bad row (1804: primary key, then vector —
//! dimension before component type, NaN/Inf — then fields not in the schema, the first in key
//! order). A key repeated in one object counts once, its last value (as when parsed into a
//! map). JSON nested deeper than serde_json's limit (127 levels) is 1801 where it would be
//! stored (a dynamic field); values that are skipped are not held to that limit, so such
//! nesting inside a vector component is a 1804 bad row and inside an unknown top-level key it
//! is ignored.
//! Depends on serde and the core row types only; the collection comes in through [`RowTarget`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::backend::CollectionMeta;
use super::error::{ApiError, code};
use crate::core::storage::collection::Schema;
use crate::core::storage::wal::RowBatch;

/// The envelope fields the shared request helpers (`dbName` check, collection lookup) read.
const ENVELOPE_KEYS: [&str; 2] = ["collectionName", "dbName"];

/// What row parsing needs from the collection a body names.
pub trait RowTarget {
    fn schema(&self) -> &Schema;
    /// `n` fresh primary keys (autoID collections).
    fn alloc_ids(&self, n: usize) -> Vec<i64>;
}

/// Through the [`Backend`](super::backend::Backend) trait the backend assigns generated keys
/// when it writes (the writer owns the id allocator, a router only forwards): an autoID insert
/// leaves `ids` empty, as [`WriteRows`](super::backend::WriteRows) documents.
impl RowTarget for CollectionMeta {
    fn schema(&self) -> &Schema {
        &self.schema
    }
    fn alloc_ids(&self, _n: usize) -> Vec<i64> {
        Vec::new()
    }
}

/// Parses an insert (`upsert: false`) or upsert body: `lookup` resolves the envelope
/// (`collectionName`, `dbName`) to the target collection, exactly once per outcome that needs
/// it; the batch is returned with the target. `upsert`: every row must carry its primary key
/// even when the collection generates them; generated keys are allocated only when every row
/// is valid.
///
/// Errors: 1801 malformed JSON or not an object; `lookup`'s error; 1802 `data` missing or null;
/// 1100 `data` not a list or object, or empty; 1804 the first bad row with its index and reason.
pub fn parse_rows<T: RowTarget>(
    body: &[u8],
    upsert: bool,
    mut lookup: impl FnMut(&Map<String, Value>) -> Result<T, ApiError>,
) -> Result<(T, RowBatch), ApiError> {
    if let Some(done) = one_pass(body, upsert, &mut lookup) {
        return done;
    }
    let two = TwoPass::parse(body)?;
    let target = lookup(&two.envelope)?;
    let batch = two.to_batch(target.schema(), upsert, |n| target.alloc_ids(n))?;
    Ok((target, batch))
}

/// 1801 for a body that failed to parse: not JSON at all, or JSON that is not an object.
fn bad_json(body: &[u8]) -> ApiError {
    match serde_json::from_slice::<IgnoredAny>(body) {
        Ok(_) => ApiError::new(code::BAD_JSON, "request body must be a JSON object"),
        Err(syntax) => ApiError::new(code::BAD_JSON, format!("malformed JSON body: {syntax}")),
    }
}

/// A JSON object key, borrowed from the body unless it contains escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

// ---------- one pass (the usual envelope: collectionName before data, no repeats) ----------

/// What the single pass saw.
/// What one pass has when it reaches `data`: the envelope read so far and the lookup's outcome
/// with the rows walked.
type AtData<T> = (Map<String, Value>, Result<(T, Walked), ApiError>);

struct OnePass<T> {
    envelope: Map<String, Value>,
    /// The envelope when `data` was reached, the target looked up then, and the rows read.
    at_data: Option<AtData<T>>,
    /// `data` appeared twice: the single pass cannot tell which one counts.
    repeated_data: bool,
}

/// `None` when the envelope needs the two-pass path.
fn one_pass<T: RowTarget>(
    body: &[u8],
    upsert: bool,
    lookup: &mut impl FnMut(&Map<String, Value>) -> Result<T, ApiError>,
) -> Option<Result<(T, RowBatch), ApiError>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let seen = de
        .deserialize_map(OnePassVisitor {
            upsert,
            body_len: body.len(),
            lookup,
        })
        .and_then(|seen| de.end().map(|()| seen));
    let seen = match seen {
        Ok(seen) => seen,
        Err(_) => return Some(Err(bad_json(body))),
    };
    let (at_data, outcome) = seen.at_data?;
    if seen.repeated_data || at_data != seen.envelope {
        return None;
    }
    Some(outcome.and_then(|(target, walked)| {
        let batch = walked.finish(|n| target.alloc_ids(n))?;
        Ok((target, batch))
    }))
}

struct OnePassVisitor<'l, L> {
    upsert: bool,
    body_len: usize,
    lookup: &'l mut L,
}

impl<'de, T: RowTarget, L: FnMut(&Map<String, Value>) -> Result<T, ApiError>> Visitor<'de>
    for OnePassVisitor<'_, L>
{
    type Value = OnePass<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OnePass<T>, A::Error> {
        let mut seen = OnePass {
            envelope: Map::new(),
            at_data: None,
            repeated_data: false,
        };
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if k == "data" {
                if seen.at_data.is_some() {
                    seen.repeated_data = true;
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                let outcome = match (self.lookup)(&seen.envelope) {
                    Ok(target) => {
                        let mut rows = Rows::new(target.schema(), self.upsert, self.body_len);
                        map.next_value_seed(DataSeed(&mut rows))?;
                        let walked = rows.walked();
                        Ok((target, walked))
                    }
                    Err(e) => {
                        map.next_value::<IgnoredAny>()?;
                        Err(e)
                    }
                };
                seen.at_data = Some((seen.envelope.clone(), outcome));
            } else if ENVELOPE_KEYS.contains(&k.as_ref()) {
                let v = map.next_value::<Value>()?;
                seen.envelope.insert(k.into_owned(), v);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(seen)
    }
}

// ---------- two passes (any envelope) ----------

/// A body whose JSON is known to be well-formed, with the envelope and where `data` is.
struct TwoPass<'b> {
    body: &'b [u8],
    envelope: Map<String, Value>,
    data: Option<Range<usize>>,
}

/// Pass 1's result while the body is borrowed.
struct Envelope<'de> {
    fields: Map<String, Value>,
    data: Option<&'de RawValue>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut env = Envelope {
                    fields: Map::new(),
                    data: None,
                };
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    if k == "data" {
                        env.data = Some(map.next_value::<&'de RawValue>()?);
                    } else if ENVELOPE_KEYS.contains(&k.as_ref()) {
                        let v = map.next_value::<Value>()?;
                        env.fields.insert(k.into_owned(), v);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(env)
            }
        }
        d.deserialize_map(EnvelopeVisitor)
    }
}

impl<'b> TwoPass<'b> {
    /// Pass 1: syntax of the whole body, the envelope fields and where `data` is. An empty body
    /// is an empty object, as for every other endpoint.
    fn parse(body: &'b [u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self {
                body,
                envelope: Map::new(),
                data: None,
            });
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let env = Envelope::deserialize(&mut de)
            .and_then(|env| de.end().map(|()| env))
            .map_err(|_| bad_json(body))?;
        let data = env.data.map(|raw| {
            // `raw` borrows from `body`, so its offset is a plain subtraction.
            let start = (raw.get().as_ptr() as usize) - (body.as_ptr() as usize);
            start..start + raw.get().len()
        });
        Ok(Self {
            body,
            envelope: env.fields,
            data,
        })
    }

    /// Pass 2: walk `data` with the schema and build the batch.
    fn to_batch(
        &self,
        schema: &Schema,
        upsert: bool,
        alloc_ids: impl FnOnce(usize) -> Vec<i64>,
    ) -> Result<RowBatch, ApiError> {
        let Some(range) = self.data.clone() else {
            return Err(ApiError::missing("data"));
        };
        let text = &self.body[range];
        let mut rows = Rows::new(schema, upsert, text.len());
        DataSeed(&mut rows)
            .deserialize(&mut serde_json::Deserializer::from_slice(text))
            // Pass 1 checked the syntax; a failure here is a nesting the walk cannot take.
            .map_err(|e| ApiError::new(code::BAD_JSON, format!("malformed JSON body: {e}")))?;
        rows.walked().finish(alloc_ids)
    }
}

/// What `data` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Null,
    /// Neither a list nor an object (nor null).
    Other,
    List,
    Single,
}

/// The walk over `data`: the batch being filled and the first problem seen.
struct Rows<'s> {
    schema: &'s Schema,
    walked: Walked,
    seen: HashSet<i64>,
}

/// What the walk produced, free of the schema borrow.
struct Walked {
    auto: bool,
    shape: Shape,
    batch: RowBatch,
    count: usize,
    first_non_object: Option<usize>,
    first_bad_row: Option<ApiError>,
    /// Nesting of a row's values in the body: body object, `data` list, row object.
    levels: usize,
    /// A stored (dynamic) value nested deeper than JSON parsing allows: 1801, as the whole
    /// body's parse used to fail; checked here because skipped values have no depth limit.
    too_deep: Option<usize>,
}

/// How a row's vector value turned out.
enum VectorRead {
    Absent,
    Null,
    NotArray,
    /// `len` components; `first_bad` is the first component problem, if any.
    Array {
        len: usize,
        first_bad: Option<&'static str>,
    },
}

const NOT_NUMBER: &str = "vector components must be numbers";
const NOT_FINITE: &str =
    "vector has a NaN or infinite component (or one outside the float32 range)";

impl<'s> Rows<'s> {
    fn new(schema: &'s Schema, upsert: bool, text_len: usize) -> Self {
        // Every component takes at least 3 bytes ("0.5," is typical of far more), so this bounds
        // the rows without counting them; untouched reserved pages cost no memory.
        let rows_hint = text_len / (3 * schema.dim.max(1) + 16);
        let mut batch = RowBatch::new(schema.dim);
        batch.vectors.reserve(rows_hint * schema.dim);
        batch.ids.reserve(rows_hint);
        batch.fields.reserve(rows_hint);
        Self {
            schema,
            walked: Walked {
                auto: schema.auto_id && !upsert,
                shape: Shape::Null,
                batch,
                count: 0,
                first_non_object: None,
                first_bad_row: None,
                levels: 3,
                too_deep: None,
            },
            seen: HashSet::new(),
        }
    }

    fn walked(self) -> Walked {
        self.walked
    }

    fn failed(&self) -> bool {
        let w = &self.walked;
        w.first_non_object.is_some() || w.first_bad_row.is_some() || w.too_deep.is_some()
    }

    fn not_an_object(&mut self) {
        let w = &mut self.walked;
        w.first_non_object.get_or_insert(w.count);
        w.count += 1;
    }

    fn check_depth(&mut self, row: usize, raw: &RawValue) {
        let allowed = MAX_DEPTH.saturating_sub(self.walked.levels);
        // Depth d needs d opening brackets, so short values are never too deep.
        if raw.get().len() > allowed && json_depth(raw.get()) > allowed {
            self.walked.too_deep.get_or_insert(row);
        }
    }

    /// Reads one row object. Once any row failed, later rows are only checked to be objects.
    fn read_row<'de, A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        let index = self.walked.count;
        self.walked.count += 1;
        if self.failed() {
            while let Some((_, raw)) = map.next_entry::<IgnoredAny, &'de RawValue>()? {
                self.check_depth(index, raw);
            }
            return Ok(());
        }
        let vec_start = self.walked.batch.vectors.len();
        let mut pk: Option<&'de RawValue> = None;
        let mut vector = VectorRead::Absent;
        let mut dynamic: BTreeMap<Key<'de>, &'de RawValue> = BTreeMap::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.0 == self.schema.pk_field {
                pk = Some(map.next_value::<&'de RawValue>()?);
            } else if key.0 == self.schema.vector_field {
                self.walked.batch.vectors.truncate(vec_start);
                vector = map.next_value_seed(VectorSeed {
                    out: &mut self.walked.batch.vectors,
                    dim: self.schema.dim,
                })?;
            } else {
                let raw = map.next_value::<&'de RawValue>()?;
                self.check_depth(index, raw);
                dynamic.insert(key, raw);
            }
        }
        if self.walked.too_deep.is_some() {
            return Ok(());
        }
        if let Err(reason) = self.accept_row(pk, vector, &dynamic) {
            self.walked.first_bad_row = Some(ApiError::bad_row(index, reason));
        }
        Ok(())
    }

    /// The checks of one row, in the order the API has always applied them.
    fn accept_row(
        &mut self,
        pk: Option<&RawValue>,
        vector: VectorRead,
        dynamic: &BTreeMap<Key<'_>, &RawValue>,
    ) -> Result<(), String> {
        let s = self.schema;
        if self.walked.auto {
            if pk.is_some() {
                return Err(format!(
                    "{} is generated (autoID); do not send it",
                    s.pk_field
                ));
            }
        } else {
            let value = match pk.map(|raw| serde_json::from_str::<Value>(raw.get())) {
                None | Some(Ok(Value::Null)) => {
                    return Err(format!("missing primary key {}", s.pk_field));
                }
                Some(Ok(v)) => Some(v),
                Some(Err(_)) => None,
            };
            let id = value
                .as_ref()
                .and_then(super::rest::parse_id)
                .ok_or_else(|| format!("{} must be an int64", s.pk_field))?;
            if !self.seen.insert(id) {
                return Err(format!("duplicate primary key {id} in one request"));
            }
            self.walked.batch.ids.push(id);
        }
        match vector {
            VectorRead::Absent | VectorRead::Null => {
                return Err(format!("missing vector field {}", s.vector_field));
            }
            VectorRead::NotArray => return Err("vector must be an array of numbers".into()),
            VectorRead::Array { len, .. } if len != s.dim => {
                return Err(format!(
                    "vector has dimension {len}, the collection has {}",
                    s.dim
                ));
            }
            VectorRead::Array {
                first_bad: Some(reason),
                ..
            } => return Err(reason.into()),
            VectorRead::Array { .. } => {}
        }
        if !s.dynamic
            && let Some(k) = dynamic.keys().next()
        {
            return Err(format!(
                "field {:?} is not in the schema (dynamic fields are disabled)",
                k.0
            ));
        }
        let fields = fields_json(dynamic).map_err(|e| format!("dynamic fields: {e}"))?;
        self.walked.batch.fields.push(fields);
        Ok(())
    }
}

impl Walked {
    /// The outcome, errors in the API's order; `alloc_ids` runs only for a valid autoID batch.
    fn finish(mut self, alloc_ids: impl FnOnce(usize) -> Vec<i64>) -> Result<RowBatch, ApiError> {
        match self.shape {
            Shape::Null => return Err(ApiError::missing("data")),
            Shape::Other => {
                return Err(ApiError::invalid("data", "must be a list of row objects"));
            }
            Shape::List | Shape::Single => {}
        }
        if let Some(i) = self.too_deep {
            return Err(ApiError::new(
                code::BAD_JSON,
                format!(
                    "malformed JSON body: recursion limit exceeded (a field of row {i} nests \
                     more than {MAX_DEPTH} levels deep in the body)"
                ),
            ));
        }
        if let Some(i) = self.first_non_object {
            return Err(ApiError::bad_row(i, "each row must be a JSON object"));
        }
        if self.count == 0 {
            return Err(ApiError::invalid("data", "must contain at least one row"));
        }
        if let Some(e) = self.first_bad_row {
            return Err(e);
        }
        if self.auto {
            self.batch.ids = alloc_ids(self.count);
        }
        Ok(self.batch)
    }
}

/// A row's dynamic fields as one compact JSON object, keys in order, `$meta`'s object merged in
/// at its place; empty when there are none.
fn fields_json(dynamic: &BTreeMap<Key<'_>, &RawValue>) -> Result<Vec<u8>, serde_json::Error> {
    if dynamic.is_empty() {
        return Ok(Vec::new());
    }
    let mut merged: BTreeMap<Cow<'_, str>, &RawValue> = BTreeMap::new();
    for (k, raw) in dynamic {
        if k.0 == "$meta" && raw.get().starts_with('{') {
            let inner: BTreeMap<Key<'_>, &RawValue> = serde_json::from_str(raw.get())?;
            for (ik, iv) in inner {
                merged.insert(ik.0, iv);
            }
        } else {
            merged.insert(k.0.clone(), raw);
        }
    }
    let mut out = Vec::with_capacity(
        2 + merged
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>(),
    );
    out.push(b'{');
    for (i, (k, raw)) in merged.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k.as_ref())?;
        out.push(b':');
        push_compact(raw.get(), &mut out);
    }
    out.push(b'}');
    Ok(out)
}

/// The deepest nesting serde_json parses (its recursion limit): stored fields must stay below it
/// so they can be read back.
const MAX_DEPTH: usize = 127;

/// Nesting depth of valid JSON text: 0 for a scalar, 1 for `[1]`, 2 for `{"a":[]}`.
fn json_depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Appends valid JSON text without the whitespace between tokens.
fn push_compact(json: &str, out: &mut Vec<u8>) {
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = b == b'"';
            out.push(b);
        }
    }
}

/// `data`: a list of rows, one row object, null, or something else to report.
struct DataSeed<'a, 's>(&'a mut Rows<'s>);

impl<'de> DeserializeSeed<'de> for DataSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! data_is_other {
    ($($f:ident($t:ty)),*) => {$(
        fn $f<E: de::Error>(self, _: $t) -> Result<(), E> {
            self.0.walked.shape = Shape::Other;
            Ok(())
        }
    )*};
}

impl<'de> Visitor<'de> for DataSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of row objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.walked.shape = Shape::List;
        self.0.walked.levels = 3;
        while seq.next_element_seed(RowElement(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.walked.shape = Shape::Single;
        self.0.walked.levels = 2;
        self.0.read_row(map)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.walked.shape = Shape::Null;
        Ok(())
    }
    data_is_other!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String)
    );
}

/// One element of the `data` list.
struct RowElement<'a, 's>(&'a mut Rows<'s>);

impl<'de> DeserializeSeed<'de> for RowElement<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Any value that is not an object makes its row "not an object"; arrays are drained.
macro_rules! not_an_object {
    ($($f:ident($t:ty)),*) => {$(
        fn $f<E: de::Error>(self, _: $t) -> Result<(), E> {
            self.0.not_an_object();
            Ok(())
        }
    )*};
}

impl<'de> Visitor<'de> for RowElement<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.read_row(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.0.not_an_object();
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.not_an_object();
        Ok(())
    }
    not_an_object!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String)
    );
}

/// A row's vector: components appended to `out` (at most `dim` of them).
struct VectorSeed<'a> {
    out: &'a mut Vec<f32>,
    dim: usize,
}

impl<'de> DeserializeSeed<'de> for VectorSeed<'_> {
    type Value = VectorRead;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<VectorRead, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_an_array {
    ($($f:ident($t:ty)),*) => {$(
        fn $f<E: de::Error>(self, _: $t) -> Result<VectorRead, E> {
            Ok(VectorRead::NotArray)
        }
    )*};
}

impl<'de> Visitor<'de> for VectorSeed<'_> {
    type Value = VectorRead;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<VectorRead, A::Error> {
        let mut len = 0usize;
        let mut first_bad = None;
        while let Some(c) = seq.next_element_seed(ComponentSeed)? {
            match c {
                Some(x) => {
                    let f = x as f32;
                    if !f.is_finite() {
                        first_bad.get_or_insert(NOT_FINITE);
                    }
                    if len < self.dim {
                        self.out.push(f);
                    }
                }
                None => {
                    first_bad.get_or_insert(NOT_NUMBER);
                }
            }
            len += 1;
        }
        Ok(VectorRead::Array { len, first_bad })
    }
    fn visit_unit<E: de::Error>(self) -> Result<VectorRead, E> {
        Ok(VectorRead::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VectorRead, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(VectorRead::NotArray)
    }
    not_an_array!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String)
    );
}

/// One vector component: `Some(value)` for a JSON number, `None` for anything else.
struct ComponentSeed;

impl<'de> DeserializeSeed<'de> for ComponentSeed {
    type Value = Option<f64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_a_number {
    ($($f:ident($t:ty)),*) => {$(
        fn $f<E: de::Error>(self, _: $t) -> Result<Option<f64>, E> {
            Ok(None)
        }
    )*};
}

impl<'de> Visitor<'de> for ComponentSeed {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<f64>, E> {
        Ok(Some(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<f64>, E> {
        Ok(Some(v as f64))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<f64>, E> {
        Ok(Some(v as f64))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<f64>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<f64>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<f64>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    not_a_number!(
        visit_bool(bool),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String)
    );
}

#[cfg(test)]
mod tests {
    //! Pass 1 + pass 2 against an oracle: the `Value`-based conversion this module replaced,
    //! kept here verbatim in behaviour, over bodies that exercise every rule and error.
    use super::*;
    use crate::core::types::Metric;

    fn schema(auto_id: bool, dynamic: bool) -> Schema {
        Schema {
            name: "c".into(),
            dim: 3,
            metric: Metric::L2,
            auto_id,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic,
        }
    }

    fn alloc(n: usize) -> Vec<i64> {
        (1000..1000 + n as i64).collect()
    }

    /// The former conversion: the body as a `Value` tree, then row by row.
    fn oracle(body: &str, s: &Schema, upsert: bool) -> Result<RowBatch, ApiError> {
        let m = if body.trim().is_empty() {
            Map::new()
        } else {
            match serde_json::from_str::<Value>(body) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(ApiError::new(
                        code::BAD_JSON,
                        "request body must be a JSON object",
                    ));
                }
                Err(e) => {
                    return Err(ApiError::new(
                        code::BAD_JSON,
                        format!("malformed JSON body: {e}"),
                    ));
                }
            }
        };
        let rows: Vec<&Map<String, Value>> = match m.get("data") {
            None | Some(Value::Null) => return Err(ApiError::missing("data")),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_object()
                        .ok_or_else(|| ApiError::bad_row(i, "each row must be a JSON object"))
                })
                .collect::<Result<_, _>>()?,
            Some(Value::Object(o)) => vec![o],
            Some(_) => return Err(ApiError::invalid("data", "must be a list of row objects")),
        };
        if rows.is_empty() {
            return Err(ApiError::invalid("data", "must contain at least one row"));
        }
        let mut b = RowBatch::new(s.dim);
        let auto = s.auto_id && !upsert;
        let mut seen = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            if auto {
                if row.contains_key(&s.pk_field) {
                    return Err(ApiError::bad_row(
                        i,
                        format!("{} is generated (autoID); do not send it", s.pk_field),
                    ));
                }
            } else {
                let id = match row.get(&s.pk_field) {
                    None | Some(Value::Null) => {
                        return Err(ApiError::bad_row(
                            i,
                            format!("missing primary key {}", s.pk_field),
                        ));
                    }
                    Some(v) => super::super::rest::parse_id(v).ok_or_else(|| {
                        ApiError::bad_row(i, format!("{} must be an int64", s.pk_field))
                    })?,
                };
                if !seen.insert(id) {
                    return Err(ApiError::bad_row(
                        i,
                        format!("duplicate primary key {id} in one request"),
                    ));
                }
                b.ids.push(id);
            }
            match row.get(&s.vector_field) {
                None | Some(Value::Null) => {
                    return Err(ApiError::bad_row(
                        i,
                        format!("missing vector field {}", s.vector_field),
                    ));
                }
                Some(Value::Array(a)) if a.len() != s.dim => {
                    return Err(ApiError::bad_row(
                        i,
                        format!(
                            "vector has dimension {}, the collection has {}",
                            a.len(),
                            s.dim
                        ),
                    ));
                }
                Some(Value::Array(a)) => {
                    for x in a {
                        let f = x.as_f64().ok_or_else(|| ApiError::bad_row(i, NOT_NUMBER))? as f32;
                        if !f.is_finite() {
                            return Err(ApiError::bad_row(i, NOT_FINITE));
                        }
                        b.vectors.push(f);
                    }
                }
                Some(_) => {
                    return Err(ApiError::bad_row(i, "vector must be an array of numbers"));
                }
            }
            let mut dynf = Map::new();
            for (k, v) in row.iter() {
                if k == &s.pk_field || k == &s.vector_field {
                    continue;
                }
                if !s.dynamic {
                    return Err(ApiError::bad_row(
                        i,
                        format!("field {k:?} is not in the schema (dynamic fields are disabled)"),
                    ));
                }
                if let (true, Value::Object(inner)) = (k == "$meta", v) {
                    for (ik, iv) in inner {
                        dynf.insert(ik.clone(), iv.clone());
                    }
                    continue;
                }
                dynf.insert(k.clone(), v.clone());
            }
            b.fields.push(if dynf.is_empty() {
                Vec::new()
            } else {
                serde_json::to_vec(&Value::Object(dynf)).unwrap()
            });
        }
        if auto {
            b.ids = alloc(rows.len());
        }
        Ok(b)
    }

    struct Target(Schema);

    impl RowTarget for Target {
        fn schema(&self) -> &Schema {
            &self.0
        }
        fn alloc_ids(&self, n: usize) -> Vec<i64> {
            alloc(n)
        }
    }

    /// Both paths over `body` (any envelope is accepted): they must agree.
    fn typed(body: &str, s: &Schema, upsert: bool) -> Result<RowBatch, ApiError> {
        let mut lookup = |_: &Map<String, Value>| Ok::<_, ApiError>(Target(s.clone()));
        let two = TwoPass::parse(body.as_bytes()).and_then(|t| {
            let target = lookup(&t.envelope)?;
            t.to_batch(target.schema(), upsert, |n| target.alloc_ids(n))
        });
        if let Some(one) = one_pass(body.as_bytes(), upsert, &mut lookup) {
            assert_eq!(
                one.map(|(_, b)| b),
                two,
                "one pass and two passes differ on {body}"
            );
        }
        two
    }

    fn fields_value(f: &[u8]) -> Option<Value> {
        (!f.is_empty()).then(|| serde_json::from_slice(f).expect("stored fields are JSON"))
    }

    /// Same outcome both ways: same error (code and message; 1801 by code, the position
    /// wording may differ), or the same ids, vectors and dynamic fields.
    fn same(body: &str, s: &Schema, upsert: bool) -> Result<RowBatch, ApiError> {
        let (want, got) = (oracle(body, s, upsert), typed(body, s, upsert));
        match (&want, &got) {
            (Err(w), Err(g)) if w.code == code::BAD_JSON => assert_eq!(g.code, w.code, "{body}"),
            (Err(w), Err(g)) => assert_eq!(g, w, "{body}"),
            (Ok(w), Ok(g)) => {
                assert_eq!(g.ids, w.ids, "{body}");
                assert_eq!(g.vectors, w.vectors, "{body}");
                assert_eq!(g.dim, w.dim);
                let gf: Vec<_> = g.fields.iter().map(|f| fields_value(f)).collect();
                let wf: Vec<_> = w.fields.iter().map(|f| fields_value(f)).collect();
                assert_eq!(gf, wf, "{body}");
            }
            _ => panic!("{body}: oracle {want:?}, typed {got:?}"),
        }
        got
    }

    fn code_of(r: &Result<RowBatch, ApiError>) -> i32 {
        r.as_ref().map(|_| 0).unwrap_or_else(|e| e.code)
    }

    #[test]
    fn valid_rows_fill_one_contiguous_buffer_and_keep_dynamic_fields() {
        let s = schema(false, true);
        let b = same(
            r#"{"collectionName":"c","data":[
                {"id": 1, "vector": [1, 2.5, -3e-2], "color": "red", "n": 1.50},
                {"vector": [0,0,0], "id": "2", "tags": ["a", "b"], "meta": {"k": [1, {"x": null}]}},
                {"id": " 3 ", "vector": [4,5,6]}
            ]}"#,
            &s,
            false,
        )
        .unwrap();
        assert_eq!(b.ids, vec![1, 2, 3]);
        assert_eq!(
            b.vectors,
            vec![1.0, 2.5, -0.03, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0]
        );
        // Stored compactly, keys in order, raw values kept.
        assert_eq!(
            String::from_utf8(b.fields[1].clone()).unwrap(),
            r#"{"meta":{"k":[1,{"x":null}]},"tags":["a","b"]}"#
        );
        assert!(b.fields[2].is_empty());
        // A single row object works like a list of one.
        let one = same(r#"{"data":{"id":9,"vector":[1,2,3]}}"#, &s, false).unwrap();
        assert_eq!(one.ids, vec![9]);
    }

    #[test]
    fn every_data_and_row_error_matches_the_former_conversion() {
        let s = schema(false, true);
        let v = r#""vector":[1,2,3]"#;
        for (body, want) in [
            (String::from("{}"), code::MISSING_PARAMETER),
            (String::from(r#"{"data":null}"#), code::MISSING_PARAMETER),
            (String::from(r#"{"data":"x"}"#), code::INVALID_PARAMETER),
            (String::from(r#"{"data":5}"#), code::INVALID_PARAMETER),
            (String::from(r#"{"data":[]}"#), code::INVALID_PARAMETER),
            (String::from(r#"{"data":[ ]}"#), code::INVALID_PARAMETER),
            (
                format!(r#"{{"data":[{{"id":1,{v}}},5]}}"#),
                code::BAD_INSERT_ROW,
            ),
            // A bad row 0 and a non-object row 1: the non-object is reported, as before.
            (
                r#"{"data":[{"id":1,"vector":[1]},"x"]}"#.to_string(),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":1,{v}}},[1,2]]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":1,{v}}},null]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (format!(r#"{{"data":[{{{v}}}]}}"#), code::BAD_INSERT_ROW),
            (
                format!(r#"{{"data":[{{"id":null,{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":1.5,{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":true,{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":"x",{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":[1],{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":9223372036854775808,{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                format!(r#"{{"data":[{{"id":1,{v}}},{{"id":1,{v}}}]}}"#),
                code::BAD_INSERT_ROW,
            ),
            (String::from(r#"{"data":[{"id":1}]}"#), code::BAD_INSERT_ROW),
            (
                String::from(r#"{"data":[{"id":1,"vector":null}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":"abc"}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":{"a":1}}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,2]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,2,3,4]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            // Dimension is checked before the components' types.
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,"a"]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,"a",3]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,null,3]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,[2],3]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,{},3]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1e39,0,0]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[-1e300,0,0]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            // The first problem in order: non-number at index 1 before infinity at index 2.
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,true,1e39]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,1e39,true]}]}"#),
                code::BAD_INSERT_ROW,
            ),
            // Malformed or not an object: 1801.
            (String::from(r#"{"data":[1,2}"#), code::BAD_JSON),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,2,3]}]} x"#),
                code::BAD_JSON,
            ),
            (String::from(r#"[{"id":1}]"#), code::BAD_JSON),
            (String::from(r#""text""#), code::BAD_JSON),
            (String::from("nul"), code::BAD_JSON),
            (
                String::from(r#"{"data":[{"id":1,"vector":[1,2,3]}],"other":{"a":[1,}}"#),
                code::BAD_JSON,
            ),
            (
                String::from(
                    r#"{"collectionName":"c","data":[{"id":1,"vector":[1,2,3],"x":"\q"}]}"#,
                ),
                code::BAD_JSON,
            ),
        ] {
            let got = same(&body, &s, false);
            assert_eq!(code_of(&got), want, "{body}: {got:?}");
        }
    }

    #[test]
    fn bad_row_errors_name_the_row_and_the_reason() {
        let s = schema(false, true);
        let e = typed(
            r#"{"data":[{"id":1,"vector":[1,2,3]},{"id":2,"vector":[1,"NaN",3]}]}"#,
            &s,
            false,
        )
        .unwrap_err();
        assert_eq!(e.code, code::BAD_INSERT_ROW);
        assert_eq!(e.message, format!("invalid row 1: {NOT_NUMBER}"));
        let e = typed(r#"{"data":[{"id":7,"vector":[1,2]}]}"#, &s, false).unwrap_err();
        assert_eq!(
            e.message,
            "invalid row 0: vector has dimension 2, the collection has 3"
        );
    }

    #[test]
    fn auto_ids_upserts_and_disabled_dynamic_fields_follow_the_schema() {
        let auto = schema(true, true);
        let b = same(
            r#"{"data":[{"vector":[1,2,3]},{"vector":[4,5,6]}]}"#,
            &auto,
            false,
        )
        .unwrap();
        assert_eq!(b.ids, vec![1000, 1001]);
        let e = same(r#"{"data":[{"id":5,"vector":[1,2,3]}]}"#, &auto, false).unwrap_err();
        assert!(e.message.contains("autoID"), "{e:?}");
        // Even a null key counts as sent.
        same(r#"{"data":[{"id":null,"vector":[1,2,3]}]}"#, &auto, false).unwrap_err();
        // Upsert on an autoID collection must carry the keys.
        let b = same(r#"{"data":[{"id":5,"vector":[1,2,3]}]}"#, &auto, true).unwrap();
        assert_eq!(b.ids, vec![5]);
        same(r#"{"data":[{"vector":[1,2,3]}]}"#, &auto, true).unwrap_err();

        let fixed = schema(false, false);
        let e = same(
            r#"{"data":[{"id":1,"vector":[1,2,3],"zeta":1,"alpha":2}]}"#,
            &fixed,
            false,
        )
        .unwrap_err();
        assert!(
            e.message.contains(r#""alpha""#),
            "first in key order: {e:?}"
        );
        same(r#"{"data":[{"id":1,"vector":[1,2,3]}]}"#, &fixed, false).unwrap();
    }

    #[test]
    fn meta_merging_repeated_keys_and_escaped_keys_behave_as_a_parsed_map() {
        let s = schema(false, true);
        for body in [
            r#"{"data":[{"id":1,"vector":[1,2,3],"$meta":{"x":1,"color":"blue"},"color":"red"}]}"#,
            r#"{"data":[{"id":1,"vector":[1,2,3],"!first":0,"$meta":{"!first":1}}]}"#,
            r#"{"data":[{"id":1,"vector":[1,2,3],"$meta":5}]}"#,
            r#"{"data":[{"id":1,"vector":[1,2,3],"$meta":{"a":1,"a":2}}]}"#,
            r#"{"data":[{"id":1,"id":2,"vector":[9,9,9],"vector":[1,2,3],"k":1,"k":2}]}"#,
            r#"{"data":[{"id":1,"vector":[1,2,3,4,5],"vector":[1,2,3]}]}"#,
            r#"{"data":[{"id":1,"vector":[1,2,3]}],"data":[{"id":2,"vector":[4,5,6]}]}"#,
            r#"{"data":[{"i\u0064":1,"vec\u0074or":[1,2,3],"k\u00e9y":"\u00e9\n\"q\""}]}"#,
            "{\n  \"data\" : [ { \"id\" : 1 ,\n \"vector\" : [ 1 , 2 , 3 ] , \"s\" : \" a b \" } ]\n}",
        ] {
            same(body, &s, false).unwrap();
        }
        let b = typed(
            "{\"data\":[{\"id\":1,\"vector\":[1,2,3],\"s\":\" a [ b \\\" \",\"t\":[ 1, 2 ]}]}",
            &s,
            false,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(b.fields[0].clone()).unwrap(),
            "{\"s\":\" a [ b \\\" \",\"t\":[1,2]}",
            "whitespace inside strings is kept, between tokens dropped"
        );
    }

    /// Like the REST layer's lookup: dbName must be the default one, the collection must exist
    /// (only "c" does). Records every envelope it is asked about.
    fn lookup_c<'a>(
        s: &'a Schema,
        asked: &'a mut Vec<Map<String, Value>>,
    ) -> impl FnMut(&Map<String, Value>) -> Result<Target, ApiError> + 'a {
        move |env| {
            asked.push(env.clone());
            match env.get("dbName") {
                None => {}
                Some(v) if v == "default" => {}
                Some(_) => return Err(ApiError::invalid("dbName", "does not exist")),
            }
            match env.get("collectionName").and_then(Value::as_str) {
                None => Err(ApiError::missing("collectionName")),
                Some("c") => Ok(Target(s.clone())),
                Some(_) => Err(ApiError::new(code::COLLECTION_NOT_FOUND, "not found")),
            }
        }
    }

    #[test]
    fn the_usual_envelope_is_read_in_one_pass_and_any_other_in_two_with_the_same_rules() {
        let s = schema(false, true);
        let row = |id: i64| format!(r#"{{"id":{id},"vector":[1,2,3]}}"#);
        let run = |body: &str| {
            let mut asked = Vec::new();
            let r =
                parse_rows(body.as_bytes(), false, lookup_c(&s, &mut asked)).map(|(_, b)| b.ids);
            (r, asked.len())
        };
        // collectionName first: one pass, one lookup.
        let body = format!(r#"{{"collectionName":"c","data":[{}]}}"#, row(1));
        assert_eq!(run(&body), (Ok(vec![1]), 1));
        assert!(one_pass(body.as_bytes(), false, &mut lookup_c(&s, &mut Vec::new())).is_some());
        // data first: the first lookup (no name yet) is discarded, the second decides.
        let body = format!(r#"{{"data":[{}],"collectionName":"c"}}"#, row(2));
        assert_eq!(run(&body), (Ok(vec![2]), 2));
        // A dbName after data still counts.
        let body = format!(
            r#"{{"collectionName":"c","data":[{}],"dbName":"x"}}"#,
            row(3)
        );
        assert_eq!(run(&body).0.unwrap_err().code, code::INVALID_PARAMETER);
        // The last collectionName and the last data count, as in a parsed map.
        let body = format!(
            r#"{{"collectionName":"nope","data":[{}],"collectionName":"c","data":[{}]}}"#,
            row(4),
            row(5)
        );
        assert_eq!(run(&body).0, Ok(vec![5]));
        // The collection is checked before the rows, malformed JSON before both.
        let body = r#"{"collectionName":"nope","data":[{"id":1,"vector":[1]}]}"#;
        assert_eq!(run(body).0.unwrap_err().code, code::COLLECTION_NOT_FOUND);
        let body = r#"{"collectionName":"c","data":[{"id":1,"vector":[1]}], x}"#;
        assert_eq!(run(body).0.unwrap_err().code, code::BAD_JSON);
        let body = r#"{"collectionName":"nope","data":[{"id":1,"vector":[1]}], x}"#;
        assert_eq!(run(body).0.unwrap_err().code, code::BAD_JSON);
        // No data at all: the collection first, then 1802.
        assert_eq!(
            run(r#"{"collectionName":"c"}"#).0.unwrap_err().code,
            code::MISSING_PARAMETER
        );
        assert_eq!(
            run(r#"{"collectionName":"no"}"#).0.unwrap_err().code,
            code::COLLECTION_NOT_FOUND
        );
        assert_eq!(run("").0.unwrap_err().code, code::MISSING_PARAMETER);
        assert_eq!(run(" [1] ").0.unwrap_err().code, code::BAD_JSON);
    }

    #[test]
    fn envelope_keeps_only_what_the_request_helpers_read() {
        let p = TwoPass::parse(
            br#"{"dbName":"default","collectionName":"c","partitionName":"p","data":[]}"#,
        )
        .unwrap();
        assert_eq!(p.envelope.len(), 2);
        assert_eq!(p.envelope["collectionName"], "c");
        let empty = TwoPass::parse(b"  \n").unwrap();
        assert!(empty.envelope.is_empty());
        assert_eq!(
            empty
                .to_batch(&schema(false, true), false, alloc)
                .unwrap_err()
                .code,
            code::MISSING_PARAMETER
        );
    }

    struct Counting(Schema, std::rc::Rc<std::cell::Cell<usize>>);

    impl RowTarget for Counting {
        fn schema(&self) -> &Schema {
            &self.0
        }
        fn alloc_ids(&self, n: usize) -> Vec<i64> {
            self.1.set(self.1.get() + n);
            alloc(n)
        }
    }

    #[test]
    fn generated_ids_are_allocated_only_for_a_valid_batch() {
        let s = schema(true, true);
        let allocated = std::rc::Rc::new(std::cell::Cell::new(0));
        let target =
            |_: &Map<String, Value>| Ok::<_, ApiError>(Counting(s.clone(), allocated.clone()));
        let bad = r#"{"data":[{"vector":[1,2,3]},{"vector":[1,2]}]}"#;
        assert!(parse_rows(bad.as_bytes(), false, target).is_err());
        assert_eq!(allocated.get(), 0, "nothing allocated for a rejected batch");
        let good = r#"{"data":[{"vector":[1,2,3]},{"vector":[4,5,6]}]}"#;
        let (_, b) = parse_rows(good.as_bytes(), false, target).unwrap();
        assert_eq!(b.ids, vec![1000, 1001]);
        assert_eq!(allocated.get(), 2);
    }

    #[test]
    fn dynamic_fields_nested_past_the_parse_limit_are_refused_at_the_same_depth_as_before() {
        let s = schema(false, true);
        let nested = |d: usize| format!("{}1{}", "[".repeat(d), "]".repeat(d));
        let mut accepted = 0;
        for d in 120..130 {
            let body = format!(
                r#"{{"data":[{{"id":1,"vector":[1,2,3],"deep":{}}}]}}"#,
                nested(d)
            );
            let got = same(&body, &s, false);
            if let Ok(b) = &got {
                accepted = d;
                // What is stored can be read back.
                fields_value(&b.fields[0]);
            } else {
                assert_eq!(code_of(&got), code::BAD_JSON, "depth {d}");
            }
        }
        assert!(
            (120..129).contains(&accepted),
            "boundary inside the range: {accepted}"
        );
        // As a single row object (one level less), and in a row after a bad one.
        let body = format!(
            r#"{{"data":{{"id":1,"vector":[1,2,3],"deep":{}}}}}"#,
            nested(125)
        );
        same(&body, &s, false).unwrap();
        let body = format!(
            r#"{{"data":[{{"id":1,"vector":[1]}},{{"id":2,"vector":[1,2,3],"deep":{}}}]}}"#,
            nested(200)
        );
        assert_eq!(code_of(&same(&body, &s, false)), code::BAD_JSON);
        assert_eq!(json_depth(r#"{"a":"[[[","b":[{}]}"#), 3);
    }
}
