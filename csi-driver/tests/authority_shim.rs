//! The real `shoal-csi` binary serving a kubelet-1.24-style client: HTTP/2 frames written by
//! hand with `:authority` set to the socket path, HPACK-encoded the way grpc-go 1.4x does
//! (Huffman strings, literals with incremental indexing, then dynamic-table indexes). Needs no
//! Redis, juicefs or FUSE: only Identity and Node info calls are made.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loona_hpack::huffman::HuffmanDecoder;
use prost::Message;
use shoal_csi::csi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long one test may take before it fails (they take well under a second).
const TEST_LIMIT: Duration = Duration::from_secs(60);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;

/// A `shoal-csi --mode all` process on a socket laid out like the kubelet's plugin dir.
struct Plugin {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Plugin {
    async fn start(extra_args: &[&str]) -> Plugin {
        let dir = tempfile::Builder::new()
            .prefix("shoal-csi-authority-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("plugins/csi.shoal.dev/csi.sock");
        let log_path = dir.path().join("plugin.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "node-a", "--mode", "all"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            // Never run: GetPluginInfo and NodeGetInfo do not touch the filesystem client.
            .args(["--juicefs", "/bin/false", "--metrics-listen", "off"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut plugin = Plugin {
            child,
            socket,
            log: log_path,
            _dir: dir,
        };
        plugin.wait_listening().await;
        plugin
    }

    /// Waits until the socket accepts connections (or the process exits).
    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("shoal-csi exited early with {status}");
            }
            if UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "shoal-csi never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("shoal-csi log:\n{log}");
        }
    }
}

/// RFC 7541 Appendix B codes for the characters of a socket path (letters, digits, `/._-`).
fn huffman_code(c: u8) -> (u32, u32) {
    match c {
        b'0'..=b'2' => (u32::from(c - b'0'), 5),
        b'a' => (0x3, 5),
        b'c' => (0x4, 5),
        b'e' => (0x5, 5),
        b'i' => (0x6, 5),
        b'o' => (0x7, 5),
        b's' => (0x8, 5),
        b't' => (0x9, 5),
        b'-' => (0x16, 6),
        b'.' => (0x17, 6),
        b'/' => (0x18, 6),
        b'3'..=b'9' => (0x19 + u32::from(c - b'3'), 6),
        b'A' => (0x21, 6),
        b'_' => (0x22, 6),
        b'b' => (0x23, 6),
        b'd' => (0x24, 6),
        b'f' => (0x25, 6),
        b'g' => (0x26, 6),
        b'h' => (0x27, 6),
        b'l' => (0x28, 6),
        b'm' => (0x29, 6),
        b'n' => (0x2a, 6),
        b'p' => (0x2b, 6),
        b'r' => (0x2c, 6),
        b'u' => (0x2d, 6),
        b'B'..=b'W' => (0x5d + u32::from(c - b'B'), 7),
        b'Y' => (0x73, 7),
        b'j' => (0x74, 7),
        b'k' => (0x75, 7),
        b'q' => (0x76, 7),
        b'v' => (0x77, 7),
        b'w' => (0x78, 7),
        b'x' => (0x79, 7),
        b'y' => (0x7a, 7),
        b'z' => (0x7b, 7),
        b'X' => (0xfc, 8),
        b'Z' => (0xfd, 8),
        other => panic!("no Huffman code in this test for {:?}", other as char),
    }
}

/// Huffman-encodes `s` (padded with the EOS prefix), checked against the crate's decoder.
fn huffman(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &c in s {
        let (code, len) = huffman_code(c);
        acc = (acc << len) | u64::from(code);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
    assert_eq!(HuffmanDecoder::new().decode(&out).unwrap(), s);
    out
}

fn integer(mut value: usize, prefix_bits: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn raw_string(s: &[u8], out: &mut Vec<u8>) {
    integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

fn huffman_string(s: &[u8], out: &mut Vec<u8>) {
    let h = huffman(s);
    integer(h.len(), 7, 0x80, out);
    out.extend_from_slice(&h);
}

/// The first request's header block as grpc-go 1.4x encodes it: every non-static field a
/// literal with incremental indexing, strings Huffman-coded where that is shorter (here: the
/// socket path). After it the client's dynamic table holds, newest first: te (62),
/// user-agent (63), content-type (64), :authority (65), :path (66).
fn first_request_block(path: &str, authority: &Path) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    integer(4, 6, 0x40, &mut b); // :path, name from the static table
    raw_string(path.as_bytes(), &mut b);
    integer(1, 6, 0x40, &mut b); // :authority, name from the static table
    huffman_string(authority.as_os_str().as_encoded_bytes(), &mut b);
    b.push(0x40);
    raw_string(b"content-type", &mut b);
    raw_string(b"application/grpc", &mut b);
    integer(58, 6, 0x40, &mut b); // user-agent
    raw_string(b"grpc-go/1.40.0", &mut b);
    b.push(0x40);
    raw_string(b"te", &mut b);
    raw_string(b"trailers", &mut b);
    b
}

/// The same request again on the same connection: nothing but table indexes.
fn repeated_request_block() -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    for index in [66, 65, 64, 63, 62] {
        integer(index, 7, 0x80, &mut b);
    }
    b
}

/// An empty protobuf message in a gRPC length-prefixed frame.
const EMPTY_GRPC_MESSAGE: [u8; 5] = [0, 0, 0, 0, 0];

/// What came back on one stream.
#[derive(Debug, Default)]
struct Exchange {
    /// Decoded header blocks: response headers, then trailers.
    header_blocks: Vec<Vec<(String, String)>>,
    data: Vec<u8>,
    reset: Option<u32>,
    goaway: Option<u32>,
}

impl Exchange {
    fn field(&self, name: &str) -> Option<&str> {
        self.header_blocks
            .iter()
            .flatten()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The single gRPC message of a unary response.
    fn message(&self) -> &[u8] {
        assert!(self.data.len() >= 5, "no gRPC message: {self:?}");
        assert_eq!(self.data[0], 0, "uncompressed");
        let len = u32::from_be_bytes(self.data[1..5].try_into().unwrap()) as usize;
        &self.data[5..5 + len]
    }
}

/// A hand-driven HTTP/2 client connection.
struct RawH2 {
    conn: UnixStream,
    /// Tracks the server's HPACK encoder.
    decoder: loona_hpack::Decoder<'static>,
}

impl RawH2 {
    async fn connect(socket: &Path) -> RawH2 {
        let mut conn = UnixStream::connect(socket).await.unwrap();
        conn.write_all(PREFACE).await.unwrap();
        let mut h2 = RawH2 {
            conn,
            decoder: loona_hpack::Decoder::new(),
        };
        h2.write_frame(SETTINGS, 0, 0, &[]).await;
        h2
    }

    async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = len[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.conn.write_all(&f).await.unwrap();
    }

    /// The next frame, `None` at EOF.
    async fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut h = [0u8; 9];
        match self.conn.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("reading a frame: {e}"),
        }
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.conn.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes(h[5..9].try_into().unwrap()) & 0x7fff_ffff;
        Some((h[3], h[4], stream, payload))
    }

    /// Sends one unary gRPC request with `block` as its header block and collects the stream's
    /// response until it ends (END_STREAM, RST_STREAM, GOAWAY or EOF).
    async fn unary(&mut self, stream: u32, block: &[u8]) -> Exchange {
        self.write_frame(HEADERS, END_HEADERS, stream, block).await;
        self.write_frame(DATA, END_STREAM, stream, &EMPTY_GRPC_MESSAGE)
            .await;
        let mut ex = Exchange::default();
        let mut fragment = Vec::new();
        while let Some((kind, flags, id, payload)) = self.read_frame().await {
            match kind {
                SETTINGS if flags & ACK == 0 => self.write_frame(SETTINGS, ACK, 0, &[]).await,
                PING if flags & ACK == 0 => self.write_frame(PING, ACK, 0, &payload).await,
                GOAWAY => {
                    ex.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                    return ex;
                }
                HEADERS | CONTINUATION => {
                    // The server sends neither padding nor priority.
                    fragment.extend_from_slice(&payload);
                    if flags & END_HEADERS != 0 {
                        let fields = self.decoder.decode(&fragment).unwrap();
                        fragment.clear();
                        if id == stream {
                            ex.header_blocks.push(
                                fields
                                    .into_iter()
                                    .map(|(n, v)| {
                                        (
                                            String::from_utf8(n).unwrap(),
                                            String::from_utf8(v).unwrap(),
                                        )
                                    })
                                    .collect(),
                            );
                        }
                    }
                    if id == stream && flags & END_STREAM != 0 {
                        return ex;
                    }
                }
                DATA if id == stream => {
                    ex.data.extend_from_slice(&payload);
                    if flags & END_STREAM != 0 {
                        return ex;
                    }
                }
                RST_STREAM if id == stream => {
                    ex.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                    return ex;
                }
                _ => {}
            }
        }
        ex
    }
}

fn assert_plugin_info(ex: &Exchange) {
    assert_eq!(ex.reset, None, "stream reset: {ex:?}");
    assert_eq!(ex.goaway, None, "connection closed: {ex:?}");
    assert_eq!(ex.field(":status"), Some("200"), "{ex:?}");
    assert_eq!(ex.field("grpc-status"), Some("0"), "{ex:?}");
    let info = csi::GetPluginInfoResponse::decode(ex.message()).unwrap();
    assert_eq!(info.name, shoal_csi::DRIVER_NAME);
    assert_eq!(info.vendor_version, shoal_csi::VERSION);
}

#[tokio::test]
async fn kubelet_1_24_requests_with_the_socket_path_as_authority_succeed_on_one_connection() {
    tokio::time::timeout(TEST_LIMIT, async {
        let plugin = Plugin::start(&[]).await;
        let mut h2 = RawH2::connect(&plugin.socket).await;
        let first = h2
            .unary(
                1,
                &first_request_block("/csi.v1.Identity/GetPluginInfo", &plugin.socket),
            )
            .await;
        assert_plugin_info(&first);
        let second = h2.unary(3, &repeated_request_block()).await;
        assert_plugin_info(&second);
        // A third on the same connection, another service, the authority again from the table.
        // The new :path entry becomes 62 and shifts the others up by one.
        let mut block = vec![0x83, 0x86];
        block.push(0x44);
        block.push(24);
        block.extend_from_slice(b"/csi.v1.Node/NodeGetInfo");
        for index in [66, 65, 64, 63] {
            block.push(0x80 | index);
        }
        let third = h2.unary(5, &block).await;
        assert_eq!(third.field("grpc-status"), Some("0"), "{third:?}");
        let info = csi::NodeGetInfoResponse::decode(third.message()).unwrap();
        assert_eq!(info.node_id, "node-a");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn without_the_shim_h2_resets_a_stream_whose_authority_is_the_socket_path() {
    // Documents why the shim exists. If this starts failing, h2 accepts path authorities
    // (hyperium/h2 PR #487): the shim may go (see the authority_shim module docs).
    tokio::time::timeout(TEST_LIMIT, async {
        let plugin = Plugin::start(&["--no-authority-shim"]).await;
        let mut h2 = RawH2::connect(&plugin.socket).await;
        let ex = h2
            .unary(
                1,
                &first_request_block("/csi.v1.Identity/GetPluginInfo", &plugin.socket),
            )
            .await;
        assert_eq!(ex.reset, Some(PROTOCOL_ERROR), "{ex:?}");
        assert_eq!(ex.field("grpc-status"), None);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_tonic_client_with_a_valid_authority_works_through_the_shim() {
    tokio::time::timeout(TEST_LIMIT, async {
        let plugin = Plugin::start(&[]).await;
        let mut c = common::connect(&plugin.socket).await.unwrap();
        for _ in 0..3 {
            let info = c
                .identity
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.name, shoal_csi::DRIVER_NAME);
        }
        let node = c
            .node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(node.node_id, "node-a");
        let caps = c
            .identity
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            caps.capabilities.len(),
            1,
            "CONTROLLER_SERVICE in --mode all"
        );
    })
    .await
    .unwrap();
}
