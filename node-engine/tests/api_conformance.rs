//! REST conformance: every endpoint of the Milvus v2 subset, the envelope, every error code, and
//! that each rejected request leaves the data exactly as it was.
#![allow(clippy::unwrap_used)]

mod common;

use common::App;
use serde_json::{Value, json};

fn vecs(n: usize, dim: usize, seed: f32) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..dim)
                .map(|j| ((i * dim + j) as f32 * 0.37 + seed).sin())
                .collect()
        })
        .collect()
}

async fn setup(app: &App, name: &str, metric: &str) {
    app.ok(
        "collections/create",
        json!({"collectionName": name, "dimension": 4, "metricType": metric}),
    )
    .await;
    let rows: Vec<Value> = vecs(20, 4, 0.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"id": i, "vector": v, "tag": i % 3, "name": format!("row{i}"), "meta": {"k": i}}))
        .collect();
    let d = app
        .ok(
            "entities/insert",
            json!({"collectionName": name, "data": rows}),
        )
        .await;
    assert_eq!(d["insertCount"], 20);
}

/// Everything a client can observe about the data: collections and every row of each.
async fn snapshot(app: &App) -> Value {
    let names = app.ok("collections/list", json!({})).await;
    let mut all = serde_json::Map::new();
    for n in names.as_array().unwrap() {
        let n = n.as_str().unwrap();
        let rows = app
            .ok(
                "entities/query",
                json!({"collectionName": n, "filter": "", "outputFields": ["*"], "limit": 16384}),
            )
            .await;
        let desc = app
            .ok("collections/describe", json!({"collectionName": n}))
            .await;
        all.insert(
            n.to_string(),
            json!({"rows": rows, "indexes": desc["indexes"], "load": desc["load"]}),
        );
    }
    Value::Object(all)
}

async fn assert_rejected(app: &App, path: &str, body: &str, code: i64) -> Value {
    let before = snapshot(app).await;
    let (status, v) = app.raw(path, body, &[]).await;
    assert_eq!(status, 200, "{path} {body}");
    assert_eq!(v["code"], code, "{path} {body} -> {v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(snapshot(app).await, before, "{path} {body} changed data");
    v
}

#[tokio::test]
async fn collection_endpoints_create_describe_list_has_stats_load_release_flush_and_drop() {
    let app = App::new(None).await;
    setup(&app, "books", "L2").await;
    app.ok(
        "collections/create",
        json!({"collectionName": "quick", "dimension": 8}),
    )
    .await;
    let d = app
        .ok("collections/describe", json!({"collectionName": "quick"}))
        .await;
    assert_eq!(d["metricType"], "COSINE", "default metric is COSINE");
    assert_eq!(d["autoId"], false);
    assert_eq!(d["enableDynamicField"], true);
    assert_eq!(d["fields"][0]["name"], "id");
    assert_eq!(d["fields"][1]["params"][0]["value"], "8");
    assert_eq!(d["load"], "LoadStateLoaded");
    assert_eq!(d["indexes"][0]["metricType"], "COSINE");
    assert_eq!(
        app.ok("collections/list", json!({})).await,
        json!(["books", "quick"])
    );
    assert_eq!(
        app.ok("collections/has", json!({"collectionName": "books"}))
            .await["has"],
        true
    );
    assert_eq!(
        app.ok("collections/has", json!({"collectionName": "nope"}))
            .await["has"],
        false
    );
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "books"}))
            .await["rowCount"],
        20
    );
    app.ok("collections/release", json!({"collectionName": "books"}))
        .await;
    assert_eq!(
        app.ok(
            "collections/get_load_state",
            json!({"collectionName": "books"})
        )
        .await["loadState"],
        "LoadStateNotLoad"
    );
    let v = app
        .post(
            "entities/search",
            json!({"collectionName": "books", "data": [[0.0, 0.0, 0.0, 0.0]]}),
        )
        .await;
    assert_eq!(v["code"], 101, "searching a released collection: {v}");
    app.ok("collections/load", json!({"collectionName": "books"}))
        .await;
    assert_eq!(
        app.ok(
            "collections/get_load_state",
            json!({"collectionName": "books"})
        )
        .await["loadState"],
        "LoadStateLoaded"
    );
    app.ok("collections/flush", json!({"collectionName": "books"}))
        .await;
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "books"}))
            .await["rowCount"],
        20
    );
    app.ok("collections/drop", json!({"collectionName": "quick"}))
        .await;
    assert_eq!(
        app.ok("collections/list", json!({})).await,
        json!(["books"])
    );
    // Everything survives a restart.
    let app = app.reopen().await;
    assert_eq!(
        app.ok("collections/list", json!({})).await,
        json!(["books"])
    );
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "books"}))
            .await["rowCount"],
        20
    );
}

