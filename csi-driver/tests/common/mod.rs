//! Harness for the CSI tests: the real `shoal-csi` binary on a real unix socket, a real Redis
//! (with a password) for JuiceFS metadata, object storage on local files, Azurite (`wasb`) or an
//! S3 server (`s3`) on loopback ports, FUSE. Everything is torn
//! down in `Drop` — mounts under the test's directory are detached and any `juicefs` process
//! serving them is killed — so a failing test leaves nothing behind.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_csi::csi;
use shoal_csi::csi::controller_client::ControllerClient;
use shoal_csi::csi::identity_client::IdentityClient;
use shoal_csi::csi::node_client::NodeClient;
use shoal_csi::csi::volume_capability::access_mode::Mode;
use shoal_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use shoal_testkit::{ObjectStoreKind, ObjectStoreServer, RedisOptions, RedisServer};
use tonic::transport::Channel;

/// The Redis password; must never appear in the plugin's logs or errors.
pub const REDIS_PASSWORD: &str = "rEd1s-pw-5ecret-0451";
/// The object-storage secret key; must never appear either.
pub const SECRET_KEY: &str = "s3cr3t-KEY-never-logged-77";
/// The object-storage access key.
pub const ACCESS_KEY: &str = "AKIA-TEST-ACCESS-9901";

/// gRPC clients for one plugin socket.
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

pub async fn connect(socket: &Path) -> Result<Clients, tonic::transport::Error> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

/// One running `shoal-csi` process.
pub struct Plugin {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub metrics_port: u16,
    pub node_id: String,
    /// `--mode`: `all`, `controller` or `node`.
    pub mode: &'static str,
}

impl Plugin {
    pub fn spawn(dir: &Path, node_id: &str) -> Plugin {
        Plugin::spawn_mode(dir, node_id, "all")
    }

