//! The Milvus gRPC API (`milvus.proto.milvus.MilvusService`, what pymilvus and the Node, Java and
//! Go SDKs speak) on the same listener as REST, as Milvus 2.3+ serves it: [`with_grpc`] sends
//! requests whose `content-type` is `application/grpc` to tonic and everything else to the REST
//! router.
//!
//! Owns: the generated messages ([`pb`], from Shoal's own `proto/milvus/*.proto` written to
//! Milvus's wire format), token auth from the `authorization` metadata, the answer to RPCs Shoal
//! does not serve (a Milvus status saying so, never gRPC `UNIMPLEMENTED`), and the adapter
//! ([`service::MilvusApi`]) that validates each request in full and maps it onto the same
//! [`Backend`] the REST API uses, so the standalone role and the router answer alike.
//! Must not depend on a role; the core is reached only through the backend trait and the
//! core's value types.

mod convert;
pub mod service;
mod status;

use super::backend::Backend;
use super::rest::{MAX_BODY_BYTES, RestState};
use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceExt;

pub use service::MilvusApi;
pub use status::{NOT_SUPPORTED_CODE, status_of};

/// Messages and stubs generated from `proto/milvus/*.proto` at build time.
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
pub mod pb {
    pub mod common {
        tonic::include_proto!("milvus.proto.common");
    }
    pub mod schema {
        tonic::include_proto!("milvus.proto.schema");
    }
    pub mod milvus {
        tonic::include_proto!("milvus.proto.milvus");
    }
}

/// The gRPC path prefix of the Milvus service.
pub const SERVICE_PREFIX: &str = "/milvus.proto.milvus.MilvusService/";

/// The RPCs [`service::MilvusApi`] implements (the `rpc`s of `proto/milvus/milvus.proto`; a
/// test keeps the two in step). Every other method of the service gets [`unsupported`].
pub const SERVED: &[&str] = &[
    "CreateCollection",
    "DropCollection",
    "HasCollection",
    "LoadCollection",
    "ReleaseCollection",
    "DescribeCollection",
    "GetCollectionStatistics",
    "ShowCollections",
    "HasPartition",
    "LoadPartitions",
    "ReleasePartitions",
    "GetPartitionStatistics",
    "ShowPartitions",
    "GetLoadingProgress",
    "GetLoadState",
    "DescribeAlias",
    "ListAliases",
    "CreateIndex",
    "DescribeIndex",
    "GetIndexState",
    "GetIndexBuildProgress",
    "DropIndex",
    "Insert",
    "Delete",
    "Upsert",
    "Search",
    "Flush",
    "GetFlushState",
    "Query",
    "GetVersion",
    "CheckHealth",
    "Connect",
    "ListDatabases",
    "AllocTimestamp",
];