#[tokio::test]
async fn entity_endpoints_insert_get_query_search_upsert_delete() {
    let app = App::new(None).await;
    setup(&app, "c", "L2").await;
    let v = vecs(20, 4, 0.0);
    // get: all fields by default, exact vector back.
    let g = app
        .ok(
            "entities/get",
            json!({"collectionName": "c", "id": [3, 999]}),
        )
        .await;
    assert_eq!(g.as_array().unwrap().len(), 1);
    assert_eq!(g[0]["id"], 3);
    assert_eq!(g[0]["tag"], 0);
    assert_eq!(g[0]["name"], "row3");
    let back: Vec<f32> = serde_json::from_value(g[0]["vector"].clone()).unwrap();
    assert_eq!(back, v[3]);
    // query: filter, outputFields, limit, offset, count(*).
    let q = app.ok("entities/query", json!({"collectionName": "c", "filter": "tag == 1 and id < 10", "outputFields": ["name"]})).await;
    assert_eq!(
        q,
        json!([{"id": 1, "name": "row1"}, {"id": 4, "name": "row4"}, {"id": 7, "name": "row7"}])
    );
    let q = app
        .ok(
            "entities/query",
            json!({"collectionName": "c", "filter": "id >= 0", "limit": 2, "offset": 3}),
        )
        .await;
    assert_eq!(q, json!([{"id": 3}, {"id": 4}]));
    let q = app.ok("entities/query", json!({"collectionName": "c", "filter": "meta[\"k\"] > 15", "outputFields": ["count(*)"]})).await;
    assert_eq!(q, json!([{"count(*)": 4}]));
    // search: the exact row is the nearest with distance 0, multi-query topks, offset.
    let r = app.post("entities/search", json!({"collectionName": "c", "data": [v[5], v[6]], "limit": 3, "outputFields": ["tag"]})).await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["topks"], json!([3, 3]));
    assert_eq!(r["data"][0]["id"], 5);
    assert_eq!(r["data"][0]["distance"], 0.0);
    assert_eq!(r["data"][0]["tag"], 2);
    assert_eq!(r["data"][3]["id"], 6);
    let r2 = app
        .post(
            "entities/search",
            json!({"collectionName": "c", "data": [v[5]], "limit": 2, "offset": 1}),
        )
        .await;
    assert_eq!(r2["data"][0]["id"], r["data"][1]["id"]);
    let r3 = app
        .post(
            "entities/search",
            json!({"collectionName": "c", "data": [v[5]], "filter": "tag == 1", "limit": 100}),
        )
        .await;
    assert_eq!(r3["topks"], json!([7]));
    // upsert replaces; delete by filter removes.
    let u = app
        .ok(
            "entities/upsert",
            json!({"collectionName": "c", "data": [{"id": 5, "vector": v[0], "tag": 9}]}),
        )
        .await;
    assert_eq!(u, json!({"upsertCount": 1, "upsertIds": [5]}));
    let g = app
        .ok("entities/get", json!({"collectionName": "c", "id": 5}))
        .await;
    assert_eq!(g[0]["tag"], 9);
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "c"}))
            .await["rowCount"],
        20
    );
    let d = app
        .ok(
            "entities/delete",
            json!({"collectionName": "c", "filter": "tag == 9 or id in [0, 1]"}),
        )
        .await;
    assert_eq!(d["deleteCount"], 3);
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "c"}))
            .await["rowCount"],
        17
    );
    assert_eq!(
        app.ok(
            "entities/get",
            json!({"collectionName": "c", "id": [0, 1, 5]})
        )
        .await,
        json!([])
    );
    // After a flush and a restart the same holds.
    app.ok("collections/flush", json!({"collectionName": "c"}))
        .await;
    let app = app.reopen().await;
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "c"}))
            .await["rowCount"],
        17
    );
    let r = app
        .post(
            "entities/search",
            json!({"collectionName": "c", "data": [v[7]], "limit": 1}),
        )
        .await;
    assert_eq!(r["data"][0]["id"], 7);
}

