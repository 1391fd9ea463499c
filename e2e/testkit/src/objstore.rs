//! Object stores over HTTP on loopback ports: Azurite (Microsoft's Azure Blob Storage server,
//! npm `azurite`) and moto's S3 server (PyPI `moto[server]`), each stopped on drop.
//!
//! Owns the server processes (each in its own process group, so `Drop` and [`pause`] reach the
//! interpreter behind any launcher script), their temp directories, and the few requests the
//! tests make themselves: create a container/bucket and list what is in it (proof that JuiceFS
//! really wrote there). Readiness is an HTTP answer on the port, never a fixed sleep. Versions
//! are pinned by `make deps`. Must not depend on shoal-csi or the engine.
//!
//! JuiceFS's `wasb` takes the container name from the first label of the bucket URL's host and,
//! when `AZURE_STORAGE_CONNECTION_STRING` is set, the endpoint from the connection string; so
//! for Azurite the bucket is `http://CONTAINER.127.0.0.1:PORT` (the host is never resolved) and
//! the connection string carries `BlobEndpoint=http://127.0.0.1:PORT/devstoreaccount1`.
//!
//! [`pause`]: ObjectStoreServer::pause

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{TestkitError, free_port};

/// Azurite's built-in account (public, documented by Microsoft for the emulator).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's built-in account key (public, documented by Microsoft for the emulator).
pub const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Credentials the S3 server accepts (moto checks none; JuiceFS wants some).
pub const S3_ACCESS_KEY: &str = "shoal-test-access";
/// See [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "shoal-test-secret-key-0042";

/// How long a server may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// One request's limit (a paused server must not hang a helper).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which server a [`ObjectStoreServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStoreKind {
    /// Azurite's blob service (`juicefs --storage wasb`).
    Azurite,
    /// moto in server mode (`juicefs --storage s3`).
    S3,
}

impl ObjectStoreKind {
    /// The JuiceFS `--storage` type.
    pub fn juicefs_storage(self) -> &'static str {
        match self {
            ObjectStoreKind::Azurite => "wasb",
            ObjectStoreKind::S3 => "s3",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            ObjectStoreKind::Azurite => "azurite-blob",
            ObjectStoreKind::S3 => "moto_server",
        }
    }

    fn program(self) -> PathBuf {
        let var = match self {
            ObjectStoreKind::Azurite => "AZURITE_BLOB_BIN",
            ObjectStoreKind::S3 => "MOTO_SERVER_BIN",
        };
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(self.tool()))
    }
}

/// A running object store. Dropping it kills the server's process group and removes its data.
#[derive(Debug)]
pub struct ObjectStoreServer {
    kind: ObjectStoreKind,
    child: Child,
    /// The address it listens on (loopback unless started with [`ObjectStoreServer::start_on`]).
    ip: Ipv4Addr,
    port: u16,
    dir: tempfile::TempDir,
}

impl ObjectStoreServer {
    /// Starts Azurite's blob service on a free loopback port (data in a temp dir, API version
    /// checks off so any SDK version JuiceFS bundles is served).
    ///
    /// Errors: [`TestkitError::MissingTool`] when `azurite-blob` is not installed (`make deps`);
    /// [`TestkitError::NotReady`] with its log when it never answers.
    pub fn start_azurite() -> Result<Self, TestkitError> {
        Self::start(ObjectStoreKind::Azurite)
    }

    /// Starts moto's S3 server on a free loopback port.
    ///
    /// Errors: as [`ObjectStoreServer::start_azurite`], for `moto_server`.
    pub fn start_s3() -> Result<Self, TestkitError> {
        Self::start(ObjectStoreKind::S3)
    }

    /// Starts a server of `kind` on loopback, retrying on a fresh port when one was taken
    /// meanwhile.
    pub fn start(kind: ObjectStoreKind) -> Result<Self, TestkitError> {
        Self::start_on(kind, Ipv4Addr::LOCALHOST)
    }

