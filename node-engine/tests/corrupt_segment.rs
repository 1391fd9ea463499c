//! A segment whose files fail their checksums is detected when the server opens, reported
//! (describe, metrics) and never served, while the collection's healthy segments still are.
#![allow(clippy::unwrap_used)]

mod common;

use common::App;
use serde_json::json;

#[tokio::test]
async fn a_corrupted_segment_file_is_detected_on_load_reported_and_not_served() {
    let app = App::new(None).await;
    app.ok(
        "collections/create",
        json!({"collectionName": "c", "dimension": 4, "metricType": "L2"}),
    )
    .await;
    for part in 0..2i64 {
        let rows: Vec<_> = (part * 10..part * 10 + 10)
            .map(|i| json!({"id": i, "vector": [i as f32, 0.0, 0.0, 1.0]}))
            .collect();
        app.ok(
            "entities/insert",
            json!({"collectionName": "c", "data": rows}),
        )
        .await;
        app.ok("collections/flush", json!({"collectionName": "c"}))
            .await;
    }
    let app = app.reopen().await;
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "c"}))
            .await["rowCount"],
        20
    );
    // Flip one byte of the second segment's vector file.
    let segs = app
        .dir
        .path()
        .join("collections")
        .join("c1")
        .join("segments");
    let mut dirs: Vec<_> = std::fs::read_dir(&segs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let f = dirs[1].join("vectors.f32");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[17] ^= 0x01;
    std::fs::write(&f, bytes).unwrap();
    let app = app.reopen().await;
    let d = app
        .ok("collections/describe", json!({"collectionName": "c"}))
        .await;
    let bad = d["corruptSegments"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{d}");
    assert!(
        bad[0]["reason"].as_str().unwrap().contains("checksum"),
        "{d}"
    );
    // Only the healthy segment's rows are served.
    assert_eq!(
        app.ok("collections/get_stats", json!({"collectionName": "c"}))
            .await["rowCount"],
        10
    );
    assert_eq!(
        app.ok("entities/get", json!({"collectionName": "c", "id": [15]}))
            .await,
        json!([])
    );
    let r = app
        .ok(
            "entities/search",
            json!({"collectionName": "c", "data": [[15.0, 0.0, 0.0, 1.0]], "limit": 1}),
        )
        .await;
    assert_eq!(r[0]["id"], 9);
    let (_, text) = app.get_ops("/metrics").await;
    assert!(
        text.contains("shoal_collection_corrupt_segments{collection=\"c\"} 1"),
        "{text}"
    );
}