#[tokio::test]
async fn auto_id_collections_generate_unique_ids_and_int64_header_switches_to_strings() {
    let app = App::new(None).await;
    app.ok(
        "collections/create",
        json!({"collectionName": "a", "dimension": 2, "autoID": true, "metricType": "IP"}),
    )
    .await;
    let d = app
        .ok(
            "entities/insert",
            json!({"collectionName": "a", "data": [{"vector": [1, 0]}, {"vector": [0, 1]}]}),
        )
        .await;
    let ids = d["insertIds"].as_array().unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0].is_i64() && ids[0] != ids[1]);
    let (_, v) = app
        .raw(
            "entities/insert",
            &json!({"collectionName": "a", "data": [{"vector": [1, 1]}]}).to_string(),
            &[("Accept-Type-Allow-Int64", "false")],
        )
        .await;
    assert!(v["data"]["insertIds"][0].is_string(), "{v}");
    let (_, v) = app
        .raw(
            "entities/query",
            &json!({"collectionName": "a", "filter": "", "limit": 1}).to_string(),
            &[("Accept-Type-Allow-Int64", "false")],
        )
        .await;
    assert!(v["data"][0]["id"].is_string(), "{v}");
    // Sending an id to an autoID collection is a bad row.
    let v = assert_rejected(
        &app,
        "entities/insert",
        &json!({"collectionName": "a", "data": [{"id": 1, "vector": [1, 1]}]}).to_string(),
        1804,
    )
    .await;
    assert!(v["message"].as_str().unwrap().contains("autoID"));
}