    /// As [`ObjectStoreServer::start`], listening on `ip` (for instance the address pods of a
    /// local Kubernetes node reach this machine at).
    pub fn start_on(kind: ObjectStoreKind, ip: Ipv4Addr) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shoal-{}-", kind.tool()))
            .tempdir()
            .map_err(|source| TestkitError::Io {
                action: "create object store dir",
                source,
            })?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = spawn(kind, ip, port, dir.path())?;
            match wait_ready(kind, &mut child, ip, port, dir.path()) {
                Ok(()) => {
                    return Ok(ObjectStoreServer {
                        kind,
                        child,
                        ip,
                        port,
                        dir,
                    });
                }
                Err(e) => {
                    kill_group(&mut child);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(TestkitError::NotReady {
            what: kind.tool(),
            detail: "no attempt made".into(),
        }))
    }

    /// Which server this is.
    pub fn kind(&self) -> ObjectStoreKind {
        self.kind
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (Azurite keeps its data there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The JuiceFS `--bucket` for `container` (a container of Azurite, a path-style bucket of
    /// the S3 server).
    pub fn bucket_url(&self, container: &str) -> String {
        match self.kind {
            ObjectStoreKind::Azurite => format!("http://{container}.{}:{}", self.ip, self.port),
            ObjectStoreKind::S3 => format!("http://{}:{}/{container}", self.ip, self.port),
        }
    }

    /// Azurite's connection string for its built-in account.
    pub fn connection_string(&self) -> String {
        self.connection_string_with_key(AZURITE_ACCOUNT_KEY)
    }

    /// Azurite's connection string with another account key (a wrong one, for error tests).
    pub fn connection_string_with_key(&self, key: &str) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};\
             BlobEndpoint=http://{}:{}/{AZURITE_ACCOUNT};",
            self.ip, self.port
        )
    }

    /// Creates a container (Azurite) or bucket (S3); one that exists already is success.
    ///
    /// Errors: [`TestkitError::CommandFailed`] with the server's answer.
    pub fn create_bucket(&self, name: &str) -> Result<(), TestkitError> {
        let (status, body) = match self.kind {
            ObjectStoreKind::Azurite => {
                self.azure_request("PUT", name, &[("restype", "container")])?
            }
            ObjectStoreKind::S3 => http(self.ip, self.port, "PUT", &format!("/{name}"), &[])?,
        };
        // 409: Azurite's ContainerAlreadyExists; S3's BucketAlreadyOwnedByYou.
        if (200..300).contains(&status) || status == 409 {
            Ok(())
        } else {
            Err(TestkitError::CommandFailed {
                what: "create bucket",
                detail: format!("HTTP {status}: {}", first_chars(&body, 400)),
            })
        }
    }

    /// The objects in a container/bucket (name, size), up to the first 5000.
    ///
    /// Errors: [`TestkitError::CommandFailed`] with the server's answer.
    pub fn list_objects(&self, bucket: &str) -> Result<Vec<(String, u64)>, TestkitError> {
        let (status, body) = match self.kind {
            ObjectStoreKind::Azurite => {
                self.azure_request("GET", bucket, &[("comp", "list"), ("restype", "container")])?
            }
            ObjectStoreKind::S3 => http(
                self.ip,
                self.port,
                "GET",
                &format!("/{bucket}?list-type=2"),
                &[],
            )?,
        };
        if !(200..300).contains(&status) {
            return Err(TestkitError::CommandFailed {
                what: "list objects",
                detail: format!("HTTP {status}: {}", first_chars(&body, 400)),
            });
        }
        let (item, name, size) = match self.kind {
            ObjectStoreKind::Azurite => ("Blob", "Name", "Content-Length"),
            ObjectStoreKind::S3 => ("Contents", "Key", "Size"),
        };
        Ok(xml_elements(&body, item)
            .into_iter()
            .filter_map(|e| {
                let n = xml_elements(e, name).first()?.to_string();
                let s = xml_elements(e, size).first()?.parse().ok()?;
                Some((n, s))
            })
            .collect())
    }

