//! The testkit's Redis and JuiceFS helpers start the real programs and leave nothing behind.
#![allow(clippy::unwrap_used)]

use shoal_testkit::juicefs::is_juicefs_mount;
use shoal_testkit::{JuiceFs, RedisOptions, RedisServer};

#[test]
fn redis_with_a_password_answers_ping_and_is_gone_after_drop() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("pw-for-test".into()),
        appendonly: true,
    })
    .unwrap();
    redis.ping().unwrap();
    assert!(redis.url(2).starts_with("redis://:pw-for-test@127.0.0.1:"));
    let (port, dir) = (redis.port(), redis.dir().to_path_buf());
    drop(redis);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!dir.exists());
}

#[test]
fn juicefs_formats_on_local_storage_mounts_shares_data_and_unmounts_on_drop() {
    shoal_testkit::require_fuse().unwrap();
    let redis = RedisServer::start().unwrap();
    let fs = JuiceFs::format(&redis.url(1), "kitfs").unwrap();
    let a = fs.mount().unwrap();
    let b = fs.mount().unwrap();
    assert!(is_juicefs_mount(a.path()));
    std::fs::write(a.path().join("x.txt"), b"shared").unwrap();
    assert_eq!(std::fs::read(b.path().join("x.txt")).unwrap(), b"shared");
    let path = a.path().to_path_buf();
    drop(a);
    assert!(!is_juicefs_mount(&path));
    drop(b);
    assert!(
        std::fs::read_dir(fs.bucket()).unwrap().next().is_some(),
        "data went to the bucket dir"
    );
}