#[tokio::test]
async fn every_bad_request_gets_its_milvus_code_and_changes_nothing() {
    let app = App::new(None).await;
    setup(&app, "c", "COSINE").await;
    let v4 = "[0.1, 0.2, 0.3, 0.4]";
    // 1801 malformed JSON.
    assert_rejected(
        &app,
        "entities/insert",
        "{\"collectionName\": \"c\", \"data\": [",
        1801,
    )
    .await;
    assert_rejected(&app, "collections/create", "[1, 2]", 1801).await;
    // 1802 missing parameters.
    assert_rejected(&app, "collections/create", "{\"dimension\": 4}", 1802).await;
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"x\"}",
        1802,
    )
    .await;
    assert_rejected(&app, "entities/insert", "{\"collectionName\": \"c\"}", 1802).await;
    assert_rejected(&app, "entities/search", "{\"collectionName\": \"c\"}", 1802).await;
    assert_rejected(&app, "entities/get", "{\"collectionName\": \"c\"}", 1802).await;
    assert_rejected(&app, "entities/delete", "{\"collectionName\": \"c\"}", 1802).await;
    assert_rejected(&app, "collections/describe", "{}", 1802).await;
    // 1804 bad rows: wrong dimension, NaN/Inf (outside f32), not a number, missing vector/id;
    // a bad row anywhere rejects the whole batch.
    let good = format!("{{\"id\": 100, \"vector\": {v4}}}");
    for bad in [
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3]}".to_string(),
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3, 1e39]}".to_string(),
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3, -1e300]}".to_string(),
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3, \"NaN\"]}".to_string(),
        "{\"id\": 101}".to_string(),
        format!("{{\"vector\": {v4}}}"),
        format!("{{\"id\": \"x\", \"vector\": {v4}}}"),
        format!("{{\"id\": 100, \"vector\": {v4}}}"),
    ] {
        let body = format!("{{\"collectionName\": \"c\", \"data\": [{good}, {bad}]}}");
        let v = assert_rejected(&app, "entities/insert", &body, 1804).await;
        assert!(v["message"].as_str().unwrap().contains("row 1"), "{v}");
        assert_rejected(&app, "entities/upsert", &body, 1804).await;
    }
    // NaN as a JSON literal is not JSON at all.
    assert_rejected(
        &app,
        "entities/insert",
        "{\"collectionName\": \"c\", \"data\": [{\"id\": 5, \"vector\": [NaN, 0, 0, 0]}]}",
        1801,
    )
    .await;
    // 100 unknown collection, on every endpoint that names one.
    for ep in [
        "collections/describe",
        "collections/drop",
        "collections/get_stats",
        "collections/load",
        "collections/release",
        "collections/get_load_state",
        "collections/flush",
        "entities/insert",
        "entities/upsert",
        "entities/delete",
        "entities/get",
        "entities/query",
        "entities/search",
        "indexes/list",
        "indexes/describe",
        "indexes/create",
        "indexes/drop",
    ] {
        let body = format!(
            "{{\"collectionName\": \"nope\", \"data\": [{good}], \"id\": 1, \"filter\": \"id > 0\", \"indexName\": \"vector\"}}"
        );
        assert_rejected(&app, ep, &body, 100).await;
    }
    // 1100 invalid parameters: duplicate create, bad metric, dimension out of range, bad names.
    let v = assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"c\", \"dimension\": 4}",
        1100,
    )
    .await;
    assert!(
        v["message"].as_str().unwrap().contains("already exists"),
        "{v}"
    );
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"d\", \"dimension\": 4, \"metricType\": \"HAMMING\"}",
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"d\", \"dimension\": 0}",
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"d\", \"dimension\": 40000}",
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"1bad\", \"dimension\": 4}",
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "collections/create",
        "{\"collectionName\": \"d\", \"dimension\": 4, \"idType\": \"VarChar\"}",
        1100,
    )
    .await;
    // limit / offset out of range.
    for (limit, offset) in [(0, 0), (16385, 0), (-1, 0), (10, -1), (16000, 1000)] {
        let body = format!(
            "{{\"collectionName\": \"c\", \"data\": [{v4}], \"limit\": {limit}, \"offset\": {offset}}}"
        );
        let v = assert_rejected(&app, "entities/search", &body, 1100).await;
        assert!(
            v["message"].as_str().unwrap().contains("limit")
                || v["message"].as_str().unwrap().contains("offset")
        );
        let body = format!(
            "{{\"collectionName\": \"c\", \"filter\": \"id > 0\", \"limit\": {limit}, \"offset\": {offset}}}"
        );
        assert_rejected(&app, "entities/query", &body, 1100).await;
    }
    // wrong query dimension.
    assert_rejected(
        &app,
        "entities/search",
        "{\"collectionName\": \"c\", \"data\": [[0.1, 0.2]]}",
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "entities/search",
        "{\"collectionName\": \"c\", \"data\": [[0.1, 0.2, 0.3, 1e39]]}",
        1100,
    )
    .await;
    // bad filters say where.
    for f in [
        "id >",
        "tag === 1",
        "(tag == 1",
        "tag in [1, 2",
        "name like 5",
    ] {
        let body = json!({"collectionName": "c", "filter": f}).to_string();
        let v = assert_rejected(&app, "entities/delete", &body, 1100).await;
        assert!(
            v["message"].as_str().unwrap().contains("column"),
            "{f}: {v}"
        );
        let body =
            json!({"collectionName": "c", "filter": f, "data": [[0.1, 0.2, 0.3, 0.4]]}).to_string();
        assert_rejected(&app, "entities/search", &body, 1100).await;
        let body = json!({"collectionName": "c", "filter": f}).to_string();
        assert_rejected(&app, "entities/query", &body, 1100).await;
    }
    // Unknown endpoint and wrong types.
    assert_rejected(
        &app,
        "entities/search",
        "{\"collectionName\": 5, \"data\": [[0,0,0,0]]}",
        1100,
    )
    .await;
    assert_rejected(&app, "entities/search", "{\"collectionName\": \"c\", \"data\": [[0.1,0.2,0.3,0.4]], \"searchParams\": {\"metricType\": \"L2\"}}", 1100).await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_gets_401_and_code_1800_when_auth_is_on() {
    let app = App::new(Some("root:secret")).await;
    let body = json!({"collectionName": "c", "dimension": 2}).to_string();
    for h in [
        vec![],
        vec![("Authorization", "Bearer root:wrong")],
        vec![("Authorization", "root:secret")],
    ] {
        let (status, v) = app.raw("collections/create", &body, &h).await;
        assert_eq!(status, 401);
        assert_eq!(v["code"], 1800);
    }
    let ok = [("Authorization", "Bearer root:secret")];
    let (_, v) = app.raw("collections/list", "{}", &ok).await;
    assert_eq!(
        v,
        json!({"code": 0, "data": []}),
        "the rejected create changed nothing"
    );
    let (status, v) = app.raw("collections/create", &body, &ok).await;
    assert_eq!((status.as_u16(), v["code"].as_i64()), (200, Some(0)));
}

