//! CSI driver figures for BENCHMARKS.md ("CSI driver"), printed by the real binary over its
//! socket with real Redis, juicefs and FUSE. Ignored by default (it takes a minute and wants a
//! quiet machine); run:
//!
//! ```text
//! cargo test --release -p shoal-csi --test csi_bench -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = v[v.len() / 2];
    println!(
        "{name}: n={} median={median:.1} ms min={:.1} ms max={:.1} ms",
        v.len(),
        v[0],
        v[v.len() - 1]
    );
}

const FILE_MIB: usize = 256;
const WRITE_ROUNDS: usize = 12;

/// Writes FILE_MIB MiB in 1 MiB blocks and fsyncs; returns MiB/s.
fn write_seq(path: &Path) -> f64 {
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let start = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    for _ in 0..FILE_MIB {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    FILE_MIB as f64 / start.elapsed().as_secs_f64()
}

/// Reads the whole file in 1 MiB blocks; returns MiB/s.
fn read_seq(path: &Path) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, FILE_MIB << 20);
    (total >> 20) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --ignored --nocapture (see the module doc)"]
async fn csi_driver_figures() {
    let env = Env::with_limit("bench", Duration::from_secs(900));
    let mut plugin = Plugin::spawn(&env.path("plugin"), "node-a");
    let mut c = plugin.clients().await;

    // Cold: stage (juicefs format --no-update + juicefs mount) + publish of a fresh volume.
    let mut cold = Vec::new();
    for i in 0..5 {
        let name = format!("pvc-cold-{i}");
        let vol = create_volume(&mut c, &env, &name, 0).await;
        let staging = env.path(&format!("cold/{i}/staging"));
        let target = env.path(&format!("cold/{i}/target"));
        let t = Instant::now();
        c.node
            .node_stage_volume(stage_req(&env, &vol, &staging))
            .await
            .unwrap();
        c.node
            .node_publish_volume(publish_req(&vol, &staging, &target, false))
            .await
            .unwrap();
        cold.push(ms(t.elapsed()));
        c.node
            .node_unpublish_volume(unpublish_req(&vol, &target))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_req(&vol, &staging))
            .await
            .unwrap();
    }
    summary(
        "stage+publish cold (format --no-update + mount + bind)",
        cold,
    );

    // Warm: publish onto an existing stage.
    let vol = create_volume(&mut c, &env, "pvc-warm", 0).await;
    let staging = env.path("warm/staging");
    c.node
        .node_stage_volume(stage_req(&env, &vol, &staging))
        .await
        .unwrap();
    let mut warm = Vec::new();
    for i in 0..20 {
        let target = env.path(&format!("warm/t{i}"));
        let t = Instant::now();
        c.node
            .node_publish_volume(publish_req(&vol, &staging, &target, i % 2 == 1))
            .await
            .unwrap();
        warm.push(ms(t.elapsed()));
    }
    summary("publish warm (bind onto an existing stage)", warm);

    // Throughput: the published target vs the same juicefs mount used directly.
    let target = env.path("warm/t0");
    let direct = staging.join(&vol.volume_id);
    let (mut wt, mut wd, mut rt, mut rd) = (vec![], vec![], vec![], vec![]);
    // Writes: WRITE_ROUNDS rounds in the order t d | d t | t d | ..., so neither path is favoured.
    for round in 0..WRITE_ROUNDS {
        let ft = target.join(format!("seq-t-{round}.bin"));
        let fd = direct.join(format!("seq-d-{round}.bin"));
        if round % 2 == 0 {
            wt.push(write_seq(&ft));
            wd.push(write_seq(&fd));
        } else {
            wd.push(write_seq(&fd));
            wt.push(write_seq(&ft));
        }
        std::fs::remove_file(&ft).unwrap();
        std::fs::remove_file(&fd).unwrap();
    }
    // Reads: one file, read through both paths alternately after a warm-up read, so both see
    // the same cache state (the same inode of the same mount).
    let shared = target.join("seq-read.bin");
    write_seq(&shared);
    let shared_direct = direct.join("seq-read.bin");
    read_seq(&shared_direct);
    for round in 0..10 {
        if round % 2 == 0 {
            rt.push(read_seq(&shared));
            rd.push(read_seq(&shared_direct));
        } else {
            rd.push(read_seq(&shared_direct));
            rt.push(read_seq(&shared));
        }
    }
    std::fs::remove_file(&shared).unwrap();
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "write samples MiB/s: target [{}] direct [{}]",
        fmt(&wt),
        fmt(&wd)
    );
    println!(
        "read samples MiB/s: target [{}] direct [{}]",
        fmt(&rt),
        fmt(&rd)
    );
    // Each round writes through both paths back to back, so the per-round ratio cancels most of
    // the load drift of a shared machine; its median is the figure least moved by that drift.
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    println!(
        "paired per-round ratios (target/direct), median: write {:.3}, read {:.3}",
        paired(&wt, &wd),
        paired(&rt, &rd)
    );
    let (wt, wd, rt, rd) = (median(wt), median(wd), median(rt), median(rd));
    println!(
        "sequential write {FILE_MIB} MiB (1 MiB blocks + fsync), median of {WRITE_ROUNDS}: target {wt:.0} MiB/s, direct {wd:.0} MiB/s, ratio {:.3}",
        wt / wd
    );
    println!(
        "sequential read {FILE_MIB} MiB (1 MiB blocks, same file both ways), median of 10: target {rt:.0} MiB/s, direct {rd:.0} MiB/s, ratio {:.3}",
        rt / rd
    );

    // Heal: kill every juicefs process of the stage; time until the targets serve again.
    std::fs::write(target.join("probe.txt"), b"alive").unwrap();
    let mut heal = Vec::new();
    for _ in 0..3 {
        let pids = juicefs_pids_for(&staging);
        let t = Instant::now();
        for pid in &pids {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        wait_until(Duration::from_secs(60), "heal", || {
            std::fs::read(target.join("probe.txt")).is_ok_and(|d| d == b"alive")
                && (0..20)
                    .all(|i| nix::sys::statvfs::statvfs(&env.path(&format!("warm/t{i}"))).is_ok())
                && juicefs_pids_for(&staging).iter().all(|p| !pids.contains(p))
        })
        .await;
        heal.push(ms(t.elapsed()));
    }
    summary(
        "heal after kill -9 of the juicefs processes (all 20 targets serving again)",
        heal,
    );

    for i in 0..20 {
        c.node
            .node_unpublish_volume(unpublish_req(&vol, &env.path(&format!("warm/t{i}"))))
            .await
            .unwrap();
    }
    c.node
        .node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}
