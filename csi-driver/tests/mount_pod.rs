//! `shoal-csi mount-pod`, what each mount pod runs, for real: the real `juicefs` client, Redis
//! with a password, FUSE. Needs root and /dev/fuse (CI has both). The Kubernetes side of pod
//! mode is tested in `src/mountpod.rs` against an in-memory cluster.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal_csi::mounter::{JuiceFsMounter, MountState, Mounter, juicefs_mount_args};
use shoal_csi::secrets::JuiceFsSecrets;

fn mount_pod(env: &Env, secrets: &JuiceFsSecrets, at: &Path) -> Child {
    let juicefs = shoal_testkit::juicefs_binary().unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.path("mount-pod.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_shoal-csi"))
        .args(["mount-pod", "--mount-point"])
        .arg(at)
        .arg("--")
        .arg(&juicefs)
        .args(juicefs_mount_args(secrets, &env.path("cache"), &[], at))
        // As the pod's Secret provides them, through envFrom.
        .envs(secrets.child_env())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn state(at: &Path) -> MountState {
    let host = JuiceFsMounter::new("juicefs".into(), std::env::temp_dir());
    host.state(at).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_pod_execs_juicefs_in_the_foreground_and_clears_the_dead_mount_of_a_crashed_client() {
    let env = Env::new("mountpod");
    let raw: HashMap<String, String> = env.secrets();
    let secrets = JuiceFsSecrets::from_maps(&raw, &HashMap::new()).unwrap();
    let host = JuiceFsMounter::new(shoal_testkit::juicefs_binary().unwrap(), env.path("state"));
    host.format(&secrets).unwrap();
    let at = env.path("kubelet/plugins/kubernetes.io/csi/csi.shoal.dev/x/globalmount");

    let mut first = mount_pod(&env, &secrets, &at);
    wait_until(
        Duration::from_secs(60),
        "the first client's mount",
        || matches!(state(&at), MountState::Healthy(e) if e.is_juicefs()),
    )
    .await;
    // exec, not a child: the pod's signals reach juicefs itself.
    // (juicefs rewrites its argv into one string.)
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", first.id())).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let joined = argv.join(" ");
    assert!(!joined.contains("mount-pod"), "{argv:?}");
    assert!(joined.contains("juicefs mount"), "{argv:?}");
    std::fs::write(at.join("kept.txt"), b"kept").unwrap();

    // The client crashes (juicefs and the serving process it may fork): the mount is left
    // dead (ENOTCONN).
    for pid in juicefs_pids_for(&at) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    first.wait().unwrap();
    wait_until(Duration::from_secs(10), "the mount to be dead", || {
        matches!(state(&at), MountState::Dead(_))
    })
    .await;

    // The restarted container clears it and mounts again, at the same path, once.
    let mut second = mount_pod(&env, &secrets, &at);
    wait_until(
        Duration::from_secs(60),
        "the second client's mount",
        || matches!(state(&at), MountState::Healthy(e) if e.is_juicefs()),
    )
    .await;
    assert_eq!(juicefs_mounts_at(&at), 1, "the dead mount was detached");
    assert_eq!(std::fs::read(at.join("kept.txt")).unwrap(), b"kept");

    // Deleting the pod sends SIGTERM: juicefs unmounts and exits within the grace period.
    kill(Pid::from_raw(second.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the mount to go", || {
        !matches!(state(&at), MountState::Healthy(_))
    })
    .await;
    assert_eq!(
        state(&at),
        MountState::NotMounted,
        "juicefs unmounts on SIGTERM (exit {status})"
    );
    let log = std::fs::read_to_string(env.path("mount-pod.log")).unwrap();
    for s in env.secret_values() {
        assert!(!log.contains(&s), "mount pod log leaks a secret");
    }
}

#[test]
fn mount_pod_refuses_to_run_without_a_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-csi"))
        .args(["mount-pod", "--mount-point", "/tmp/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