#[tokio::test]
async fn index_endpoints_create_describe_list_and_drop() {
    let app = App::new(None).await;
    setup(&app, "c", "L2").await;
    assert_eq!(
        app.ok("indexes/list", json!({"collectionName": "c"})).await,
        json!(["vector"])
    );
    let d = app
        .ok(
            "indexes/describe",
            json!({"collectionName": "c", "indexName": "vector"}),
        )
        .await;
    assert_eq!(d[0]["indexType"], "FLAT");
    assert_eq!(d[0]["totalRows"], 20);
    assert_eq!(d[0]["indexedRows"], 20);
    app.ok(
        "indexes/drop",
        json!({"collectionName": "c", "indexName": "vector"}),
    )
    .await;
    assert_eq!(
        app.ok("indexes/list", json!({"collectionName": "c"})).await,
        json!([])
    );
    app.ok(
        "indexes/create",
        json!({"collectionName": "c", "indexParams": [{"fieldName": "vector", "indexName": "flat_idx", "metricType": "L2", "indexType": "FLAT"}]}),
    )
    .await;
    assert_eq!(
        app.ok("indexes/list", json!({"collectionName": "c"})).await,
        json!(["flat_idx"])
    );
    // Bad definitions: 1100 naming the parameter, 1802 when missing; nothing changes.
    for (p, code) in [
        (json!([{"fieldName": "nope", "indexType": "FLAT"}]), 1100),
        (
            json!([{"fieldName": "vector", "indexType": "FLAT", "metricType": "IP"}]),
            1100,
        ),
        (json!([{"fieldName": "vector", "indexType": "BOGUS"}]), 1100),
        (
            json!([{"fieldName": "vector", "indexName": "other", "indexType": "FLAT"}]),
            1100,
        ),
        (json!([{"indexType": "FLAT"}]), 1802),
        (json!([]), 1100),
    ] {
        let body = json!({"collectionName": "c", "indexParams": p}).to_string();
        assert_rejected(&app, "indexes/create", &body, code).await;
    }
    assert_rejected(
        &app,
        "indexes/create",
        &json!({"collectionName": "c"}).to_string(),
        1802,
    )
    .await;
    assert_rejected(
        &app,
        "indexes/describe",
        &json!({"collectionName": "c", "indexName": "zzz"}).to_string(),
        1100,
    )
    .await;
    assert_rejected(
        &app,
        "indexes/drop",
        &json!({"collectionName": "c", "indexName": "zzz"}).to_string(),
        1100,
    )
    .await;
}

