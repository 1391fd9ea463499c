//! The real `shoal-csi` binary driven over its unix socket by a Rust CSI client, with real
//! Redis, the real `juicefs` client and FUSE. Needs root and /dev/fuse (CI has both).
//! Stage, publish and heal run on each object store: local files, Azurite (`wasb`) and an S3
//! server (`s3`), the last two started on loopback ports by the testkit (`make deps`).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;
use shoal_csi::csi;
use tonic::Code;

async fn create(c: &mut Clients, env: &Env, name: &str) -> csi::Volume {
    create_volume(c, env, name, 1 << 30).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_lifecycle_with_rw_and_ro_targets_sharing_one_staged_mount() {
    full_lifecycle(Store::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_lifecycle_with_rw_and_ro_targets_sharing_one_staged_mount_on_azurite() {
    full_lifecycle(Store::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_lifecycle_with_rw_and_ro_targets_sharing_one_staged_mount_on_s3() {
    full_lifecycle(Store::S3).await;
}

/// Waits until the filesystem's data objects in the object store hold at least `bytes`.
async fn wait_for_chunks_in_store(env: &Env, bytes: u64) {
    if env.object_store.is_none() {
        return;
    }
    wait_until(
        Duration::from_secs(20),
        "data to reach the object store",
        || env.stored_chunk_bytes() >= bytes,
    )
    .await;
}

async fn full_lifecycle(store: Store) {
    let env = Env::with_store("lifecycle", store);
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;

    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, shoal_csi::DRIVER_NAME);
    assert_eq!(info.name, "csi.shoal.dev");
    let caps = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 3);
    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "node-a");
    // 0 means "no limit" to the spec but is an invalid attach limit to the kubelet.
    assert_eq!(
        ni.max_volumes_per_node,
        shoal_csi::driver::DEFAULT_MAX_VOLUMES_PER_NODE
    );
    assert!(ni.max_volumes_per_node > 0);

    let vol = create(&mut c, &env, "pvc-life").await;
    assert_eq!(vol.volume_id, "pvc-life");
    assert_eq!(vol.capacity_bytes, 1 << 30);
    let staging = env.path("kubelet/staging/pvc-life");
    let rw = env.path("kubelet/pods/a/mount");
    let ro = env.path("kubelet/pods/b/mount");
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    assert_eq!(juicefs_mounts_at(&staging), 1);
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &rw, false))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &ro, true))
        .await
        .unwrap();

    // Both targets are binds of the one staged FUSE connection (same device), no new mount.
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    assert_eq!(dev(&rw), dev(&staging));
    assert_eq!(dev(&ro), dev(&staging));
    assert_eq!(
        juicefs_mounts_at(&staging),
        1,
        "publishing adds no juicefs mount"
    );

    std::fs::write(rw.join("hello.txt"), b"from the rw target").unwrap();
    assert_eq!(
        std::fs::read(ro.join("hello.txt")).unwrap(),
        b"from the rw target"
    );
    // The data really went to the object store under test (not a local fallback).
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(rw.join("big.bin"), &big).unwrap();
    wait_for_chunks_in_store(&env, big.len() as u64).await;
    assert_eq!(std::fs::read(ro.join("big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read(staging.join("pvc-life/hello.txt")).unwrap(),
        b"from the rw target"
    );
    let err = std::fs::write(ro.join("nope.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: rw.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(stats.usage.iter().all(|u| u.total > 0), "{:?}", stats.usage);

    c.node
        .node_unpublish_volume(unpublish_req(&vol, &rw))
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &ro))
        .await
        .unwrap();
    assert!(!rw.exists() && !ro.exists(), "targets are removed");
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    assert_eq!(juicefs_mounts_at(&staging), 0);
    wait_until(
        Duration::from_secs(20),
        "the juicefs process of the unstaged mount to exit",
        || juicefs_pids_for(&staging).is_empty(),
    )
    .await;

    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    // Deleted means gone: staging it again finds no directory.
    let st = c
        .node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert_eq!(
        juicefs_mounts_at(&staging),
        0,
        "a failed stage leaves no mount behind"
    );

    let metrics = plugin.metrics();
    assert!(
        metrics.contains("shoal_csi_calls_total{method=\"NodeStageVolume\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("code=\"NOT_FOUND\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_is_idempotent_when_repeated() {
    let env = Env::new("idem");
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-idem").await;
    assert_eq!(
        create(&mut c, &env, "pvc-idem").await,
        vol,
        "same name, same answer"
    );
    let staging = env.path("staging");
    let target = env.path("target");
    for _ in 0..2 {
        c.node
            .node_stage_volume(stage_req(&env, &vol, &staging))
            .await
            .unwrap();
    }
    assert_eq!(juicefs_mounts_at(&staging), 1, "staged twice, mounted once");
    for _ in 0..2 {
        c.node
            .node_publish_volume(publish_req(&vol, &staging, &target, false))
            .await
            .unwrap();
    }
    let binds = shoal_csi::mountinfo::read_self()
        .unwrap()
        .iter()
        .filter(|e| e.mount_point == target)
        .count();
    assert_eq!(binds, 1, "published twice, bound once");
    for _ in 0..2 {
        c.node
            .node_unpublish_volume(unpublish_req(&vol, &target))
            .await
            .unwrap();
    }
    // Unpublish of a target that was never published.
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &env.path("never")))
        .await
        .unwrap();
    for _ in 0..2 {
        c.node
            .node_unstage_volume(unstage_req(&vol, &staging))
            .await
            .unwrap();
    }
    let del = csi::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: env.secrets(),
    };
    for _ in 0..2 {
        c.controller.delete_volume(del.clone()).await.unwrap();
    }
    // Deleting a volume that never existed.
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-never-created".into(),
            secrets: env.secrets(),
        })
        .await
        .unwrap();
    drop(plugin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_error_returns_the_spec_code_and_changes_nothing() {
    let env = Env::new("errors");
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    // Missing ids, names and capabilities: INVALID_ARGUMENT.
    let mut no_name = create_req(&env, "", 0);
    assert_eq!(
        code(c.controller.create_volume(no_name.clone()).await),
        Code::InvalidArgument
    );
    no_name.name = "pvc-x".into();
    no_name.volume_capabilities.clear();
    assert_eq!(
        code(c.controller.create_volume(no_name).await),
        Code::InvalidArgument
    );
    let mut block = create_req(&env, "pvc-block", 0);
    block.volume_capabilities[0].access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    assert_eq!(
        code(c.controller.create_volume(block).await),
        Code::InvalidArgument
    );
    let mut no_secret = create_req(&env, "pvc-nosecret", 0);
    no_secret.secrets.clear();
    assert_eq!(
        code(c.controller.create_volume(no_secret).await),
        Code::InvalidArgument
    );
    let mut bad_param = create_req(&env, "pvc-param", 0);
    bad_param
        .parameters
        .insert("onDelete".into(), "sometimes".into());
    assert_eq!(
        code(c.controller.create_volume(bad_param).await),
        Code::InvalidArgument
    );
    let mut range = create_req(&env, "pvc-range", 10 << 30);
    range.capacity_range.as_mut().unwrap().limit_bytes = 1 << 30;
    assert_eq!(
        code(c.controller.create_volume(range).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            c.controller
                .delete_volume(csi::DeleteVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_stage_volume(csi::NodeStageVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_publish_volume(csi::NodePublishVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );

    // Same name, different capacity or parameters: ALREADY_EXISTS.
    let vol = create(&mut c, &env, "pvc-err").await;
    assert_eq!(
        code(
            c.controller
                .create_volume(create_req(&env, "pvc-err", 2 << 30))
                .await
        ),
        Code::AlreadyExists
    );
    let mut retain = create_req(&env, "pvc-err", 1 << 30);
    retain.parameters.insert("onDelete".into(), "retain".into());
    assert_eq!(
        code(c.controller.create_volume(retain).await),
        Code::AlreadyExists
    );

    // Validate: unknown volume NOT_FOUND; known one confirmed.
    let validate = |id: &str| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![rwx()],
        secrets: env.secrets(),
        ..Default::default()
    };
    assert_eq!(
        code(
            c.controller
                .validate_volume_capabilities(validate("pvc-missing"))
                .await
        ),
        Code::NotFound
    );
    let ok = c
        .controller
        .validate_volume_capabilities(validate("pvc-err"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());

    // Publish before stage: FAILED_PRECONDITION.
    let staging = env.path("staging");
    let target = env.path("target");
    assert_eq!(
        code(
            c.node
                .node_publish_volume(publish_req(&vol, &staging, &target, false))
                .await
        ),
        Code::FailedPrecondition
    );
    assert!(!target.exists(), "a refused publish creates nothing");
    // Stage of a volume that does not exist: NOT_FOUND.
    let ghost = csi::Volume {
        volume_id: "pvc-ghost".into(),
        volume_context: [("subPath".to_string(), "pvc-ghost".to_string())].into(),
        ..Default::default()
    };
    let st = c
        .node
        .node_stage_volume(stage_req(&env, &ghost, &staging))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert_eq!(juicefs_mounts_at(&staging), 0);

    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    // Another volume onto the same staging path: FAILED_PRECONDITION.
    let other = create(&mut c, &env, "pvc-other").await;
    assert_eq!(
        code(
            c.node
                .node_stage_volume(stage_req(&env, &other, &staging))
                .await
        ),
        Code::FailedPrecondition
    );
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    // Same target, different read-only flag: ALREADY_EXISTS.
    assert_eq!(
        code(
            c.node
                .node_publish_volume(publish_req(&vol, &staging, &target, true))
                .await
        ),
        Code::AlreadyExists
    );
    // Unstage while published: FAILED_PRECONDITION, and the mount stays.
    assert_eq!(
        code(
            c.node
                .node_unstage_volume(unstage_req(&vol, &staging))
                .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(juicefs_mounts_at(&staging), 1);
    std::fs::write(target.join("still.txt"), b"ok").unwrap();
    // Stats of a path that does not exist: NOT_FOUND.
    let stats = csi::NodeGetVolumeStatsRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: env.path("no/such/path").display().to_string(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(c.node.node_get_volume_stats(stats).await),
        Code::NotFound
    );

    c.node
        .node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_one_volume_are_aborted_and_the_winner_mounts_once() {
    let env = Env::new("concur");
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-conc").await;
    let staging = env.path("staging");
    let calls = (0..4).map(|_| {
        let mut node = c.node.clone();
        let req = stage_req(&env, &vol, &staging);
        tokio::spawn(async move { node.node_stage_volume(req).await.map(|_| ()) })
    });
    let results: Vec<_> = futures_join(calls.collect()).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let aborted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::Aborted))
        .count();
    assert_eq!(ok + aborted, 4, "{results:?}");
    assert!(ok >= 1 && aborted >= 1, "{results:?}");
    assert_eq!(juicefs_mounts_at(&staging), 1);
    // The CO retries an aborted call: it succeeds without mounting again.
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    assert_eq!(juicefs_mounts_at(&staging), 1);
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_written_through_one_target_is_read_through_another_target_and_a_second_node() {
    let env = Env::new("share");
    let mut node_a = Plugin::spawn(&env.path("node-a"), "node-a");
    let mut node_b = Plugin::spawn(&env.path("node-b"), "node-b");
    let mut a = node_a.clients().await;
    let mut b = node_b.clients().await;
    let vol = create(&mut a, &env, "pvc-share").await;
    let (stage_a, stage_b) = (env.path("a/staging"), env.path("b/staging"));
    let (writer, reader_a, reader_b) = (env.path("a/w"), env.path("a/r"), env.path("b/r"));
    a.node
        .node_stage_volume(stage_req(&env, &vol, &stage_a))
        .await
        .unwrap();
    b.node
        .node_stage_volume(stage_req(&env, &vol, &stage_b))
        .await
        .unwrap();
    a.node
        .node_publish_volume(publish_req(&vol, &stage_a, &writer, false))
        .await
        .unwrap();
    a.node
        .node_publish_volume(publish_req(&vol, &stage_a, &reader_a, true))
        .await
        .unwrap();
    b.node
        .node_publish_volume(publish_req(&vol, &stage_b, &reader_b, true))
        .await
        .unwrap();
    assert_ne!(
        std::fs::metadata(&stage_a).unwrap().dev(),
        std::fs::metadata(&stage_b).unwrap().dev(),
        "node b has its own juicefs mount"
    );
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(writer.join("segment.bin"), &data).unwrap();
    assert_eq!(std::fs::read(reader_a.join("segment.bin")).unwrap(), data);
    // The other mount sees it once JuiceFS metadata says so (attribute cache is 1 s).
    wait_until(Duration::from_secs(10), "node b to see the file", || {
        std::fs::read(reader_b.join("segment.bin")).is_ok_and(|d| d == data)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchdog_remounts_and_rebinds_targets_after_the_juicefs_process_is_killed_and_a_held_target_still_unpublishes()
 {
    heal(Store::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchdog_heals_a_killed_juicefs_on_azurite() {
    heal(Store::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchdog_heals_a_killed_juicefs_on_s3() {
    heal(Store::S3).await;
}

async fn heal(store: Store) {
    let env = Env::with_store("heal", store);
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-heal").await;
    let staging = env.path("staging");
    let (rw, ro) = (env.path("rw"), env.path("ro"));
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &rw, false))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &ro, true))
        .await
        .unwrap();
    std::fs::write(rw.join("before.txt"), b"before").unwrap();

    let pids = juicefs_pids_for(&staging);
    assert!(!pids.is_empty());
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let healed = wait_until(
        Duration::from_secs(30),
        "targets to serve the volume again",
        || {
            std::fs::read(ro.join("before.txt")).is_ok_and(|d| d == b"before")
                && std::fs::write(rw.join("after.txt"), b"after").is_ok()
        },
    )
    .await;
    eprintln!("healed in {healed:?}");
    assert_eq!(std::fs::read(ro.join("after.txt")).unwrap(), b"after");
    assert!(
        std::fs::write(ro.join("x"), b"x").is_err(),
        "ro target is still read-only"
    );
    assert_eq!(
        juicefs_mounts_at(&staging),
        1,
        "dead mount detached, one live mount"
    );
    assert!(juicefs_pids_for(&staging).iter().all(|p| !pids.contains(p)));
    assert!(plugin.metrics().contains("shoal_csi_remounts_total 1"));

    // A process still holds a file in the healed rw target, so a plain unmount is busy:
    // NodeUnpublish retries briefly, then detaches lazily, and succeeds; the holder keeps
    // reading from its open file.
    let mut held = std::fs::File::open(rw.join("before.txt")).unwrap();
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &rw))
        .await
        .unwrap();
    let table = shoal_csi::mountinfo::read_self().unwrap();
    assert!(
        shoal_csi::mountinfo::find(&table, &rw).is_none(),
        "rw target detached"
    );
    assert!(!rw.exists(), "rw target directory removed");
    let mut text = String::new();
    held.read_to_string(&mut text).unwrap();
    assert_eq!(text, "before", "the holder's open file still works");
    drop(held);
    assert!(
        plugin.log_text().contains("detaching lazily"),
        "the busy target was detached lazily"
    );
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &rw))
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &ro))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_plugin_keeps_targets_working_and_never_mounts_twice() {
    let env = Env::new("restart");
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-restart").await;
    let staging = env.path("staging");
    let target = env.path("target");
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    let pids_before = juicefs_pids_for(&staging);

    plugin.kill();
    std::fs::write(target.join("while-down.txt"), b"plugin is down").unwrap();
    plugin.start();
    let mut c = plugin.clients().await;
    assert_eq!(
        std::fs::read(target.join("while-down.txt")).unwrap(),
        b"plugin is down"
    );
    // The CO repeats its calls after a restart: both succeed without new mounts.
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();
    assert_eq!(juicefs_mounts_at(&staging), 1);
    let binds = shoal_csi::mountinfo::read_self()
        .unwrap()
        .iter()
        .filter(|e| e.mount_point == target)
        .count();
    assert_eq!(binds, 1);
    let mut after = juicefs_pids_for(&staging);
    let mut before = pids_before.clone();
    after.sort();
    before.sort();
    assert_eq!(after, before, "the same juicefs processes serve the mount");
    assert!(plugin.log_text().contains("re-adopted staged volumes"));
    c.node
        .node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_values_never_appear_in_plugin_logs_or_errors() {
    let env = Env::new("secrets");
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-sec").await;
    let staging = env.path("staging");
    let target = env.path("target");
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&vol, &staging, &target, false))
        .await
        .unwrap();

    // A wrong Redis password makes juicefs fail; its output must come back scrubbed.
    let mut wrong = stage_req(&env, &vol, &env.path("staging-wrong"));
    wrong.volume_id = "pvc-sec-wrong".into();
    let bad_pw = "wr0ng-Pa55-visible-if-leaked";
    let bad_url = format!("redis://:{bad_pw}@127.0.0.1:{}/1", env.redis.port());
    wrong.secrets.insert("metaurl".into(), bad_url.clone());
    let err = c.node.node_stage_volume(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let mut bad_create = create_req(&env, "pvc-sec-2", 0);
    bad_create.secrets.insert("metaurl".into(), bad_url.clone());
    let err2 = c.controller.create_volume(bad_create).await.unwrap_err();

    c.node
        .node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    let logs = plugin.log_text();
    assert!(logs.contains("NodeStageVolume"), "debug logs were captured");
    let mut secrets = env.secret_values();
    secrets.push(bad_pw.to_string());
    secrets.push(bad_url);
    for s in &secrets {
        assert!(
            !err.message().contains(s.as_str()),
            "error leaks {s}: {}",
            err.message()
        );
        assert!(
            !err2.message().contains(s.as_str()),
            "error leaks {s}: {}",
            err2.message()
        );
        assert!(!logs.contains(s.as_str()), "plugin log leaks {s}");
    }
    // The juicefs mount logs in the state dir never get the password either (META_PASSWORD).
    for entry in std::fs::read_dir(plugin.state_dir.join("logs")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "juicefs log leaks {s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_azure_key_fails_create_and_stage_within_a_minute_with_the_stores_answer_and_no_secret()
 {
    wrong_key_fails_create_and_stage(Store::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_s3_secret_key_fails_create_within_a_minute_with_the_stores_answer_and_no_secret() {
    wrong_key_fails_create_and_stage(Store::S3).await;
}

/// What should hold and does not yet (issue #21): `juicefs mount` takes an S3 filesystem's keys
/// from its metadata (stored by `juicefs format`), not from the environment, so NodeStage of an
/// existing filesystem ignores the Secret's `access-key`/`secret-key`: a wrong key stages fine,
/// and a rotated key never takes effect. juicefs-csi re-runs `juicefs format` with the Secret's
/// keys before mounting; `juicefs config META` (keys from `ACCESS_KEY`/`SECRET_KEY`, storage
/// checked) would do the same here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "open defect: NodeStage ignores the Secret's S3 keys of an existing filesystem"]
async fn a_wrong_s3_secret_key_fails_stage_of_an_existing_filesystem() {
    let mut env = Env::with_store("wrongkeystage", Store::S3);
    env.require_s3_auth();
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let vol = create(&mut c, &env, "pvc-right").await;
    let staging = env.path("staging");
    let mut bad_stage = stage_req(&env, &vol, &staging);
    bad_stage
        .secrets
        .insert("secret-key".into(), "wrong-secret-key-0042-abcdefgh".into());
    let err = c.node.node_stage_volume(bad_stage).await.unwrap_err();
    assert!(err.message().contains("SignatureDoesNotMatch"), "{err:?}");
}

/// A key of the right shape that is not the account's: `CreateVolume` (a new filesystem:
/// `juicefs format` cannot write its test object) and, on Azure, `NodeStageVolume` (an existing
/// one: `--check-storage` refuses it) fail within a minute with the store's own error code, mount
/// nothing, and no credential (right or wrong) shows in an error, the plugin's log or any
/// process's command line.
async fn wrong_key_fails_create_and_stage(store: Store) {
    let mut env = Env::with_store("wrongkey", store);
    if store == Store::S3 {
        // moto accepts any key unless told to check them, as a real S3 does.
        env.require_s3_auth();
    }
    let os = env.object_store.as_ref().unwrap();
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;
    let (wrong_key, wrong_secrets, store_says) = match store {
        Store::Azurite => {
            let key = "V3JvbmdLZXlWaXNpYmxlSWZMZWFrZWRXcm9uZ0tleQ==";
            let envs = serde_json::json!({
                "AZURE_STORAGE_CONNECTION_STRING": os.connection_string_with_key(key)
            })
            .to_string();
            (key, vec![("envs", envs)], "AuthorizationFailure")
        }
        Store::S3 | Store::File => {
            let key = "wrong-secret-key-visible-if-leaked-0042";
            (
                key,
                vec![("secret-key", key.to_string())],
                "SignatureDoesNotMatch",
            )
        }
    };
    let with_wrong = |secrets: &mut std::collections::HashMap<String, String>| {
        for (k, v) in &wrong_secrets {
            secrets.insert(k.to_string(), v.clone());
        }
    };

    let mut bad_create = create_req(&env, "pvc-wrong", 0);
    with_wrong(&mut bad_create.secrets);
    let started = std::time::Instant::now();
    let create_err = c.controller.create_volume(bad_create).await.unwrap_err();
    let create_took = started.elapsed();

    let vol = create(&mut c, &env, "pvc-right").await;
    let staging = env.path("staging");
    eprintln!("create failed in {create_took:?}: {create_err:?}");
    let mut failed = vec![(create_err, create_took)];
    // S3: NodeStage of an existing filesystem does not use the Secret's keys (an open defect,
    // a_wrong_s3_secret_key_fails_stage_of_an_existing_filesystem).
    if store == Store::Azurite {
        let mut bad_stage = stage_req(&env, &vol, &staging);
        with_wrong(&mut bad_stage.secrets);
        let started = std::time::Instant::now();
        let stage_err = c.node.node_stage_volume(bad_stage).await.unwrap_err();
        let stage_took = started.elapsed();
        eprintln!("stage failed in {stage_took:?}: {stage_err:?}");
        failed.push((stage_err, stage_took));
    }
    for (err, took) in &failed {
        let took = *took;
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(
            err.message().contains(store_says),
            "the store's answer is in the error: {err:?}"
        );
        assert!(took < Duration::from_secs(60), "took {took:?}");
    }
    assert_eq!(
        juicefs_mounts_at(&staging),
        0,
        "a refused stage mounts nothing"
    );

    // With the right key the same volume stages, and no process shows a credential.
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    let mut secrets = env.secret_values();
    secrets.push(wrong_key.to_string());
    assert_eq!(command_lines_containing(&secrets), Vec::<String>::new());
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    let logs = plugin.log_text();
    for s in &secrets {
        for (err, _) in &failed {
            assert!(!err.message().contains(s.as_str()), "error leaks {s}");
        }
        assert!(!logs.contains(s.as_str()), "plugin log leaks {s}");
    }
}

#[test]
fn help_text_names_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-csi"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--endpoint",
        "--node-id",
        "--mode",
        "--state-dir",
        "--juicefs",
        "--metrics-listen",
        "--watchdog-interval-ms",
        "--max-volumes-per-node",
        "--mount-mode",
        "--kubelet-dir",
        "--mount-pod-image",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(help.contains("csi.shoal.dev"));
}

/// The controller's own whole-filesystem mounts go with it: on SIGTERM it unmounts them (a busy
/// one by aborting its FUSE connection first) and exits only once its juicefs clients have
/// exited, so a container's teardown never kills a client mid-request (on the real node that
/// left a request waiting forever and the controller pod unkillable).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_controller_releases_its_mounts_and_outlives_its_juicefs_clients() {
    let env = Env::new("release");
    let mut plugin = Plugin::spawn_mode(&env.path("plugin"), "ctrl", "controller");
    let mut c = plugin.clients().await;
    create(&mut c, &env, "pvc-release").await;
    drop(c);
    let controller_dir = plugin.state_dir.join("controller");
    let under = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        shoal_csi::mountinfo::read_self()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(dir))
            .map(|m| m.mount_point)
            .collect()
    };
    let mounts = under(&controller_dir);
    assert_eq!(mounts.len(), 1, "one controller mount: {mounts:?}");
    let root = mounts[0].clone();
    assert!(
        !juicefs_pids_for(&root).is_empty(),
        "no juicefs client serves {}",
        root.display()
    );
    // A file held open in it: a plain unmount fails with EBUSY, the abort path must run.
    std::fs::write(root.join("held"), b"held open").unwrap();
    let mut held = std::fs::File::open(root.join("held")).unwrap();

    let status = tokio::task::block_in_place(|| plugin.stop(Duration::from_secs(30)));
    assert!(status.success(), "{status}\n{}", plugin.log_text());
    // At the moment the controller has exited, its clients are gone and so are its mounts.
    let left = juicefs_pids_for(&root);
    assert!(
        left.is_empty(),
        "juicefs clients {left:?} outlived the controller\n{}",
        plugin.log_text()
    );
    assert!(under(&controller_dir).is_empty(), "controller mounts left");
    assert!(
        plugin.log_text().contains("Aborted"),
        "the busy mount was not aborted:\n{}",
        plugin.log_text()
    );
    // The held file fails at once instead of waiting for a client that is gone.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = tx.send(held.read_to_end(&mut buf).map(|_| buf));
    });
    let read = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a read of the held file hung after the controller left");
    assert!(read.is_err(), "read through a released mount: {read:?}");
}
