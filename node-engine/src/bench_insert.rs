//! `shoal-engine bench-insert`: a reproducible REST insert benchmark client. Reads an `.fvecs`
//! file, creates a collection on a running server, streams the rows in fixed-size batches from
//! several connections (so the WAL's group commit is exercised), then times a flush and reports
//! the server's peak RSS (`VmHWM`) against the raw vector bytes. Prints one JSON line.
//!
//! Request bodies are rendered before the clock starts (`render_s` reports how long that took),
//! so on a small machine the client's float formatting does not compete with the server for
//! the CPU it measures; the server's own CPU seconds during the inserts are reported too.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct BenchInsertArgs {
    /// Base vectors (.fvecs).
    #[arg(long)]
    base: PathBuf,
    /// REST address of the server.
    #[arg(long, default_value = "127.0.0.1:19530")]
    addr: SocketAddr,
    /// Collection to (re)create.
    #[arg(long, default_value = "bench_insert")]
    collection: String,
    #[arg(long, default_value = "L2")]
    metric: String,
    /// Rows per insert request.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Use only the first N rows (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Server process id, to report its peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// After the flush, search this many inserted vectors (spread over the data, top-1, FLAT
    /// scans every segment) and report whether each finds itself and the server's peak RSS
    /// again: the memory of a server whose every segment has been searched, not only written.
    #[arg(long, default_value_t = 0)]
    search_after: usize,
}

/// Minimal HTTP/1.1 keep-alive client (POST JSON, read a Content-Length body).
struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self {
            addr,
            reader: BufReader::new(s),
        })
    }

    fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<serde_json::Value> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("HTTP status line {line:?}");
        }
        let mut len = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut buf = vec![0u8; len];
        self.reader.read_exact(&mut buf)?;
        let v: serde_json::Value = serde_json::from_slice(&buf)?;
        if v["code"] != 0 {
            bail!("{path} failed: {v}");
        }
        Ok(v)
    }
}

fn read_fvecs(path: &PathBuf, limit: usize) -> anyhow::Result<(usize, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if bytes.len() < 4 {
        bail!("{} is empty", path.display());
    }
    let dim = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let rec = 4 + dim * 4;
    let mut n = bytes.len() / rec;
    if limit > 0 {
        n = n.min(limit);
    }
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let r = &bytes[i * rec + 4..(i + 1) * rec];
        out.extend(
            r.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok((dim, out))
}

/// A `/proc/<pid>/status` size line (`VmHWM:`, `RssAnon:` ...) in bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// User + system CPU seconds of a process so far (`/proc/<pid>/stat`, clock ticks).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux architecture the project targets.
    Some(ticks as f64 / 100.0)
}

/// One insert request body: `{"collectionName":..,"data":[{"id":i,"vector":[..]},..]}`.
fn render_batch(
    name: &str,
    data: &[f32],
    dim: usize,
    lo: usize,
    hi: usize,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::with_capacity((hi - lo) * (dim * 12 + 24) + 64);
    body.extend_from_slice(b"{\"collectionName\":");
    serde_json::to_writer(&mut body, name)?;
    body.extend_from_slice(b",\"data\":[");
    for i in lo..hi {
        if i > lo {
            body.push(b',');
        }
        write!(body, "{{\"id\":{i},\"vector\":[")?;
        for (j, x) in data[i * dim..(i + 1) * dim].iter().enumerate() {
            if j > 0 {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, x)?;
        }
        body.extend_from_slice(b"]}");
    }
    body.extend_from_slice(b"]}");
    Ok(body)
}