#[tokio::test]
async fn health_ready_and_metrics_endpoints_report_requests_rows_and_segments() {
    let app = App::new(None).await;
    setup(&app, "m", "IP").await;
    app.ok("collections/flush", json!({"collectionName": "m"}))
        .await;
    assert_eq!(app.get_ops("/healthz").await.0, 200);
    assert_eq!(app.get_ops("/readyz").await.0, 200);
    let (status, text) = app.get_ops("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("shoal_rest_requests_total{endpoint=\"entities/insert\",result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shoal_collection_rows{collection=\"m\"} 20"),
        "{text}"
    );
    assert!(
        text.contains("shoal_collection_segments{collection=\"m\"} 1"),
        "{text}"
    );
    assert!(text.contains("shoal_rest_request_seconds_bucket"), "{text}");
}

#[tokio::test]
async fn a_ten_thousand_row_insert_is_accepted_and_an_oversized_body_gets_1100() {
    let app = App::new(None).await;
    app.ok(
        "collections/create",
        json!({"collectionName": "big", "dimension": 128, "metricType": "L2"}),
    )
    .await;
    // ~7 MiB of JSON: more than axum's 2 MiB default, well inside our limit.
    let rows: Vec<Value> = vecs(10_000, 128, 0.5)
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"id": i, "vector": v}))
        .collect();
    let body = json!({"collectionName": "big", "data": rows}).to_string();
    assert!(body.len() > 2 << 20, "the body must exceed 2 MiB");
    let (_, v) = app.raw("entities/insert", &body, &[]).await;
    assert_eq!(v["code"], 0, "{}", v["message"]);
    assert_eq!(v["data"]["insertCount"], 10_000);
    let limit = shoal_engine::api::rest::MAX_BODY_BYTES;
    let huge = format!(
        "{{\"collectionName\": \"big\", \"data\": [], \"pad\": \"{}\"}}",
        "x".repeat(limit)
    );
    let v = assert_rejected(&app, "entities/insert", &huge, 1100).await;
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("MiB")),
        "{v}"
    );
}

#[tokio::test]
async fn metrics_and_readyz_report_gpu_telemetry_and_cpu_mode_without_crashing() {
    // Standalone with default GPU flags: NVML discovery runs for real. Where no NVML library is
    // installed (CI, this project's build machines) that is the no-NVML path: 0 GPUs, CPU mode,
    // a reason. On a GPU machine the same assertions hold with its GPU count.
    let app = App::new(None).await;
    let (status, ready) = app.get_ops("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("/readyz is JSON");
    assert_eq!(ready["status"], "ready");
    let gpu = &ready["gpu"];
    assert_eq!(
        gpu["mode"], "cpu",
        "standalone searches on the CPU: {ready}"
    );
    let reasons = gpu["reasons"].as_array().expect("reasons for CPU mode");
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("standalone"))),
        "{ready}"
    );
    let devices = gpu["devices"].as_array().expect("devices list").len();
    if devices == 0 {
        assert!(
            reasons
                .iter()
                .any(|r| r.as_str().is_some_and(|r| r.contains("NVML"))),
            "no GPU must say why: {ready}"
        );
    }
    let (status, text) = app.get_ops("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(&format!("shoal_gpu_devices {devices}\n")),
        "{text}"
    );
    assert_eq!(
        text.matches("shoal_gpu_device_info{").count(),
        devices,
        "{text}"
    );
    assert_eq!(
        text.matches("shoal_gpu_memory_total_bytes{").count(),
        devices,
        "one memory series per GPU, none without: {text}"
    );
    assert_eq!(text.matches("# EOF").count(), 1, "one exposition: {text}");
}