/// Milvus RPCs whose response is a bare `common.Status` (every other Milvus response carries
/// its status as field 1). From Milvus's `milvus.proto`; used only to shape the "not supported"
/// answer so the SDK decodes it as a failure.
const BARE_STATUS: &[&str] = &[
    "CreateCollection",
    "DropCollection",
    "LoadCollection",
    "ReleaseCollection",
    "AlterCollection",
    "AlterCollectionField",
    "AddCollectionFunction",
    "AlterCollectionFunction",
    "DropCollectionFunction",
    "CreatePartition",
    "DropPartition",
    "LoadPartitions",
    "ReleasePartitions",
    "CreateAlias",
    "DropAlias",
    "AlterAlias",
    "CreateIndex",
    "AlterIndex",
    "DropIndex",
    "AddCollectionField",
    "AddCollectionStructField",
    "LoadBalance",
    "CreateCredential",
    "UpdateCredential",
    "DeleteCredential",
    "CreateRole",
    "AlterRole",
    "DropRole",
    "OperateUserRole",
    "OperatePrivilege",
    "OperatePrivilegeV2",
    "CreateResourceGroup",
    "DropResourceGroup",
    "UpdateResourceGroups",
    "TransferNode",
    "TransferReplica",
    "RenameCollection",
    "CreateDatabase",
    "DropDatabase",
    "AlterDatabase",
    "RestoreRBAC",
    "CreatePrivilegeGroup",
    "DropPrivilegeGroup",
    "OperatePrivilegeGroup",
    "AddFileResource",
    "RemoveFileResource",
    "AddUserTags",
    "DeleteUserTags",
    "CreateRowPolicy",
    "DropRowPolicy",
    "UpdateRowPolicy",
    "SetRLSPrincipalTags",
    "DeleteRLSPrincipalTags",
    "UpdateReplicateConfiguration",
    "CreateSnapshot",
    "DropSnapshot",
    "UnpinSnapshotData",
    "BatchUpdateManifest",
];

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Whether the `authorization` metadata carries `token`: pymilvus sends
/// `base64("user:password")` (or base64 of its `token` argument); a plain `user:password` or
/// `Bearer user:password` is accepted too (other SDKs and hand-written clients).
pub fn authorized(token: Option<&str>, metadata: Option<&str>) -> bool {
    use base64::Engine as _;
    let Some(token) = token else {
        return true;
    };
    let Some(got) = metadata.map(str::trim) else {
        return false;
    };
    let got = got.strip_prefix("Bearer ").unwrap_or(got);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(got)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    [Some(got), decoded.as_deref()]
        .into_iter()
        .flatten()
        .any(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One router for REST and the Milvus gRPC API over the same state: `application/grpc`
/// requests go to the Milvus service (after the token check), the rest to `rest`.
pub fn with_grpc<B: Backend>(rest: Router, state: Arc<RestState<B>>) -> Router {
    let token: Option<Arc<str>> = state.auth_token.as_deref().map(Arc::from);
    let grpc = pb::milvus::milvus_service_server::MilvusServiceServer::new(MilvusApi::new(state))
        .max_decoding_message_size(MAX_BODY_BYTES)
        .max_encoding_message_size(MAX_BODY_BYTES);
    Router::new().fallback_service(tower::service_fn(move |req: Request| {
        let rest = rest.clone();
        let grpc = grpc.clone();
        let token = token.clone();
        async move {
            if !is_grpc(&req) {
                return rest.oneshot(req).await;
            }
            let auth = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !authorized(token.as_deref(), auth) {
                return Ok::<_, Infallible>(
                    tonic::Status::unauthenticated(
                        "auth check failure: the authorization metadata does not carry the \
                         configured user:password token",
                    )
                    .into_http::<axum::body::Body>()
                    .into_response(),
                );
            }
            let method = req
                .uri()
                .path()
                .strip_prefix(SERVICE_PREFIX)
                .map(str::to_string);
            match method {
                Some(m) if !SERVED.contains(&m.as_str()) => Ok(unsupported(&m, req).await),
                _ => match grpc.oneshot(req).await {
                    Ok(resp) => Ok(resp.map(axum::body::Body::new)),
                    Err(never) => match never {},
                },
            }
        }
    }))
}

/// Answers a Milvus RPC Shoal does not serve with a failed Milvus status naming it.
async fn unsupported(method: &str, req: Request) -> Response {
    let status = status::not_supported(method);
    let resp = if BARE_STATUS.contains(&method) {
        reply(status, req).await
    } else {
        reply(
            pb::common::StatusOnlyResponse {
                status: Some(status),
            },
            req,
        )
        .await
    };
    resp.map(axum::body::Body::new)
}

/// A unary gRPC exchange that ignores the request and answers `msg`.
async fn reply<M>(msg: M, req: Request) -> axum::http::Response<tonic::body::Body>
where
    M: prost::Message + Clone + Send + Sync + 'static,
{
    struct Fixed<M>(M);
    impl<M: Clone + Send + 'static> tonic::server::UnaryService<()> for Fixed<M> {
        type Response = M;
        type Future = std::future::Ready<Result<tonic::Response<M>, tonic::Status>>;
        fn call(&mut self, _req: tonic::Request<()>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(self.0.clone())))
        }
    }
    let codec = tonic_prost::ProstCodec::<M, ()>::default();
    tonic::server::Grpc::new(codec).unary(Fixed(msg), req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_list_matches_the_rpcs_declared_in_the_proto() {
        let proto = include_str!("../../../proto/milvus/milvus.proto");
        let declared: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        let mut a = declared.clone();
        let mut b = SERVED.to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn authorization_accepts_base64_plain_and_bearer_and_nothing_else() {
        use base64::Engine as _;
        let t = Some("root:Milvus");
        let b64 = base64::engine::general_purpose::STANDARD.encode("root:Milvus");
        assert!(authorized(None, None));
        assert!(authorized(t, Some(&b64)));
        assert!(authorized(t, Some("root:Milvus")));
        assert!(authorized(t, Some("Bearer root:Milvus")));
        assert!(!authorized(t, None));
        assert!(!authorized(t, Some("root:milvus")));
        let wrong = base64::engine::general_purpose::STANDARD.encode("root:other");
        assert!(!authorized(t, Some(&wrong)));
    }
}
