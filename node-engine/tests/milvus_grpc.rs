//! The Milvus gRPC API on the REST port: a tonic client against the standalone role served on a
//! loopback port (bad input gives the Milvus error and changes nothing; unsupported RPCs answer
//! a Milvus status; the token is checked), and the real pymilvus and Node SDK clients running the
//! Milvus documentation's quickstart (`e2e/milvus/pymilvus_quickstart.py`, `node_quickstart.js`)
//! against a `shoal-engine` process.
#![allow(clippy::unwrap_used)]

mod common;

use common::engine::Engine;
use prost::Message as _;
use shoal_engine::api::milvus::pb::common::{
    KeyValuePair, PlaceholderGroup, PlaceholderType, PlaceholderValue, Status,
};
use shoal_engine::api::milvus::pb::milvus::milvus_service_client::MilvusServiceClient;
use shoal_engine::api::milvus::pb::milvus::*;
use shoal_engine::api::milvus::pb::schema::{
    CollectionSchema, DataType, FieldData, FieldSchema, FloatArray, LongArray, ScalarField,
    VectorField, field_data, scalar_field, vector_field,
};
use std::time::Duration;
use tonic::transport::Channel;

type Client = MilvusServiceClient<Channel>;

/// The standalone role's REST+gRPC router served on a free loopback port.
struct Server {
    _app: common::App,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(token: Option<&str>) -> Server {
    let app = common::App::new(token).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app.rest.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Server {
        _app: app,
        url,
        task,
    }
}

async fn client(s: &Server) -> Client {
    let ch = Channel::from_shared(s.url.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    MilvusServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(512 << 20)
}

fn kv(k: &str, v: &str) -> KeyValuePair {
    KeyValuePair {
        key: k.into(),
        value: v.into(),
    }
}

fn ok(s: Option<Status>) {
    let s = s.expect("a status");
    assert_eq!((s.code, s.error_code), (0, 0), "{}", s.reason);
}

fn schema(name: &str, dim: usize) -> Vec<u8> {
    CollectionSchema {
        name: name.into(),
        fields: vec![
            FieldSchema {
                name: "id".into(),
                is_primary_key: true,
                data_type: DataType::Int64 as i32,
                ..Default::default()
            },
            FieldSchema {
                name: "vector".into(),
                data_type: DataType::FloatVector as i32,
                type_params: vec![kv("dim", &dim.to_string())],
                ..Default::default()
            },
        ],
        enable_dynamic_field: true,
        ..Default::default()
    }
    .encode_to_vec()
}

fn pk_column(ids: Vec<i64>) -> FieldData {
    FieldData {
        r#type: DataType::Int64 as i32,
        field_name: "id".into(),
        field: Some(field_data::Field::Scalars(ScalarField {
            data: Some(scalar_field::Data::LongData(LongArray { data: ids })),
        })),
        ..Default::default()
    }
}

fn vector_column(dim: usize, data: Vec<f32>) -> FieldData {
    FieldData {
        r#type: DataType::FloatVector as i32,
        field_name: "vector".into(),
        field: Some(field_data::Field::Vectors(VectorField {
            dim: dim as i64,
            data: Some(vector_field::Data::FloatVector(FloatArray { data })),
        })),
        ..Default::default()
    }
}

fn placeholder(vectors: &[Vec<f32>]) -> Vec<u8> {
    PlaceholderGroup {
        placeholders: vec![PlaceholderValue {
            tag: "$0".into(),
            r#type: PlaceholderType::FloatVector as i32,
            values: vectors
                .iter()
                .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                .collect(),
        }],
    }
    .encode_to_vec()
}

async fn create(c: &mut Client, name: &str, dim: usize) {
    let s = c
        .create_collection(CreateCollectionRequest {
            collection_name: name.into(),
            schema: schema(name, dim),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ok(Some(s));
    let s = c
        .load_collection(LoadCollectionRequest {
            collection_name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ok(Some(s));
}

async fn insert(c: &mut Client, name: &str, cols: Vec<FieldData>) -> MutationResult {
    c.insert(InsertRequest {
        collection_name: name.into(),
        fields_data: cols,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn rows(c: &mut Client, name: &str) -> i64 {
    let r = c
        .query(QueryRequest {
            collection_name: name.into(),
            output_fields: vec!["count(*)".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ok(r.status);
    match &r.fields_data[0].field {
        Some(field_data::Field::Scalars(ScalarField {
            data: Some(scalar_field::Data::LongData(a)),
        })) => a.data[0],
        other => panic!("count column {other:?}"),
    }
}

#[tokio::test]
async fn insert_search_query_delete_round_trip_over_grpc_on_the_rest_port() {
    let srv = serve(None).await;
    let mut c = client(&srv).await;
    let v = c
        .get_version(GetVersionRequest {})
        .await
        .unwrap()
        .into_inner();
    ok(v.status);
    assert!(v.version.starts_with("v2."), "{}", v.version);
    create(&mut c, "c", 2).await;
    let r = insert(
        &mut c,
        "c",
        vec![
            pk_column(vec![1, 2, 3]),
            vector_column(2, vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7]),
        ],
    )
    .await;
    ok(r.status);
    assert_eq!(r.insert_cnt, 3);
    let r = c
        .search(SearchRequest {
            collection_name: "c".into(),
            placeholder_group: placeholder(&[vec![1.0, 0.1]]),
            dsl_type: 1,
            search_params: vec![kv("topk", "2"), kv("metric_type", "COSINE")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ok(r.status);
    let res = r.results.unwrap();
    let ids = match res.ids.unwrap().id_field.unwrap() {
        shoal_engine::api::milvus::pb::schema::i_ds::IdField::IntId(a) => a.data,
        other => panic!("{other:?}"),
    };
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(res.topks, vec![2]);
    assert!(res.scores[0] > res.scores[1]);
    let r = c
        .delete(DeleteRequest {
            collection_name: "c".into(),
            expr: "id in [1]".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ok(r.status);
    assert_eq!(r.delete_cnt, 1);
    assert_eq!(rows(&mut c, "c").await, 2);
    // REST still answers on the same port.
    let body: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v2/vectordb/collections/list", srv.url))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"], serde_json::json!(["c"]));
}

#[tokio::test]
async fn bad_input_gets_a_milvus_error_and_changes_nothing() {
    let srv = serve(None).await;
    let mut c = client(&srv).await;
    create(&mut c, "c", 4).await;
    let r = insert(
        &mut c,
        "c",
        vec![pk_column(vec![1]), vector_column(4, vec![0.1; 4])],
    )
    .await;
    ok(r.status);

    // Wrong dimension.
    let r = insert(
        &mut c,
        "c",
        vec![pk_column(vec![2]), vector_column(3, vec![0.1; 3])],
    )
    .await;
    let s = r.status.unwrap();
    assert_eq!(s.code, 1100, "{}", s.reason);
    assert!(s.reason.contains("dim"), "{}", s.reason);

    // Missing primary key.
    let r = insert(&mut c, "c", vec![vector_column(4, vec![0.1; 4])]).await;
    let s = r.status.unwrap();
    assert_eq!(s.code, 1100);
    assert!(s.reason.contains("primary key"), "{}", s.reason);

    // Unknown collection.
    let r = insert(
        &mut c,
        "nope",
        vec![pk_column(vec![2]), vector_column(4, vec![0.1; 4])],
    )
    .await;
    let s = r.status.unwrap();
    assert_eq!(s.code, 100, "{}", s.reason);
    assert_eq!(s.error_code, 4);

    // Malformed placeholder groups: garbage bytes, and a vector of the wrong dimension.
    for (pg, needle) in [
        (b"\x0a\xff\xff".to_vec(), "malformed placeholder group"),
        (placeholder(&[vec![1.0, 2.0]]), "dimension"),
    ] {
        let r = c
            .search(SearchRequest {
                collection_name: "c".into(),
                placeholder_group: pg,
                search_params: vec![kv("topk", "1")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let s = r.status.unwrap();
        assert_eq!(s.code, 1100);
        assert!(s.reason.contains(needle), "{}", s.reason);
    }

    // Oversized message: refused by the transport before anything is written.
    let big = 300usize << 20;
    let n = big / (4 * 4);
    let err = c
        .insert(InsertRequest {
            collection_name: "c".into(),
            fields_data: vec![
                pk_column((10..10 + n as i64).collect()),
                vector_column(4, vec![0.5; n * 4]),
            ],
            ..Default::default()
        })
        .await
        .expect_err("an oversized message is refused");
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );

    assert_eq!(
        rows(&mut c, "c").await,
        1,
        "no bad request changed anything"
    );
}

#[tokio::test]
async fn unsupported_rpcs_answer_a_milvus_status_not_unimplemented() {
    let srv = serve(None).await;
    let ch = Channel::from_shared(srv.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // CreateAlias answers a bare Status; ListUsers... a response with the status as field 1.
    for (path, bare) in [
        ("/milvus.proto.milvus.MilvusService/CreateAlias", true),
        ("/milvus.proto.milvus.MilvusService/SelectUser", false),
    ] {
        let mut g = tonic::client::Grpc::new(ch.clone());
        g.ready().await.unwrap();
        let status = if bare {
            let codec = tonic_prost::ProstCodec::<(), Status>::default();
            g.unary(tonic::Request::new(()), path.parse().unwrap(), codec)
                .await
                .unwrap()
                .into_inner()
        } else {
            let codec = tonic_prost::ProstCodec::<(), BoolResponse>::default();
            g.unary(tonic::Request::new(()), path.parse().unwrap(), codec)
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
        };
        assert_eq!(status.code, shoal_engine::api::milvus::NOT_SUPPORTED_CODE);
        assert!(
            status.reason.contains("not supported by Shoal"),
            "{}",
            status.reason
        );
    }
}

#[tokio::test]
async fn the_rest_token_is_required_in_the_authorization_metadata() {
    use base64::Engine as _;
    let srv = serve(Some("root:Milvus")).await;
    let mut c = client(&srv).await;
    let err = c
        .show_collections(ShowCollectionsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(ShowCollectionsRequest::default());
    let b64 = base64::engine::general_purpose::STANDARD.encode("root:Milvus");
    req.metadata_mut()
        .insert("authorization", b64.parse().unwrap());
    let r = c.show_collections(req).await.unwrap().into_inner();
    ok(r.status);
}

/// A standalone `shoal-engine` process with token `root:Milvus` on a free loopback port.
async fn standalone_process(dir: &std::path::Path) -> (Engine, u16) {
    let port = shoal_testkit::free_port().unwrap();
    let mut e = Engine::spawn_logged(
        "standalone",
        "standalone",
        &[
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--auth-token".into(),
            "root:Milvus".into(),
        ],
        dir,
    );
    e.ready(Duration::from_secs(60)).await;
    (e, port)
}

/// Runs `program args` (bounded); fails with its output and the engine's log unless it passes.
async fn run_client(program: &str, args: &[String], e: &Engine) {
    let out = tokio::process::Command::new(program).args(args).output();
    let out = tokio::time::timeout(Duration::from_secs(180), out)
        .await
        .expect("the client finishes within 3 minutes")
        .unwrap_or_else(|err| panic!("{program} runs: {err}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        e.log_tail()
    );
}

/// The Milvus quickstart through pymilvus (pinned by `make deps`), checked against an oracle.
#[tokio::test]
async fn pymilvus_runs_the_milvus_quickstart_against_standalone() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import pymilvus; print(pymilvus.__version__)"])
        .output()
        .expect("python3 runs");
    assert!(
        probe.status.success(),
        "pymilvus is not installed: run `make deps` ({})",
        String::from_utf8_lossy(&probe.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let (e, port) = standalone_process(dir.path()).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/milvus/pymilvus_quickstart.py"
    );
    run_client(
        "python3",
        &[
            script.into(),
            format!("http://127.0.0.1:{port}"),
            "--token".into(),
            "root:Milvus".into(),
        ],
        &e,
    )
    .await;
}

/// The same quickstart through the Node SDK's gRPC client (`e2e/milvus/package.json`).
#[tokio::test]
async fn node_sdk_runs_the_milvus_quickstart_against_standalone() {
    let sdk = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/milvus/node_modules/@zilliz/milvus2-sdk-node/package.json"
    );
    assert!(
        std::path::Path::new(sdk).exists(),
        "the Milvus Node SDK is not installed: run `make deps`"
    );
    let dir = tempfile::tempdir().unwrap();
    let (e, port) = standalone_process(dir.path()).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/milvus/node_quickstart.js"
    );
    run_client(
        "node",
        &[
            script.into(),
            format!("127.0.0.1:{port}"),
            "root:Milvus".into(),
        ],
        &e,
    )
    .await;
}
