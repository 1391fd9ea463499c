//! A small in-memory Kubernetes API server behind `tower_test::mock::pair`, recording every
//! request. It implements what the operator uses: GET (object and labelled list), POST,
//! server-side apply PATCH, JSON merge PATCH (with resourceVersion preconditions, status
//! subresource), PUT and DELETE, plus a switch standing in for the workload controllers
//! (StatefulSets/Deployments become ready and PVCs bound when applied) and one-shot failure
//! injection.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<Value>,
}

impl Req {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
    /// `METHOD kind/name` for readable assertions, e.g. `PATCH statefulsets/demo-writer`.
    pub fn short(&self) -> String {
        let segs: Vec<&str> = self.path.trim_matches('/').split('/').collect();
        let tail = match segs.iter().position(|s| *s == "namespaces") {
            Some(i) => segs[i + 2..].join("/"),
            None => segs[2 + usize::from(segs[0] == "apis")..].join("/"),
        };
        format!("{} {}", self.method, tail)
    }
}

#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub log: Vec<Req>,
    rv: u64,
    /// Applied workloads become ready and claims bound, as their controllers would do.
    pub ready_on_apply: bool,
    /// Fail the write with this index (0-based, events excluded) with a 500, once.
    pub fail_write: Option<usize>,
    writes_seen: usize,
}

#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
           "message": message, "reason": reason, "code": code})
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
            out.push(h);
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| decode(v))
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Is this path a collection (list/create) rather than one object?
fn is_collection(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.iter().position(|s| *s == "namespaces") {
        Some(i) if segs.len() > i + 2 => &segs[i + 2..],
        _ => &segs[2 + usize::from(segs[0] == "apis")..],
    };
    rest.len() == 1
}

impl State {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// What the workload controllers would report once they have caught up.
    fn settle(obj: &mut Value) {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let generation = obj["metadata"]["generation"].clone();
        match kind.as_str() {
            "StatefulSet" | "Deployment" => {
                let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
                obj["status"] = json!({
                    "observedGeneration": generation, "replicas": want, "readyReplicas": want,
                    "updatedReplicas": want, "availableReplicas": want,
                    "currentRevision": "r", "updateRevision": "r"
                });
            }
            "PersistentVolumeClaim" => obj["status"] = json!({"phase": "Bound"}),
            _ => {}
        }
    }