    /// Makes moto's S3 server check credentials from now on, as a real S3 does (by default it
    /// accepts any): creates an IAM user allowed everything and returns its generated
    /// `(access key, secret key)`. A wrong key then gets `SignatureDoesNotMatch` or
    /// `InvalidAccessKeyId`. Afterwards the unsigned helpers ([`Self::create_bucket`],
    /// [`Self::list_objects`]) are refused too: create buckets first.
    ///
    /// Errors: [`TestkitError::CommandFailed`] on Azurite (it always checks) or when moto
    /// refuses a step.
    pub fn require_s3_auth(&self) -> Result<(String, String), TestkitError> {
        if self.kind != ObjectStoreKind::S3 {
            return Err(TestkitError::CommandFailed {
                what: "require S3 authentication",
                detail: "only the S3 server can be switched".into(),
            });
        }
        let fail = |step: &str, status: u16, body: &str| TestkitError::CommandFailed {
            what: "require S3 authentication",
            detail: format!("{step}: HTTP {status}: {}", first_chars(body, 400)),
        };
        // The next 3 actions (the IAM calls below) go unchecked, every later one is checked.
        let (status, body) = http_with_body(
            self.ip,
            self.port,
            "POST",
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            "3",
        )?;
        if status != 200 {
            return Err(fail("reset-auth", status, &body));
        }
        // moto routes a request to IAM by the service in its credential scope; unchecked, so
        // the signature is a placeholder.
        let iam = [(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=setup/20260101/us-east-1/iam/aws4_request, \
             SignedHeaders=host, Signature=0",
        )];
        let user = "shoal-test";
        let policy = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A\
                      %22Allow%22%2C%22Action%22%3A%22*%22%2C%22Resource%22%3A%22*%22%7D%5D%7D";
        let mut keys = None;
        for (step, query) in [
            ("CreateUser", format!("Action=CreateUser&UserName={user}")),
            (
                "CreateAccessKey",
                format!("Action=CreateAccessKey&UserName={user}"),
            ),
            (
                "PutUserPolicy",
                format!(
                    "Action=PutUserPolicy&UserName={user}&PolicyName=all&PolicyDocument={policy}"
                ),
            ),
        ] {
            let (status, body) = http(
                self.ip,
                self.port,
                "POST",
                &format!("/?{query}&Version=2010-05-08"),
                &iam,
            )?;
            if status != 200 {
                return Err(fail(step, status, &body));
            }
            if step == "CreateAccessKey" {
                let id = xml_elements(&body, "AccessKeyId")
                    .first()
                    .map(|s| s.to_string());
                let secret = xml_elements(&body, "SecretAccessKey")
                    .first()
                    .map(|s| s.to_string());
                keys = id.zip(secret);
            }
        }
        keys.ok_or_else(|| fail("CreateAccessKey", 200, "no key in the answer"))
    }

    /// Freezes the server (SIGSTOP to its process group): connections are accepted by the
    /// kernel but nothing is answered, as with a store that stopped responding.
    pub fn pause(&self) -> Result<(), TestkitError> {
        signal_group(&self.child, nix::sys::signal::Signal::SIGSTOP)
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) -> Result<(), TestkitError> {
        signal_group(&self.child, nix::sys::signal::Signal::SIGCONT)
    }

    /// A Shared Key-signed request to Azurite's blob service for `container`.
    fn azure_request(
        &self,
        method: &str,
        container: &str,
        query: &[(&str, &str)],
    ) -> Result<(u16, String), TestkitError> {
        let date = httpdate::fmt_http_date(SystemTime::now());
        let version = "2021-08-06";
        let mut sorted = query.to_vec();
        sorted.sort();
        let resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}");
        let canonical_query: String = sorted.iter().map(|(k, v)| format!("\n{k}:{v}")).collect();
        // Verb, 11 standard headers (all empty: no body), x-ms-* headers, resource.
        let to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}{canonical_query}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(AZURITE_ACCOUNT_KEY)
            .map_err(|e| TestkitError::CommandFailed {
                what: "decode the Azurite key",
                detail: e.to_string(),
            })?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&key).map_err(|e| TestkitError::CommandFailed {
                what: "sign an Azurite request",
                detail: e.to_string(),
            })?;
        mac.update(to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let query_string: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path = format!("/{AZURITE_ACCOUNT}/{container}?{}", query_string.join("&"));
        let auth = format!("SharedKey {AZURITE_ACCOUNT}:{signature}");
        http(
            self.ip,
            self.port,
            method,
            &path,
            &[
                ("x-ms-date", date.as_str()),
                ("x-ms-version", version),
                ("Authorization", auth.as_str()),
            ],
        )
    }
}

impl Drop for ObjectStoreServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (stopped) group.
        kill_group(&mut self.child);
    }
}

