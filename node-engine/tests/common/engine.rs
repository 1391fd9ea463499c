//! `shoal-engine` role processes for the multi-process tests: each gets an ops listener on a free
//! loopback port, every wait on it has a deadline, and it is SIGKILLed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One `shoal-engine` process, killed on drop.
pub struct Engine {
    pub name: String,
    pub child: Child,
    /// Base URL of its ops listener (`/readyz`, `/metrics`).
    pub ops: String,
    /// The file its stdout and stderr go to, when not to the test's own output.
    log: Option<PathBuf>,
}

impl Engine {
    /// Starts `shoal-engine ROLE ARGS --metrics-listen 127.0.0.1:<free port>` with
    /// `RUST_LOG=warn`; its stdout is discarded and its stderr goes to the test's.
    pub fn spawn(name: &str, role: &str, args: &[String]) -> Engine {
        Engine::start(name, role, args, None)
    }

    /// As [`Engine::spawn`], with stdin closed and stdout and stderr written to
    /// `logs/NAME.log`, whose last lines a failed wait shows.
    pub fn spawn_logged(name: &str, role: &str, args: &[String], logs: &Path) -> Engine {
        Engine::start(name, role, args, Some(logs.join(format!("{name}.log"))))
    }

    fn start(name: &str, role: &str, args: &[String], log: Option<PathBuf>) -> Engine {
        let port = shoal_testkit::free_port().expect("a free loopback port");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-engine"));
        cmd.arg(role)
            .args(args)
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            // A failing process's output is what the tests read: keep an anyhow backtrace
            // (RUST_BACKTRACE in the caller's environment) from pushing it out of the tail.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0");
        match &log {
            None => cmd.stdout(Stdio::null()).stderr(Stdio::inherit()),
            Some(path) => {
                let f = std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
                let out = f.try_clone().expect("a second handle on the log file");
                cmd.stdin(Stdio::null()).stdout(out).stderr(f)
            }
        };
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Engine {
            name: name.to_string(),
            child,
            ops: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// The last 30 lines of its log file after a newline; empty when it has none.
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(":\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// Wait (bounded) until `/readyz` answers 200; panics at once if the process exits.
    pub async fn ready(&mut self, within: Duration) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the process") {
                panic!(
                    "{} exited with {status} before it was ready{}",
                    self.name,
                    self.log_tail()
                );
            }
            let r = http
                .get(format!("{}/readyz", self.ops))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {within:?}{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait (bounded) for the process to exit.
    pub fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("polling the process") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.ops))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the /metrics body")
    }

    /// Wait (bounded by `within`) until this router's `/metrics` reports `n` live readers.
    pub async fn wait_live_readers(&self, n: usize, within: Duration) {
        let want = format!("shoal_router_readers{{state=\"live\"}} {n}\n");
        let deadline = Instant::now() + within;
        loop {
            let m = self.metrics().await;
            if m.contains(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never had {n} live readers:\n{m}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send SIGTERM to `e` (Kubernetes' stop).
pub fn sigterm(e: &Engine) {
    // Our own child, not reaped yet: its pid cannot have been reused.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(e.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

/// `GET {ops}{path}`: status and body; `None` when nothing answers.
pub async fn get(e: &Engine, path: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", e.ops))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// Wait (bounded) until `GET path` answers `status` with a body containing `needle`; panics
/// at once if the process exits.
pub async fn wait_answer(e: &mut Engine, path: &str, status: u16, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(s) = e.child.try_wait().expect("polling the process") {
            panic!(
                "{} exited with {s} while waiting for {path} to answer {status} {needle:?} (last {last:?}){}",
                e.name,
                e.log_tail()
            );
        }
        last = get(e, path).await;
        if last
            .as_ref()
            .is_some_and(|(s, b)| *s == status && b.contains(needle))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {path} never answered {status} with {needle:?} within {within:?}; last {last:?}{}",
            e.name,
            e.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
