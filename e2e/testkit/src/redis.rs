//! A real `redis-server` on a free loopback port, in a temp dir, stopped on drop.
//!
//! Owns only the Redis child process and its directory. Readiness is a real `PING` answered
//! with `+PONG` (and `AUTH` first when a password is set), never a fixed sleep.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestkitError;

/// How to start Redis.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass` (JuiceFS then needs the password in its meta URL or `META_PASSWORD`).
    pub password: Option<String>,
    /// Turn on the append-only file (durable metadata, as production JuiceFS wants).
    pub appendonly: bool,
}

/// A running `redis-server`. Dropping it kills the server and removes its directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Picked below Linux's ephemeral range (32768-60999), so the outgoing connections a test makes
/// (to MariaDB, Redis, its own servers) cannot take it between this call and the server's bind;
/// the start point is spread by pid and time so concurrent test processes rarely try the same.
pub fn free_port() -> Result<u16, TestkitError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + seed.wrapping_add(n.wrapping_mul(4_099)) % SPAN) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(TestkitError::Io {
        action: "find a free port",
        source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port in 20000-32000"),
    })
}

impl RedisServer {
    /// Starts Redis without a password and without persistence.
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts Redis with `opts`, waiting (up to 20 s) until it answers `PING`.
    ///
    /// Errors: [`TestkitError::MissingTool`] when `redis-server` is not installed (run
    /// `make deps`); [`TestkitError::NotReady`] with the server's log when it never answers.
    pub fn start_with(opts: RedisOptions) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-redis-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                action: "create redis dir",
                source,
            })?;
        let mut last_err = None;
        // A port can be taken between probing and binding; try a few fresh ones.
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = Command::new("redis-server");
            cmd.arg("--port")
                .arg(port.to_string())
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .arg("--appendonly")
                .arg(if opts.appendonly { "yes" } else { "no" })
                .arg("--logfile")
                .arg(dir.path().join("redis.log"));
            if let Some(p) = &opts.password {
                cmd.arg("--requirepass").arg(p);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| TestkitError::MissingTool {
                    tool: "redis-server",
                    detail: e.to_string(),
                })?;
            let mut child = child;
            match wait_ready(&mut child, port, opts.password.as_deref(), dir.path()) {
                Ok(()) => {
                    return Ok(RedisServer {
                        child,
                        port,
                        password: opts.password.clone(),
                        dir,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(TestkitError::NotReady {
            what: "redis-server",
            detail: "no attempt made".into(),
        }))
    }

    /// Sends `PING` (after `AUTH` when needed) and expects `+PONG`.
    pub fn ping(&self) -> std::io::Result<()> {
        ping(self.port, self.password.as_deref())
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A JuiceFS meta URL for database `db`, password included when one is set.
    pub fn url(&self, db: u8) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/{db}", self.port),
            None => format!("redis://127.0.0.1:{}/{db}", self.port),
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(
    child: &mut Child,
    port: u16,
    password: Option<&str>,
    dir: &Path,
) -> Result<(), TestkitError> {
    let timeout = Duration::from_secs(20);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(TestkitError::NotReady {
                what: "redis-server",
                detail: format!("exited with {status}: {}", log_tail(dir)),
            });
        }
        if ping(port, password).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestkitError::NotReady {
                what: "redis-server",
                detail: format!("no PONG within {timeout:?}: {}", log_tail(dir)),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping(port: u16, password: Option<&str>) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut cmd = String::new();
    if let Some(p) = password {
        cmd.push_str(&format!("AUTH {p}\r\n"));
    }
    cmd.push_str("PING\r\n");
    s.write_all(cmd.as_bytes())?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if text.contains("+PONG") {
            return Ok(());
        }
        if text.contains("-ERR") || text.contains("-WRONGPASS") || text.contains("-NOAUTH") {
            return Err(std::io::Error::other(format!("unexpected reply {text:?}")));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "connection closed after {text:?}"
            )));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