    fn handle(&mut self, req: &Req) -> (StatusCode, Value) {
        let path = req.path.clone();
        let write_index = if req.is_write() && !req.is_event() {
            self.writes_seen += 1;
            Some(self.writes_seen - 1)
        } else {
            None
        };
        if write_index.is_some() && write_index == self.fail_write {
            self.fail_write = None;
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                status_json(500, "InternalError", "injected failure"),
            );
        }
        match req.method.as_str() {
            "GET" if is_collection(&path) => {
                let sel = query_param(&req.query, "labelSelector").unwrap_or_default();
                let prefix = format!("{path}/");
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .filter(|v| labels_match(v, &sel))
                    .collect();
                (
                    StatusCode::OK,
                    json!({"kind":"List","apiVersion":"v1","metadata":{"resourceVersion": self.rv.to_string()},"items": items}),
                )
            }
            "GET" => match self.objects.get(&path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (
                    StatusCode::NOT_FOUND,
                    status_json(404, "NotFound", "not found"),
                ),
            },
            "POST" => {
                let mut body = req.body.clone().unwrap_or_default();
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let key = format!("{path}/{name}");
                if self.objects.contains_key(&key) {
                    return (
                        StatusCode::CONFLICT,
                        status_json(409, "AlreadyExists", "exists"),
                    );
                }
                body["metadata"]["resourceVersion"] = json!(self.next_rv());
                body["metadata"]["uid"] = json!(format!("uid-{}", self.rv));
                if !req.is_event() {
                    self.objects.insert(key, body.clone());
                }
                (StatusCode::CREATED, body)
            }
            "PATCH" | "PUT" => {
                let (obj_path, sub_status) = match path.strip_suffix("/status") {
                    Some(p) => (p.to_string(), true),
                    None => (path.clone(), false),
                };
                let body = req.body.clone().unwrap_or_default();
                let existing = self.objects.get(&obj_path).cloned();
                if req.content_type.contains("merge-patch") || req.method == "PUT" {
                    let Some(mut obj) = existing else {
                        return (
                            StatusCode::NOT_FOUND,
                            status_json(404, "NotFound", "not found"),
                        );
                    };
                    if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                        && obj["metadata"]["resourceVersion"].as_str() != Some(rv)
                    {
                        return (StatusCode::CONFLICT, status_json(409, "Conflict", "stale"));
                    }
                    if req.method == "PUT" {
                        obj = body;
                    } else if sub_status {
                        merge(&mut obj["status"], &body["status"]);
                    } else {
                        let mut b = body.clone();
                        if let Some(m) = b.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("resourceVersion");
                        }
                        merge(&mut obj, &b);
                    }
                    obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                    // Finalizers gone on a deleting object: the API server removes it.
                    let gone = obj["metadata"]["deletionTimestamp"].is_string()
                        && obj["metadata"]["finalizers"]
                            .as_array()
                            .is_none_or(Vec::is_empty);
                    if gone {
                        self.objects.remove(&obj_path);
                    } else {
                        self.objects.insert(obj_path, obj.clone());
                    }
                    return (StatusCode::OK, obj);
                }
                // Server-side apply: the applied configuration replaces what we own; the
                // server keeps identity and status.
                let mut obj = body;
                let created = existing.is_none();
                let old = existing.unwrap_or_default();
                let spec_changed = old.get("spec") != obj.get("spec");
                let new_gen = old["metadata"]["generation"].as_i64().unwrap_or(0)
                    + i64::from(created || spec_changed);
                obj["metadata"]["generation"] = json!(new_gen);
                obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                if created {
                    obj["metadata"]["uid"] = json!(format!("uid-{}", self.rv + 1));
                }
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                if let Some(s) = old.get("status") {
                    obj["status"] = s.clone();
                }
                if self.ready_on_apply {
                    Self::settle(&mut obj);
                }
                self.objects.insert(obj_path, obj.clone());
                (
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    obj,
                )
            }
            "DELETE" => match self.objects.remove(&path) {
                Some(o) => (StatusCode::OK, o),
                None => (
                    StatusCode::NOT_FOUND,
                    status_json(404, "NotFound", "not found"),
                ),
            },
            m => panic!("unexpected method {m}"),
        }
    }
}

impl FakeApi {
    /// Starts the fake server; returns it and a client talking to it.
    pub fn start() -> (Self, Client) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = FakeApi {
            state: Arc::new(Mutex::new(State {
                ready_on_apply: true,
                ..State::default()
            })),
        };
        let state = fake.state.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let body = if bytes.is_empty() {
                    None
                } else {
                    Some(serde_json::from_slice::<Value>(&bytes).unwrap())
                };
                let req = Req {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default(),
                    body,
                };
                let (code, value) = {
                    let mut st = state.lock().unwrap();
                    st.log.push(req.clone());
                    st.handle(&req)
                };
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        (fake, Client::new(svc, "default"))
    }

    pub fn take_log(&self) -> Vec<Req> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }
    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }
    pub fn put(&self, path: &str, v: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), v);
    }
    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
    }
    pub fn set_ready_on_apply(&self, on: bool) {
        self.state.lock().unwrap().ready_on_apply = on;
    }
    pub fn fail_write(&self, index: usize) {
        self.state.lock().unwrap().fail_write = Some(index);
    }
    /// Lets the workload controllers catch up on one object.
    pub fn settle(&self, path: &str) {
        let mut st = self.state.lock().unwrap();
        let obj = st.objects.get_mut(path).unwrap();
        State::settle(obj);
    }
    pub fn paths_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}