    /// As [`Plugin::spawn`], serving only `mode` (`controller` or `node`).
    pub fn spawn_mode(dir: &Path, node_id: &str, mode: &'static str) -> Plugin {
        std::fs::create_dir_all(dir).unwrap();
        let mut p = Plugin {
            child: None,
            socket: dir.join("csi.sock"),
            state_dir: dir.join("state"),
            log: dir.join("plugin.log"),
            metrics_port: shoal_testkit::free_port().unwrap(),
            node_id: node_id.to_string(),
            mode,
        };
        p.start();
        p
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--node-id", &self.node_id, "--mode", self.mode])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--juicefs")
            .arg(shoal_testkit::juicefs_binary().unwrap())
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(["--watchdog-interval-ms", "200"])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the socket answers Probe with ready = true.
    pub async fn clients(&mut self) -> Clients {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("shoal-csi exited early with {status}:\n{}", self.log_text());
            }
            if let Ok(mut c) = connect(&self.socket).await
                && let Ok(r) = c.identity.probe(csi::ProbeRequest {}).await
                && r.into_inner().ready == Some(true)
            {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "shoal-csi never became ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then wait up to `within` for the exit; panics with the log when it does not.
    pub fn stop(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the plugin is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "shoal-csi did not exit within {within:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` over plain HTTP/1.0.
    pub fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the filesystem's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A local directory (`storage: file`).
    File,
    /// Azurite's blob service (`storage: wasb`, connection string through `envs`).
    Azurite,
    /// moto's S3 server (`storage: s3`, path-style bucket URL, access/secret key).
    S3,
}

/// A test environment: Redis, a bucket, a root dir for staging paths and targets, and a
/// watchdog that ends the test process if the test hangs.
pub struct Env {
    pub redis: RedisServer,
    pub root: tempfile::TempDir,
    pub fs_name: String,
    /// The object store server, for `Store::Azurite` and `Store::S3`.
    pub object_store: Option<ObjectStoreServer>,
    /// The S3 keys after [`Env::require_s3_auth`] (moto then checks them).
    s3_keys: Option<(String, String)>,
    _watchdog: shoal_testkit::watchdog::Watchdog,
}

/// How long one CSI test may run before its watchdog fails it (they take seconds).
pub const TEST_LIMIT: Duration = Duration::from_secs(240);

impl Env {
    pub fn new(fs_name: &str) -> Env {
        Self::with_limit(fs_name, TEST_LIMIT)
    }

    /// [`Env::new`] with another watchdog limit (the benchmark runs for minutes).
    pub fn with_limit(fs_name: &str, limit: Duration) -> Env {
        Self::with_store_and_limit(fs_name, Store::File, limit)
    }

    /// [`Env::new`] with the data in `store` (its server started, the container/bucket named
    /// after the filesystem created).
    pub fn with_store(fs_name: &str, store: Store) -> Env {
        Self::with_store_and_limit(fs_name, store, TEST_LIMIT)
    }

    pub fn with_store_and_limit(fs_name: &str, store: Store, limit: Duration) -> Env {
        // libtest names each test's thread after the test.
        let test = std::thread::current().name().unwrap_or(fs_name).to_string();
        let watchdog = shoal_testkit::watchdog(&test, limit);
        shoal_testkit::require_fuse().unwrap();
        let redis = RedisServer::start_with(RedisOptions {
            password: Some(REDIS_PASSWORD.to_string()),
            appendonly: false,
        })
        .unwrap();
        let root = tempfile::Builder::new()
            .prefix("shoal-csi-test-")
            .tempdir()
            .unwrap();
        let object_store = match store {
            Store::File => None,
            Store::Azurite => Some(ObjectStoreServer::start(ObjectStoreKind::Azurite).unwrap()),
            Store::S3 => Some(ObjectStoreServer::start(ObjectStoreKind::S3).unwrap()),
        };
        if let Some(os) = &object_store {
            os.create_bucket(fs_name).unwrap();
        }
        Env {
            redis,
            root,
            fs_name: fs_name.to_string(),
            object_store,
            s3_keys: None,
            _watchdog: watchdog,
        }
    }

    /// Makes the S3 server check keys (as a real S3 does; moto accepts any by default): the
    /// secrets then carry the generated keys. The unsigned helpers stop working
    /// ([`Env::stored_chunk_bytes`]).
    pub fn require_s3_auth(&mut self) {
        let os = self.object_store.as_ref().expect("an S3 store");
        self.s3_keys = Some(os.require_s3_auth().unwrap());
    }

    /// The S3 `(access key, secret key)` the secrets carry.
    pub fn s3_keys(&self) -> (String, String) {
        self.s3_keys.clone().unwrap_or_else(|| {
            (
                shoal_testkit::objstore::S3_ACCESS_KEY.to_string(),
                shoal_testkit::objstore::S3_SECRET_KEY.to_string(),
            )
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// Secrets under JuiceFS CSI's field names; asks for `juicefs format` (storage set).
    pub fn secrets(&self) -> HashMap<String, String> {
        let common = [
            ("name", self.fs_name.clone()),
            ("metaurl", self.redis.url(1)),
            ("format-options", "trash-days=0".to_string()),
        ];
        let store: Vec<(&str, String)> = match &self.object_store {
            None => vec![
                ("storage", "file".to_string()),
                ("bucket", format!("{}/", self.path("bucket").display())),
                ("access-key", ACCESS_KEY.to_string()),
                ("secret-key", SECRET_KEY.to_string()),
            ],
            Some(os) => match os.kind() {
                ObjectStoreKind::Azurite => vec![
                    ("storage", "wasb".to_string()),
                    ("bucket", os.bucket_url(&self.fs_name)),
                    (
                        "envs",
                        serde_json::json!({
                            "AZURE_STORAGE_CONNECTION_STRING": os.connection_string()
                        })
                        .to_string(),
                    ),
                ],
                ObjectStoreKind::S3 => vec![
                    ("storage", "s3".to_string()),
                    ("bucket", os.bucket_url(&self.fs_name)),
                    ("access-key", self.s3_keys().0),
                    ("secret-key", self.s3_keys().1),
                ],
            },
        };
        common
            .into_iter()
            .chain(store)
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    pub fn secret_values(&self) -> Vec<String> {
        let mut v = vec![
            REDIS_PASSWORD.to_string(),
            SECRET_KEY.to_string(),
            ACCESS_KEY.to_string(),
            self.redis.url(1),
        ];
        if let Some(os) = &self.object_store {
            match os.kind() {
                ObjectStoreKind::Azurite => {
                    v.push(os.connection_string());
                    v.push(shoal_testkit::objstore::AZURITE_ACCOUNT_KEY.to_string());
                }
                ObjectStoreKind::S3 => {
                    let (access, secret) = self.s3_keys();
                    v.push(secret);
                    v.push(access);
                }
            }
        }
        v
    }

    /// Bytes of the filesystem's data blocks (`NAME/chunks/...`) in its container/bucket
    /// (0 for a file store).
    pub fn stored_chunk_bytes(&self) -> u64 {
        let prefix = format!("{}/chunks/", self.fs_name);
        match &self.object_store {
            None => 0,
            Some(os) => os
                .list_objects(&self.fs_name)
                .unwrap()
                .iter()
                .filter(|(name, _)| name.starts_with(&prefix))
                .map(|(_, size)| size)
                .sum(),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        cleanup_mounts_under(self.root.path());
    }
}

/// Detaches every mount under `root` (deepest first) and kills juicefs processes serving it.
pub fn cleanup_mounts_under(root: &Path) {
    for pid in juicefs_pids_for(root) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..4 {
        let table = shoal_csi::mountinfo::read_self().unwrap_or_default();
        let mut under: Vec<PathBuf> = table
            .iter()
            .map(|e| e.mount_point.clone())
            .filter(|p| p.starts_with(root))
            .collect();
        if under.is_empty() {
            break;
        }
        under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in under {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Command lines of every process that contains any of `values` (what `ps` would show).
pub fn command_lines_containing(values: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if values.iter().any(|v| cmd.contains(v.as_str())) {
            found.push(cmd);
        }
    }
    found
}

/// How many bytes of its command line `juicefs` keeps when it rewrites its process title.
const JUICEFS_TITLE_LIMIT: usize = 255;

/// Pids of `juicefs` processes whose command line mentions `path` (or, where juicefs cut its
/// title at [`JUICEFS_TITLE_LIMIT`] bytes, ends in a prefix of it).
pub fn juicefs_pids_for(path: &Path) -> Vec<i32> {
    let needle = path.to_string_lossy().to_string();
    let names = |cmd: &str| {
        let cmd = cmd.trim_end_matches([' ', '\0']);
        if cmd.contains(&needle) {
            return true;
        }
        let last = cmd.rsplit(' ').next().unwrap_or_default();
        cmd.len() >= JUICEFS_TITLE_LIMIT - 1 && last.len() > 1 && needle.starts_with(last)
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("juicefs") && cmd.contains(" mount ") && names(&cmd) {
            pids.push(pid);
        }
    }
    pids
}

/// How many `fuse.juicefs` mounts sit exactly at `path`.
pub fn juicefs_mounts_at(path: &Path) -> usize {
    shoal_csi::mountinfo::read_self()
        .unwrap()
        .iter()
        .filter(|e| e.mount_point == path && e.is_juicefs())
        .count()
}

pub fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn rwx() -> csi::VolumeCapability {
    mount_cap(Mode::MultiNodeMultiWriter)
}

pub fn create_req(env: &Env, name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwx()],
        secrets: env.secrets(),
        ..Default::default()
    }
}

/// CreateVolume of `name` with `bytes` capacity (0: none); panics with the status on failure.
pub async fn create_volume(c: &mut Clients, env: &Env, name: &str, bytes: i64) -> csi::Volume {
    c.controller
        .create_volume(create_req(env, name, bytes))
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume returns the volume")
}

pub fn stage_req(env: &Env, vol: &csi::Volume, staging: &Path) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        secrets: env.secrets(),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

pub fn publish_req(
    vol: &csi::Volume,
    staging: &Path,
    target: &Path,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwx()),
        readonly,
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

pub fn unpublish_req(vol: &csi::Volume, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.display().to_string(),
    }
}

pub fn unstage_req(vol: &csi::Volume, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