fn spawn(
    kind: ObjectStoreKind,
    ip: Ipv4Addr,
    port: u16,
    dir: &Path,
) -> Result<Child, TestkitError> {
    let log = std::fs::File::create(dir.join("server.log")).map_err(|source| TestkitError::Io {
        action: "create object store log",
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| TestkitError::Io {
        action: "open object store log",
        source,
    })?;
    let mut cmd = Command::new(kind.program());
    match kind {
        ObjectStoreKind::Azurite => {
            cmd.arg("--blobHost")
                .arg(ip.to_string())
                .arg("--blobPort")
                .arg(port.to_string())
                .arg("--location")
                .arg(dir.join("data"))
                .arg("--debug")
                .arg(dir.join("debug.log"))
                .args([
                    "--loose",
                    "--skipApiVersionCheck",
                    "--disableProductStyleUrl",
                ]);
        }
        ObjectStoreKind::S3 => {
            cmd.arg("-H")
                .arg(ip.to_string())
                .arg("-p")
                .arg(port.to_string());
        }
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    cmd.spawn().map_err(|e| TestkitError::MissingTool {
        tool: kind.tool(),
        detail: format!("cannot run {}: {e}", kind.program().display()),
    })
}

fn wait_ready(
    kind: ObjectStoreKind,
    child: &mut Child,
    ip: Ipv4Addr,
    port: u16,
    dir: &Path,
) -> Result<(), TestkitError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(TestkitError::NotReady {
                what: kind.tool(),
                detail: format!("exited with {status}: {}", log_tail(dir)),
            });
        }
        // Any HTTP answer (Azurite answers an unsigned listing with 403) means it serves.
        if http(ip, port, "GET", "/", &[]).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestkitError::NotReady {
                what: kind.tool(),
                detail: format!("no HTTP answer within {READY_TIMEOUT:?}: {}", log_tail(dir)),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_group(child: &mut Child) {
    let _ = signal_group(child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

fn signal_group(child: &Child, signal: nix::sys::signal::Signal) -> Result<(), TestkitError> {
    let pgid = i32::try_from(child.id()).map_err(|_| TestkitError::CommandFailed {
        what: "signal the object store",
        detail: "pid out of range".into(),
    })?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal).map_err(|e| {
        TestkitError::Io {
            action: "signal the object store",
            source: std::io::Error::from(e),
        }
    })
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the (de-chunked) body.
fn http(
    ip: Ipv4Addr,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), TestkitError> {
    http_with_body(ip, port, method, path, headers, "")
}

/// [`http`] with a request body.
fn http_with_body(
    ip: Ipv4Addr,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), TestkitError> {
    let io =
        |action: &'static str| move |source: std::io::Error| TestkitError::Io { action, source };
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(io("connect to the object store"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io("set a read timeout"))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .map_err(io("send to the object store"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(io("read from the object store"))?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| TestkitError::CommandFailed {
            what: "parse an object store answer",
            detail: first_chars(head, 200),
        })?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The text of every `<tag>...</tag>` in `xml` (flat scan; enough for listing answers).
fn xml_elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else {
            break;
        };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn xml_scan_and_dechunk_read_listing_answers() {
        let xml = "<R><Blob><Name>a/1</Name><Properties><Content-Length>5</Content-Length>\
                   </Properties></Blob><Blob><Name>b</Name><Content-Length>7</Content-Length></Blob></R>";
        let blobs = xml_elements(xml, "Blob");
        assert_eq!(blobs.len(), 2);
        assert_eq!(xml_elements(blobs[0], "Name"), vec!["a/1"]);
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn the_s3_server_checks_keys_once_required() {
        let s = ObjectStoreServer::start_s3().unwrap();
        s.create_bucket("shoal").unwrap();
        let (access, secret) = s.require_s3_auth().unwrap();
        assert!(access.len() >= 16 && secret.len() >= 30, "{access}");
        // Unsigned requests are refused from now on.
        assert!(s.list_objects("shoal").is_err());
    }

    #[test]
    fn both_servers_start_create_a_bucket_and_list_it() {
        for kind in [ObjectStoreKind::Azurite, ObjectStoreKind::S3] {
            let s = ObjectStoreServer::start(kind).unwrap();
            s.create_bucket("shoal").unwrap();
            s.create_bucket("shoal").unwrap();
            assert_eq!(s.list_objects("shoal").unwrap(), vec![]);
            assert!(s.list_objects("absent").is_err(), "{kind:?}");
        }
    }
}