pub fn run(a: BenchInsertArgs) -> anyhow::Result<()> {
    let (dim, data) = read_fvecs(&a.base, a.limit)?;
    let n = data.len() / dim;
    let mut c = Conn::new(a.addr)?;
    let name = &a.collection;
    c.post(
        "/v2/vectordb/collections/drop",
        format!("{{\"collectionName\":\"{name}\"}}").as_bytes(),
    )
    .ok();
    let mut c = Conn::new(a.addr)?;
    c.post(
        "/v2/vectordb/collections/create",
        format!(
            "{{\"collectionName\":\"{name}\",\"dimension\":{dim},\"metricType\":\"{}\"}}",
            a.metric
        )
        .as_bytes(),
    )?;
    // Render every batch body up front (ryu float formatting through serde_json).
    let r0 = Instant::now();
    let batches = n.div_ceil(a.batch);
    let bodies: Vec<Vec<u8>> = (0..batches)
        .map(|b| render_batch(name, &data, dim, b * a.batch, ((b + 1) * a.batch).min(n)))
        .collect::<anyhow::Result<_>>()?;
    let probes: Vec<(usize, Vec<f32>)> = (0..a.search_after.min(n))
        .map(|j| {
            let i = j * (n / a.search_after.min(n).max(1));
            (i, data[i * dim..(i + 1) * dim].to_vec())
        })
        .collect();
    drop(data);
    let render_s = r0.elapsed().as_secs_f64();
    let body_bytes: usize = bodies.iter().map(Vec::len).sum();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = a.server_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..a.connections.max(1))
        .map(|_| {
            let (bodies, next, addr) = (bodies.clone(), next.clone(), a.addr);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut conn = Conn::new(addr)?;
                loop {
                    let b = next.fetch_add(1, Ordering::SeqCst);
                    let Some(body) = bodies.get(b) else {
                        return Ok(());
                    };
                    conn.post("/v2/vectordb/entities/insert", body)?;
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("insert worker panicked"))??;
    }
    let insert_s = started.elapsed().as_secs_f64();
    let server_cpu_s = a
        .server_pid
        .and_then(cpu_seconds)
        .zip(cpu0)
        .map(|(after, before)| after - before);
    let f0 = Instant::now();
    c.post(
        "/v2/vectordb/collections/flush",
        format!("{{\"collectionName\":\"{name}\"}}").as_bytes(),
    )?;
    let flush_s = f0.elapsed().as_secs_f64();
    let stats = c.post(
        "/v2/vectordb/collections/get_stats",
        format!("{{\"collectionName\":\"{name}\"}}").as_bytes(),
    )?;
    let raw = (n * dim * 4) as u64;
    let rss = a.server_pid.and_then(|p| status_bytes(p, "VmHWM:"));
    let rss_anon = a.server_pid.and_then(|p| status_bytes(p, "RssAnon:"));
    let rss_file = a.server_pid.and_then(|p| status_bytes(p, "RssFile:"));
    let mut found = 0usize;
    let s0 = Instant::now();
    for (i, v) in &probes {
        let body = serde_json::json!({"collectionName": name, "data": [v], "limit": 1});
        let r = c.post("/v2/vectordb/entities/search", body.to_string().as_bytes())?;
        if r["data"][0]["id"].as_u64() == Some(*i as u64) {
            found += 1;
        }
    }
    let search_s = s0.elapsed().as_secs_f64();
    let rss_after_search = (!probes.is_empty())
        .then(|| a.server_pid.and_then(|p| status_bytes(p, "VmHWM:")))
        .flatten();
    println!(
        "{}",
        serde_json::json!({
            "rows": n, "dim": dim, "batch": a.batch, "connections": a.connections,
            "render_s": render_s, "body_bytes": body_bytes,
            "insert_s": insert_s, "rows_per_s": n as f64 / insert_s, "flush_s": flush_s,
            "server_cpu_s": server_cpu_s,
            "row_count": stats["data"]["rowCount"],
            "raw_vector_bytes": raw, "server_peak_rss_bytes": rss,
            "rss_over_raw": rss.map(|r| r as f64 / raw as f64),
            "server_rss_anon_bytes_at_end": rss_anon, "server_rss_file_bytes_at_end": rss_file,
            "search_after": probes.len(), "search_after_found_self": found,
            "search_after_s": search_s,
            "server_peak_rss_after_search_bytes": rss_after_search,
            "rss_after_search_over_raw": rss_after_search.map(|r| r as f64 / raw as f64),
            "server_rss_anon_bytes_after_search": rss_after_search.and(a.server_pid.and_then(|p| status_bytes(p, "RssAnon:"))),
            "server_rss_file_bytes_after_search": rss_after_search.and(a.server_pid.and_then(|p| status_bytes(p, "RssFile:"))),
        })
    );
    Ok(())
}
