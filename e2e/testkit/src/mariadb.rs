//! A real MariaDB server (`mariadbd`) for tests: its own data directory in a temp dir, listening
//! on a free loopback port, with a database and a password user, killed and removed on drop.
//!
//! The system tables are created once per machine by `mariadb-install-db` into a template
//! directory (installed into a scratch dir and renamed into place, so a half-written template
//! is never used) and copied for each server: that takes milliseconds instead of seconds.
//! Readiness is a condition (a client query succeeds), never a fixed sleep. `restart()` and
//! `kill_and_restart()` bring the same server back on the same port and data, for the
//! "MySQL restarted under load" tests.

use anyhow::{Context, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Database and credentials every test server gets.
pub const DATABASE: &str = "shoal";
pub const USER: &str = "shoal";
pub const PASSWORD: &str = "shoal-test-pw";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `mariadbd`. Dropping it kills the server and deletes its data.
#[derive(Debug)]
pub struct MariaDb {
    child: Option<Child>,
    port: u16,
    datadir: PathBuf,
    // Held for its Drop (removes the directory); declared last so the server dies first.
    dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

fn find_tool(names: &[&str]) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/usr/bin"),
        PathBuf::from("/usr/local/bin"),
    ];
    for name in names {
        for dir in std::env::split_paths(&path).chain(extra.iter().cloned()) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "none of {names:?} found on PATH; install MariaDB with `make deps` (apt-get install mariadb-server)"
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| {
                format!("copying {} to {}", entry.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}

/// The installed system tables for this MariaDB version, created once per machine.
fn template() -> anyhow::Result<PathBuf> {
    let mariadbd = find_tool(&["mariadbd", "mysqld"])?;
    let version = run_ok(
        Command::new(&mariadbd).arg("--version"),
        "mariadbd --version",
    )?;
    let tag: String = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect();
    let dest = std::env::temp_dir().join(format!("shoal-testkit-mariadb-template-{tag}"));
    if dest.join("mysql").is_dir() {
        return Ok(dest);
    }
    let scratch = tempfile::Builder::new()
        .prefix("shoal-testkit-mariadb-install-")
        .tempdir()
        .context("creating a scratch dir for mariadb-install-db")?;
    let data = scratch.path().join("data");
    let install = find_tool(&["mariadb-install-db", "mysql_install_db"])?;
    run_ok(
        Command::new(install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg("--user=root")
            .stdin(Stdio::null()),
        "mariadb-install-db",
    )?;
    // Atomic publish: a concurrent installer may win; either complete copy is fine.
    match std::fs::rename(&data, &dest) {
        Ok(()) => Ok(dest),
        Err(_) if dest.join("mysql").is_dir() => Ok(dest),
        Err(e) => {
            Err(e).with_context(|| format!("publishing the MariaDB template at {}", dest.display()))
        }
    }
}

impl MariaDb {
    /// Start a fresh server and create [`DATABASE`] with [`USER`]/[`PASSWORD`].
    ///
    /// Errors: MariaDB missing (the message says how to install it), or the server did not
    /// accept connections within 60 s (the message carries its error log's tail).
    pub fn start() -> anyhow::Result<Self> {
        let template = template()?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-testkit-mariadb-")
            .tempdir()?;
        let datadir = dir.path().join("data");
        copy_dir(&template, &datadir)?;
        let mut db = MariaDb {
            child: None,
            port: 0,
            datadir,
            dir,
        };
        let mut last_err = None;
        // A port picked free can be taken before mariadbd binds it; try a few.
        for _ in 0..3 {
            db.port = free_port()?;
            match db.spawn_and_wait() {
                Ok(()) => {
                    db.root_sql(&format!(
                        "CREATE DATABASE IF NOT EXISTS {DATABASE}; \
                         CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; \
                         GRANT ALL PRIVILEGES ON {DATABASE}.* TO '{USER}'@'127.0.0.1'; FLUSH PRIVILEGES;"
                    ))?;
                    return Ok(db);
                }
                Err(e) => {
                    db.kill();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("mariadbd did not start")))
    }

    /// `mysql://shoal:PASSWORD@127.0.0.1:PORT/shoal`.
    pub fn url(&self) -> String {
        format!(
            "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let mariadbd = find_tool(&["mariadbd", "mysqld"])?;
        let log = self.dir.path().join("error.log");
        let child = Command::new(mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-name-resolve")
            .arg("--user=root")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--max-connections=300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning mariadbd")?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "mariadbd exited with {status} before accepting connections:\n{}",
                    tail(&log)
                );
            }
            if self.root_sql("SELECT 1").is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd did not accept connections within {READY_TIMEOUT:?}:\n{}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run SQL as root over the unix socket with the `mariadb` client.
    pub fn root_sql(&self, sql: &str) -> anyhow::Result<String> {
        let client = find_tool(&["mariadb", "mysql"])?;
        run_ok(
            Command::new(client)
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .arg("-uroot")
                .arg("--batch")
                .arg("--skip-column-names")
                .arg("-e")
                .arg(sql)
                .stdin(Stdio::null()),
            "mariadb client",
        )
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            // The pid is our own child that we have not reaped yet, so it cannot be reused.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        }
    }

    fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stop the server cleanly (SIGTERM, wait for exit). Clients see connection errors until
    /// [`MariaDb::start_again`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut child) = self.child.take() {
            child.wait().context("waiting for mariadbd to stop")?;
        }
        Ok(())
    }

    /// Start the stopped server again on the same port and data.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("mariadbd is still running");
        }
        self.spawn_and_wait()
    }

    /// Clean shutdown followed by a start on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// `kill -9` followed by a start on the same port and data (InnoDB crash recovery).
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start_again()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mariadb_starts_accepts_the_user_survives_restarts_and_is_removed_on_drop() {
        let mut db = MariaDb::start().unwrap();
        assert!(db.url().starts_with("mysql://shoal:"));
        let pid = db.pid().unwrap();
        db.root_sql("CREATE TABLE shoal.t (id INT PRIMARY KEY); INSERT INTO shoal.t VALUES (1);")
            .unwrap();
        // The password user can log in over TCP (what the engine does).
        let client = find_tool(&["mariadb", "mysql"]).unwrap();
        let tcp_query = |db: &MariaDb| {
            run_ok(
                Command::new(&client)
                    .arg("--no-defaults")
                    .args(["--protocol=TCP", "-h127.0.0.1", &format!("-P{}", db.port())])
                    .args([
                        &format!("-u{USER}"),
                        &format!("-p{PASSWORD}"),
                        "--batch",
                        "--skip-column-names",
                    ])
                    .args(["-e", "SELECT COUNT(*) FROM shoal.t"]),
                "tcp query",
            )
        };
        assert_eq!(tcp_query(&db).unwrap().trim(), "1");
        db.restart().unwrap();
        assert_eq!(tcp_query(&db).unwrap().trim(), "1");
        db.stop().unwrap();
        assert!(tcp_query(&db).is_err(), "server still answers after stop");
        db.start_again().unwrap();
        db.kill_and_restart().unwrap();
        assert_eq!(tcp_query(&db).unwrap().trim(), "1");
        assert_ne!(db.pid().unwrap(), pid);
        let dir = db.dir.path().to_path_buf();
        let pid = db.pid().unwrap();
        drop(db);
        assert!(!dir.exists(), "data dir left behind");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "mariadbd still running"
        );
    }

    #[test]
    fn two_servers_run_side_by_side_on_different_ports() {
        let a = MariaDb::start().unwrap();
        let b = MariaDb::start().unwrap();
        assert_ne!(a.port(), b.port());
        a.root_sql("CREATE TABLE shoal.only_a (id INT)").unwrap();
        assert!(b.root_sql("SELECT * FROM shoal.only_a").is_err());
    }
}
