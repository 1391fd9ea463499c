//! An HTTP/2 front for the CSI unix socket that replaces a `:authority` the `h2` crate would
//! reject with `localhost`, so kubelets older than 1.26 can use the driver.
//!
//! # Why it exists
//! Kubelets 1.24 and 1.25 (grpc-go 1.4x) dial a CSI plugin with the socket's *path* as the gRPC
//! target, so every request they send carries
//! `:authority: /var/lib/kubelet/plugins/csi.shoal.dev/csi.sock`. `h2`, under hyper and tonic,
//! parses `:authority` as a URI authority and resets any stream whose authority does not parse
//! with `PROTOCOL_ERROR` (hyperium/h2 PR #487 to relax that is unmerged; tonic issue #243). The
//! kubelet then sees every call fail and never registers the driver. Kubernetes 1.26 sends
//! `localhost` instead (kubernetes/kubernetes#112597). The chart supports kubeVersion >= 1.24.
//!
//! # What it does
//! Each accepted connection gets a task that sits between the client and tonic, which serves
//! the other end of an in-process [`tokio::io::duplex`] pair (no second socket). Server→client
//! bytes are copied untouched. Client→server: the connection preface and every frame other than
//! HEADERS/CONTINUATION pass through byte for byte. Each header block (HEADERS plus its
//! CONTINUATION frames) is decoded with an HPACK decoder that tracks the client's dynamic table,
//! size updates included ([`HeaderBlockRewriter`]). While no block has needed a change, blocks
//! are forwarded exactly as received, so h2's decoder sees the client's own encoding and stays
//! in step with it. The first block carrying an `:authority` that [`http::uri::Authority`]
//! refuses switches the connection to re-encoding: from then on every block is re-encoded from
//! its decoded fields as literals without indexing (so h2's dynamic table never changes again
//! and nothing ever refers to it), with that authority replaced by `localhost`. Re-encoded
//! blocks drop HEADERS padding, keep the END_STREAM flag and PRIORITY fields, and are split into
//! CONTINUATION frames of at most 16384 bytes, the smallest SETTINGS_MAX_FRAME_SIZE a server
//! can advertise.
//!
//! A client that breaks the protocol (bad preface, truncated or malformed frame, a header block
//! interrupted by another frame, an undecodable or oversized block, PUSH_PROMISE) has its
//! connection closed, as h2 itself would do with a connection error.
//!
//! # When it can be removed
//! When every supported kubelet is 1.26 or newer (the chart's `kubeVersion` floor is >= 1.26),
//! or when h2 accepts such authorities: then serve tonic on the listener directly, as
//! `--no-authority-shim` already does. The test
//! `without_the_shim_h2_resets_a_stream_whose_authority_is_the_socket_path` in
//! `tests/authority_shim.rs` starts failing once h2 accepts a path authority.
//!
//! Owns: HTTP/2 frame parsing and HPACK rewriting of the client→server byte stream. Must not
//! know gRPC or CSI; it sees HTTP/2 frames and header fields only.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use http::uri::Authority;
use loona_hpack::Decoder;
use loona_hpack::decoder::DecoderError;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream,
};
use tracing::{debug, info, warn};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an invalid `:authority` becomes; kubelet 1.26+ sends the same.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// The most bytes of HEADERS/CONTINUATION frames buffered for one header block; a client
/// sending more has its connection closed. CSI requests carry a few hundred bytes of headers.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;

/// The most bytes of decoded header fields (RFC 7541 sizes: name + value + 32 each) one block
/// may expand to. Bounds memory when a small block indexes large dynamic-table entries.
pub const MAX_HEADER_LIST: usize = 1 << 20;

/// Frame size of re-encoded header frames: the default SETTINGS_MAX_FRAME_SIZE, and the
/// smallest a server may advertise, so it is valid whatever tonic is configured with.
const OUT_MAX_FRAME_SIZE: usize = 16_384;

/// SETTINGS_HEADER_TABLE_SIZE of our server: tonic does not set it, so h2 advertises the
/// protocol default and a client's table size updates may not exceed it.
const SERVER_HEADER_TABLE_SIZE: usize = 4096;

/// Buffer of each direction of the in-process pipe to tonic.
const PIPE_BUFFER: usize = 64 * 1024;

const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Set once the first rewrite in this process has been logged at info level.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// Why a client connection was closed by the front.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// Reading from the client failed.
    #[error("reading from the client failed: {0}")]
    ReadClient(#[source] std::io::Error),
    /// Writing to tonic's end of the pipe failed (tonic closed the connection).
    #[error("forwarding to the gRPC server failed: {0}")]
    WriteServer(#[source] std::io::Error),
    /// The client did not open with the HTTP/2 connection preface.
    #[error("the client did not send the HTTP/2 connection preface")]
    CheckPreface,
    /// The client closed its side in the middle of a frame or a header block.
    #[error("the client closed the connection in the middle of a frame or header block")]
    ReadTruncatedFrame,
    /// A HEADERS frame's padding or priority fields do not fit its payload, or it is on stream 0.
    #[error("malformed HEADERS frame on stream {stream}: {reason}")]
    ParseHeadersFrame { stream: u32, reason: &'static str },
    /// Another frame arrived while a header block still expected CONTINUATION frames.
    #[error(
        "a frame of type {frame_type:#x} on stream {stream} interrupted the header block of \
         stream {open_stream}"
    )]
    ContinueHeaderBlock {
        frame_type: u8,
        stream: u32,
        open_stream: u32,
    },
    /// A CONTINUATION frame arrived with no header block open.
    #[error("CONTINUATION frame on stream {stream} without a preceding HEADERS frame")]
    StartHeaderBlock { stream: u32 },
    /// A header block exceeded [`MAX_HEADER_BLOCK`] or decoded past [`MAX_HEADER_LIST`].
    #[error("the header block of stream {stream} is larger than {limit} bytes")]
    BoundHeaderBlock { stream: u32, limit: usize },
    /// A client sent PUSH_PROMISE, which only servers may send (and which carries a header block
    /// the front would have to track).
    #[error("the client sent PUSH_PROMISE on stream {stream}")]
    RejectPushPromise { stream: u32 },
    /// The HPACK block could not be decoded.
    #[error("decoding the header block of stream {stream} failed: {source}")]
    DecodeHeaderBlock {
        stream: u32,
        #[source]
        source: DecoderError,
    },
}

impl ShimError {
    /// Whether the client broke the protocol (worth a warning), as opposed to an I/O failure or
    /// a peer going away (routine).
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            ShimError::ReadClient(_) | ShimError::WriteServer(_) => false,
            ShimError::CheckPreface
            | ShimError::ReadTruncatedFrame
            | ShimError::ParseHeadersFrame { .. }
            | ShimError::ContinueHeaderBlock { .. }
            | ShimError::StartHeaderBlock { .. }
            | ShimError::BoundHeaderBlock { .. }
            | ShimError::RejectPushPromise { .. }
            | ShimError::DecodeHeaderBlock { .. } => true,
        }
    }
}

/// The 9-byte header of an HTTP/2 frame (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Appends the 9 header bytes. `len` must fit 24 bits (callers pass at most
    /// [`OUT_MAX_FRAME_SIZE`]).
    fn write(&self, out: &mut Vec<u8>) {
        let len = self.len.to_be_bytes();
        out.extend_from_slice(&len[len.len() - 3..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&(self.stream & 0x7fff_ffff).to_be_bytes());
    }
}

/// A header block still waiting for its END_HEADERS frame.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The HPACK fragments so far, padding and priority removed.
    fragment: Vec<u8>,
    /// The frames exactly as received, headers included.
    raw: Vec<u8>,
}

/// Tracks the client's HPACK state across a connection's header blocks and decides, block by
/// block, what to forward. Pure: the async pump feeds it whole HEADERS/CONTINUATION frames.
pub struct HeaderBlockRewriter {
    decoder: Decoder<'static>,
    /// Set by the first rewrite; from then on every block is re-encoded.
    reencoding: bool,
    open: Option<OpenBlock>,
    /// The authority replaced in the last completed block, for logging.
    replaced: Option<Vec<u8>>,
}

impl Default for HeaderBlockRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HeaderBlockRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderBlockRewriter")
            .field("reencoding", &self.reencoding)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl HeaderBlockRewriter {
    /// A rewriter for a new connection (empty dynamic table of the default size).
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(SERVER_HEADER_TABLE_SIZE);
        Self {
            decoder,
            reencoding: false,
            open: None,
            replaced: None,
        }
    }

    /// Whether blocks are being re-encoded (an authority has been replaced on this connection).
    pub fn is_reencoding(&self) -> bool {
        self.reencoding
    }

    /// The stream whose header block awaits CONTINUATION frames, if any.
    fn open_stream(&self) -> Option<u32> {
        self.open.as_ref().map(|b| b.stream)
    }

    /// Bytes buffered for the open block.
    fn buffered(&self) -> usize {
        self.open.as_ref().map_or(0, |b| b.raw.len())
    }

    /// Checks that a frame with this header may come next: while a block is open only a
    /// CONTINUATION of the same stream may; CONTINUATION only while one is open.
    fn check_order(&self, header: &FrameHeader) -> Result<(), ShimError> {
        match (self.open_stream(), header.kind) {
            (Some(open), TYPE_CONTINUATION) if open == header.stream => Ok(()),
            (Some(open_stream), frame_type) => Err(ShimError::ContinueHeaderBlock {
                frame_type,
                stream: header.stream,
                open_stream,
            }),
            (None, TYPE_CONTINUATION) => Err(ShimError::StartHeaderBlock {
                stream: header.stream,
            }),
            (None, _) => Ok(()),
        }
    }

    /// Feeds one HEADERS or CONTINUATION frame (header and whole payload). Returns the bytes
    /// to forward once the block is complete (END_HEADERS), `None` while it is still open.
    ///
    /// Errors: a malformed or out-of-order frame, an oversized or undecodable block. The
    /// connection must be closed then: the decoder's table may no longer match the client's.
    fn push(&mut self, header: FrameHeader, payload: &[u8]) -> Result<Option<Vec<u8>>, ShimError> {
        self.check_order(&header)?;
        let mut raw = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
        header.write(&mut raw);
        raw.extend_from_slice(payload);
        let block = match self.open.take() {
            Some(mut block) => {
                // check_order guarantees this is a CONTINUATION of `block`.
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(&raw);
                block
            }
            None => {
                let (priority, fragment) = split_headers_payload(&header, payload)?;
                OpenBlock {
                    stream: header.stream,
                    end_stream: header.flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    raw,
                }
            }
        };
        if block.raw.len() > MAX_HEADER_BLOCK {
            return Err(ShimError::BoundHeaderBlock {
                stream: block.stream,
                limit: MAX_HEADER_BLOCK,
            });
        }
        if header.flags & FLAG_END_HEADERS == 0 {
            self.open = Some(block);
            return Ok(None);
        }
        self.finish(block).map(Some)
    }

    /// Decodes a complete block and returns what to forward for it.
    fn finish(&mut self, block: OpenBlock) -> Result<Vec<u8>, ShimError> {
        let stream = block.stream;
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        let mut replaced = None;
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    // Keep decoding (the table must stay in step) but stop collecting.
                    return;
                }
                if name.as_ref() == b":authority" && Authority::try_from(value.as_ref()).is_err() {
                    replaced = Some(value.into_owned());
                    fields.push((name.into_owned(), REPLACEMENT_AUTHORITY.to_vec()));
                } else {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|source| ShimError::DecodeHeaderBlock { stream, source })?;
        if list_size > MAX_HEADER_LIST {
            return Err(ShimError::BoundHeaderBlock {
                stream,
                limit: MAX_HEADER_LIST,
            });
        }
        if replaced.is_none() && !self.reencoding {
            return Ok(block.raw);
        }
        self.reencoding = true;
        self.replaced = replaced;
        let encoded = encode_literals(&fields);
        Ok(frame_header_block(
            stream,
            block.end_stream,
            block.priority,
            &encoded,
        ))
    }

    /// The authority replaced in the last completed block, once.
    fn take_replaced(&mut self) -> Option<Vec<u8>> {
        self.replaced.take()
    }
}

/// Splits a HEADERS payload into its PRIORITY fields and its header block fragment, dropping
/// the padding (RFC 9113 §6.2).
fn split_headers_payload<'a>(
    header: &FrameHeader,
    payload: &'a [u8],
) -> Result<(Option<[u8; 5]>, &'a [u8]), ShimError> {
    let malformed = |reason| ShimError::ParseHeadersFrame {
        stream: header.stream,
        reason,
    };
    if header.stream == 0 {
        return Err(malformed("HEADERS on stream 0"));
    }
    let mut body = payload;
    let pad = if header.flags & FLAG_PADDED != 0 {
        let (&pad, rest) = body
            .split_first()
            .ok_or_else(|| malformed("PADDED flag without a pad length"))?;
        body = rest;
        usize::from(pad)
    } else {
        0
    };
    let priority = if header.flags & FLAG_PRIORITY != 0 {
        let (fields, rest) = body
            .split_first_chunk::<5>()
            .ok_or_else(|| malformed("PRIORITY flag without the 5 priority bytes"))?;
        body = rest;
        Some(*fields)
    } else {
        None
    };
    let fragment_len = body
        .len()
        .checked_sub(pad)
        .ok_or_else(|| malformed("padding longer than the frame payload"))?;
    Ok((priority, &body[..fragment_len]))
}

/// Appends an HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1); `first` holds the
/// representation's leading bits.
fn encode_integer(mut value: usize, prefix_bits: u32, first: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        // Fits in the prefix, so it fits in a byte.
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Encodes fields as "literal header field without indexing — new name" with raw (not Huffman)
/// strings (RFC 7541 §6.2.2), so the receiver's dynamic table is neither changed nor used.
fn encode_literals(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        encode_integer(name.len(), 7, 0, &mut out);
        out.extend_from_slice(name);
        encode_integer(value.len(), 7, 0, &mut out);
        out.extend_from_slice(value);
    }
    out
}

/// Frames an encoded block as one HEADERS frame and as many CONTINUATION frames as needed, each
/// at most [`OUT_MAX_FRAME_SIZE`] bytes of payload, without padding.
fn frame_header_block(
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> Vec<u8> {
    let frames = 1 + block.len() / OUT_MAX_FRAME_SIZE;
    let mut out = Vec::with_capacity(block.len() + 5 + (frames + 1) * FRAME_HEADER_LEN);
    let priority_len = priority.map_or(0, |p| p.len());
    let (first, mut rest) = block.split_at(block.len().min(OUT_MAX_FRAME_SIZE - priority_len));
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    FrameHeader {
        len: priority_len + first.len(),
        kind: TYPE_HEADERS,
        flags,
        stream,
    }
    .write(&mut out);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_MAX_FRAME_SIZE));
        rest = tail;
        FrameHeader {
            len: chunk.len(),
            kind: TYPE_CONTINUATION,
            flags: if rest.is_empty() { FLAG_END_HEADERS } else { 0 },
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(chunk);
    }
    out
}

/// Reads a frame header; `None` when the client closed cleanly before its first byte.
async fn read_frame_header<R: AsyncRead + Unpin>(
    client: &mut BufReader<R>,
) -> Result<Option<FrameHeader>, ShimError> {
    let mut bytes = [0u8; FRAME_HEADER_LEN];
    let first = client
        .read(&mut bytes[..1])
        .await
        .map_err(ShimError::ReadClient)?;
    if first == 0 {
        return Ok(None);
    }
    read_exact(client, &mut bytes[1..]).await?;
    Ok(Some(FrameHeader::parse(&bytes)))
}

async fn read_exact<R: AsyncRead + Unpin>(
    client: &mut BufReader<R>,
    buf: &mut [u8],
) -> Result<(), ShimError> {
    match client.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ShimError::ReadTruncatedFrame)
        }
        Err(e) => Err(ShimError::ReadClient(e)),
    }
}

/// Copies `len` payload bytes from the client to the server without buffering the frame.
async fn copy_payload<R, W>(
    client: &mut BufReader<R>,
    server: &mut W,
    mut len: usize,
) -> Result<(), ShimError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while len > 0 {
        let available = client.fill_buf().await.map_err(ShimError::ReadClient)?;
        if available.is_empty() {
            return Err(ShimError::ReadTruncatedFrame);
        }
        let n = available.len().min(len);
        server
            .write_all(&available[..n])
            .await
            .map_err(ShimError::WriteServer)?;
        client.consume(n);
        len -= n;
    }
    Ok(())
}

/// Forwards the client→server direction of one connection: the preface and all frames, header
/// blocks through a [`HeaderBlockRewriter`].
///
/// Guarantees: every frame other than HEADERS/CONTINUATION reaches `server` byte for byte, in
/// order; at most [`MAX_HEADER_BLOCK`] bytes are buffered.
/// Errors: see [`ShimError`]; the caller closes the connection on any of them.
/// Returns `Ok` when the client closes its side between frames.
pub async fn forward_client_to_server<R, W>(client: R, server: &mut W) -> Result<(), ShimError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut client = BufReader::new(client);
    let mut preface = [0u8; PREFACE.len()];
    // A client that connects and leaves without a byte (a liveness check) is not an error.
    if client
        .read(&mut preface[..1])
        .await
        .map_err(ShimError::ReadClient)?
        == 0
    {
        return Ok(());
    }
    read_exact(&mut client, &mut preface[1..]).await?;
    if &preface != PREFACE {
        return Err(ShimError::CheckPreface);
    }
    server
        .write_all(&preface)
        .await
        .map_err(ShimError::WriteServer)?;
    let mut rewriter = HeaderBlockRewriter::new();
    loop {
        if client.buffer().is_empty() {
            server.flush().await.map_err(ShimError::WriteServer)?;
        }
        let Some(header) = read_frame_header(&mut client).await? else {
            return match rewriter.open_stream() {
                None => Ok(()),
                Some(_) => Err(ShimError::ReadTruncatedFrame),
            };
        };
        rewriter.check_order(&header)?;
        match header.kind {
            TYPE_HEADERS | TYPE_CONTINUATION => {
                if rewriter.buffered() + FRAME_HEADER_LEN + header.len > MAX_HEADER_BLOCK {
                    return Err(ShimError::BoundHeaderBlock {
                        stream: header.stream,
                        limit: MAX_HEADER_BLOCK,
                    });
                }
                let mut payload = vec![0u8; header.len];
                read_exact(&mut client, &mut payload).await?;
                if let Some(bytes) = rewriter.push(header, &payload)? {
                    if let Some(authority) = rewriter.take_replaced() {
                        announce(header.stream, &authority);
                    }
                    server
                        .write_all(&bytes)
                        .await
                        .map_err(ShimError::WriteServer)?;
                }
            }
            TYPE_PUSH_PROMISE => {
                return Err(ShimError::RejectPushPromise {
                    stream: header.stream,
                });
            }
            _ => {
                let mut bytes = Vec::with_capacity(FRAME_HEADER_LEN);
                header.write(&mut bytes);
                server
                    .write_all(&bytes)
                    .await
                    .map_err(ShimError::WriteServer)?;
                copy_payload(&mut client, server, header.len).await?;
            }
        }
    }
}

/// Logs a replacement: the first in the process at info (it tells the operator an old kubelet
/// is talking to us), the rest at debug.
fn announce(stream: u32, authority: &[u8]) {
    let authority = String::from_utf8_lossy(authority);
    if ANNOUNCED.swap(true, Ordering::Relaxed) {
        debug!(stream, %authority, "replaced an invalid :authority with localhost");
    } else {
        info!(
            stream,
            %authority,
            "a client (kubelet < 1.26?) sent an :authority h2 rejects; replacing it with \
             localhost (logged once)"
        );
    }
}

/// Runs the front for one connection: client→server through [`forward_client_to_server`],
/// server→client copied as is. Returns when the connection is over; a client that breaks the
/// protocol has both sides closed at once.
pub async fn serve_connection<C, S>(client: C, server: S)
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let upstream = async {
        let outcome = forward_client_to_server(client_read, &mut server_write).await;
        if outcome.is_ok() {
            // The client is done sending: let tonic see EOF, keep delivering its responses.
            let _ = server_write.shutdown().await;
        }
        outcome
    };
    let downstream = async {
        let outcome = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        outcome
    };
    tokio::pin!(upstream, downstream);
    tokio::select! {
        up = &mut upstream => match up {
            Ok(()) => {
                if let Err(e) = downstream.await {
                    debug!("CSI connection: copying responses failed: {e}");
                }
            }
            Err(e) if e.is_protocol_violation() => {
                warn!(error = %e, "closing a CSI client connection that broke HTTP/2");
            }
            Err(e) => debug!(error = %e, "CSI client connection ended"),
        },
        down = &mut downstream => {
            if let Err(e) = down {
                debug!("CSI connection: copying responses failed: {e}");
            }
        }
    }
}

/// Puts the front before tonic for one accepted connection: spawns [`serve_connection`] and
/// returns the in-process stream tonic serves.
pub fn front<C>(client: C) -> DuplexStream
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (for_tonic, for_front) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(serve_connection(client, for_front));
    for_tonic
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUFFMAN_WWW_EXAMPLE_COM: [u8; 12] = [
        0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
    ];
    const SOCKET: &[u8] = b"/var/lib/kubelet/plugins/csi.shoal.dev/csi.sock";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    fn literal_string(s: &[u8], out: &mut Vec<u8>) {
        encode_integer(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }

    /// Literal with incremental indexing, name indexed (RFC 7541 §6.2.1).
    fn indexed_name_incremental(index: usize, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(index, 6, 0x40, &mut out);
        literal_string(value, &mut out);
        out
    }

    /// Literal with incremental indexing, new name.
    fn new_name_incremental(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x40];
        literal_string(name, &mut out);
        literal_string(value, &mut out);
        out
    }

    fn indexed(index: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(index, 7, 0x80, &mut out);
        out
    }

    fn size_update(size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(size, 5, 0x20, &mut out);
        out
    }

    /// A grpc-go style request block: :method POST, :scheme http, :path, :authority (indexed
    /// into the table), content-type.
    fn request_block(authority: &[u8]) -> Vec<u8> {
        [
            indexed(3),
            indexed(6),
            indexed_name_incremental(4, b"/csi.v1.Identity/GetPluginInfo"),
            indexed_name_incremental(1, authority),
            new_name_incremental(b"content-type", b"application/grpc"),
        ]
        .concat()
    }

    async fn pump(input: &[u8]) -> (Result<(), ShimError>, Vec<u8>) {
        let mut out = Vec::new();
        let outcome = forward_client_to_server(input, &mut out).await;
        (outcome, out)
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        for f in frames {
            input.extend_from_slice(f);
        }
        input
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        header: FrameHeader,
        payload: Vec<u8>,
    }

    /// Splits forwarded bytes (after the preface) into frames.
    fn frames_of(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let header = FrameHeader::parse(rest[..FRAME_HEADER_LEN].try_into().unwrap());
            let payload = rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.len].to_vec();
            rest = &rest[FRAME_HEADER_LEN + header.len..];
            frames.push(Frame { header, payload });
        }
        frames
    }

    /// What h2 would decode from the forwarded bytes: header blocks (in order) through one
    /// decoder, as the server's decoder sees them.
    fn server_view(out: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment: Vec<u8> = Vec::new();
        for f in frames_of(out) {
            match f.header.kind {
                TYPE_HEADERS => {
                    let (_, frag) = split_headers_payload(&f.header, &f.payload).unwrap();
                    fragment = frag.to_vec();
                }
                TYPE_CONTINUATION => fragment.extend_from_slice(&f.payload),
                _ => continue,
            }
            if f.header.flags & FLAG_END_HEADERS != 0 {
                let fields = decoder.decode(&fragment).unwrap();
                blocks.push(
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
            }
        }
        blocks
    }

    fn authority_of(block: &[(String, String)]) -> &str {
        &block.iter().find(|(n, _)| n == ":authority").unwrap().1
    }

    #[tokio::test]
    async fn a_client_that_leaves_without_sending_anything_ends_cleanly() {
        let (outcome, out) = pump(b"").await;
        outcome.unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn a_socket_path_authority_is_replaced_with_localhost_and_other_fields_kept() {
        let input = with_preface(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(SOCKET),
        )]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let blocks = server_view(&out);
        assert_eq!(
            blocks,
            vec![vec![
                (":method".into(), "POST".into()),
                (":scheme".into(), "http".into()),
                (":path".into(), "/csi.v1.Identity/GetPluginInfo".into()),
                (":authority".into(), "localhost".into()),
                ("content-type".into(), "application/grpc".into()),
            ]]
        );
    }

    #[tokio::test]
    async fn a_valid_authority_leaves_the_whole_stream_byte_for_byte_untouched() {
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let padded = {
            let mut p = vec![4u8];
            p.extend_from_slice(&request_block(b"localhost"));
            p.extend_from_slice(&[0; 4]);
            p
        };
        let input = with_preface(&[
            settings,
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &padded),
            frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                3,
                &request_block(b"[::1]:50051"),
            ),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn the_rfc_7541_huffman_requests_pass_through_and_decode() {
        // RFC 7541 C.4.1-C.4.3: Huffman strings, incremental indexing, dynamic-table reuse.
        let first = [
            vec![0x82, 0x86, 0x84, 0x41, 0x8c],
            HUFFMAN_WWW_EXAMPLE_COM.to_vec(),
        ]
        .concat();
        let second = [
            vec![0x82, 0x86, 0x84, 0xbe, 0x58, 0x86],
            vec![0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf],
        ]
        .concat();
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        assert_eq!(out, input);
        let blocks = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), "www.example.com");
        assert_eq!(authority_of(&blocks[1]), "www.example.com");
        assert!(blocks[1].contains(&("cache-control".into(), "no-cache".into())));
    }

    #[tokio::test]
    async fn after_a_rewrite_dynamic_table_references_resolve_to_the_clients_entries() {
        // The second request is all indexes into the client's dynamic table, which h2's
        // decoder never saw: the front must resolve them itself.
        let second = [
            indexed(3),
            indexed(6),
            indexed(64),
            indexed(63),
            indexed(62),
        ]
        .concat();
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request_block(SOCKET)),
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 3, &second),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let blocks = server_view(&out);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], blocks[1]);
        assert_eq!(authority_of(&blocks[1]), "localhost");
        let frames = frames_of(&out);
        assert_eq!(frames[1].header.flags, FLAG_END_HEADERS | FLAG_END_STREAM);
    }

    #[tokio::test]
    async fn after_a_rewrite_a_valid_authority_is_kept_in_a_reencoded_block() {
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request_block(SOCKET)),
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                3,
                &request_block(b"localhost:9"),
            ),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let blocks = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), "localhost");
        assert_eq!(authority_of(&blocks[1]), "localhost:9");
    }

    #[tokio::test]
    async fn padding_is_dropped_and_priority_kept_when_a_block_is_rewritten() {
        let mut payload = vec![7u8];
        payload.extend_from_slice(&[0x80, 0, 0, 1, 15]);
        payload.extend_from_slice(&request_block(SOCKET));
        payload.extend_from_slice(&[0; 7]);
        let input = with_preface(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &payload,
        )]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let frames = frames_of(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].header.flags,
            FLAG_END_HEADERS | FLAG_PRIORITY | FLAG_END_STREAM
        );
        assert_eq!(frames[0].payload[..5], [0x80, 0, 0, 1, 15]);
        assert_eq!(authority_of(&server_view(&out)[0]), "localhost");
    }

    #[tokio::test]
    async fn a_block_split_over_continuation_frames_is_reassembled_and_rewritten() {
        let block = request_block(SOCKET);
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(30);
        let input = with_preface(&[
            frame(TYPE_HEADERS, 0, 1, a),
            frame(TYPE_CONTINUATION, 0, 1, b),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
            frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let frames = frames_of(&out);
        assert_eq!(
            frames.len(),
            2,
            "one HEADERS for the small block, then DATA"
        );
        assert_eq!(frames[0].header.kind, TYPE_HEADERS);
        assert_eq!(frames[1].payload, [0, 0, 0, 0, 0]);
        assert_eq!(authority_of(&server_view(&out)[0]), "localhost");
    }

    #[tokio::test]
    async fn a_rewritten_block_over_16384_bytes_is_split_into_continuation_frames() {
        let big = vec![b'x'; 40_000];
        let block = [
            request_block(SOCKET),
            [vec![0x00], {
                let mut s = Vec::new();
                literal_string(b"x-big", &mut s);
                literal_string(&big, &mut s);
                s
            }]
            .concat(),
        ]
        .concat();
        let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
        let mut frames_in = vec![frame(TYPE_HEADERS, 0, 1, chunks[0])];
        for (i, c) in chunks.iter().enumerate().skip(1) {
            let last = i == chunks.len() - 1;
            frames_in.push(frame(
                TYPE_CONTINUATION,
                if last { FLAG_END_HEADERS } else { 0 },
                1,
                c,
            ));
        }
        let (outcome, out) = pump(&with_preface(&frames_in)).await;
        outcome.unwrap();
        let frames = frames_of(&out);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].header.kind, TYPE_HEADERS);
        assert_eq!(frames[0].header.flags & FLAG_END_HEADERS, 0);
        assert_eq!(frames[1].header.kind, TYPE_CONTINUATION);
        assert_eq!(frames[1].header.flags, 0);
        assert_eq!(frames[2].header.flags, FLAG_END_HEADERS);
        assert!(frames.iter().all(|f| f.payload.len() <= OUT_MAX_FRAME_SIZE));
        let blocks = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), "localhost");
        assert!(blocks[0].contains(&("x-big".into(), String::from_utf8(big).unwrap())));
    }

    #[tokio::test]
    async fn a_table_size_update_to_zero_evicts_the_clients_entries() {
        // After the client shrinks its table to 0, index 62 no longer exists.
        let second = [size_update(0), indexed(62)].concat();
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request_block(SOCKET)),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second),
        ]);
        let (outcome, _) = pump(&input).await;
        assert!(
            matches!(
                outcome,
                Err(ShimError::DecodeHeaderBlock {
                    stream: 3,
                    source: DecoderError::HeaderIndexOutOfBounds
                })
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_table_size_update_is_tracked_and_not_forwarded_once_reencoding() {
        // Shrink to 0, grow back, then index the one new entry: it is 62 and it is the path.
        let second = [
            size_update(0),
            size_update(4096),
            indexed(3),
            indexed(6),
            indexed_name_incremental(4, b"/csi.v1.Node/NodeGetInfo"),
            indexed(62),
            indexed_name_incremental(1, SOCKET),
        ]
        .concat();
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request_block(SOCKET)),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second),
        ]);
        let (outcome, out) = pump(&input).await;
        outcome.unwrap();
        let blocks = server_view(&out);
        let fields: Vec<&str> = blocks[1].iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            fields,
            [
                "POST",
                "http",
                "/csi.v1.Node/NodeGetInfo",
                "/csi.v1.Node/NodeGetInfo",
                "localhost"
            ]
        );
        assert_eq!(
            frames_of(&out)[1].payload[0],
            0x00,
            "no size update forwarded"
        );
    }

    #[tokio::test]
    async fn a_table_size_update_above_the_servers_setting_closes_the_connection() {
        let block = [size_update(8192), indexed(2)].concat();
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);
        let (outcome, _) = pump(&input).await;
        assert!(
            matches!(
                outcome,
                Err(ShimError::DecodeHeaderBlock {
                    source: DecoderError::InvalidMaxDynamicSize,
                    ..
                })
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn padding_longer_than_the_payload_closes_the_connection() {
        let input = with_preface(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &[9, 0x82, 0, 0],
        )]);
        let (outcome, _) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::ParseHeadersFrame { stream: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_frame_interrupting_a_header_block_closes_the_connection() {
        let block = request_block(SOCKET);
        let input = with_preface(&[
            frame(TYPE_HEADERS, 0, 1, &block[..10]),
            frame(0x0, 0, 1, &[0; 5]),
        ]);
        let (outcome, out) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::ContinueHeaderBlock {
                frame_type: 0,
                stream: 1,
                open_stream: 1
            })
        ));
        assert_eq!(out, PREFACE, "nothing of the broken block was forwarded");
    }

    #[tokio::test]
    async fn a_continuation_without_headers_closes_the_connection() {
        let input = with_preface(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82])]);
        let (outcome, _) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::StartHeaderBlock { stream: 1 })
        ));
    }

    #[tokio::test]
    async fn a_header_block_over_the_cap_closes_the_connection_before_buffering_it() {
        let mut input = with_preface(&[]);
        FrameHeader {
            len: MAX_HEADER_BLOCK,
            kind: TYPE_HEADERS,
            flags: FLAG_END_HEADERS,
            stream: 1,
        }
        .write(&mut input);
        let (outcome, _) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::BoundHeaderBlock { stream: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_small_block_expanding_past_the_list_cap_closes_the_connection() {
        // One 4000-byte entry, then 300 one-byte references to it: ~1.2 MB decoded.
        let mut block = new_name_incremental(b"x-big", &[b'y'; 4000]);
        for _ in 0..300 {
            block.extend_from_slice(&indexed(62));
        }
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);
        let (outcome, _) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::BoundHeaderBlock {
                limit: MAX_HEADER_LIST,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn garbage_in_a_header_block_closes_the_connection() {
        // A literal whose string length runs past the end of the block.
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x41, 0x7f])]);
        let (outcome, _) = pump(&input).await;
        assert!(matches!(
            outcome,
            Err(ShimError::DecodeHeaderBlock { stream: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_truncated_frame_and_a_bad_preface_close_the_connection() {
        let mut input = with_preface(&[frame(0x0, 0, 1, &[1, 2, 3, 4])]);
        input.truncate(input.len() - 2);
        assert!(matches!(
            pump(&input).await.0,
            Err(ShimError::ReadTruncatedFrame)
        ));
        assert!(matches!(
            pump(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
            Err(ShimError::CheckPreface)
        ));
        assert!(matches!(
            pump(&PREFACE[..10]).await.0,
            Err(ShimError::ReadTruncatedFrame)
        ));
        let input = with_preface(&[frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2])]);
        assert!(matches!(
            pump(&input).await.0,
            Err(ShimError::RejectPushPromise { stream: 1 })
        ));
    }

    #[tokio::test]
    async fn a_client_that_breaks_the_protocol_has_its_connection_closed() {
        let (mut client, for_front) = tokio::io::duplex(4096);
        let (for_tonic, mut tonic) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve_connection(for_front, for_tonic));
        client.write_all(PREFACE).await.unwrap();
        client
            .write_all(&frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]))
            .await
            .unwrap();
        let mut seen = Vec::new();
        // Both ends reach EOF: the front dropped them.
        client.read_to_end(&mut seen).await.unwrap();
        assert!(seen.is_empty());
        let mut forwarded = Vec::new();
        tonic.read_to_end(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, PREFACE);
        task.await.unwrap();
    }

    #[test]
    fn hpack_integers_match_the_rfc_examples_and_decode_across_the_prefix_boundary() {
        // RFC 7541 C.1.1 and C.1.2.
        let mut out = Vec::new();
        encode_integer(10, 5, 0, &mut out);
        assert_eq!(out, [10]);
        out.clear();
        encode_integer(1337, 5, 0, &mut out);
        assert_eq!(out, [31, 154, 10]);
        // String lengths around the 7-bit prefix's limit, decoded by the crate.
        for len in [0, 1, 126, 127, 128, 300, 20_000] {
            let value = vec![b'v'; len];
            let block = encode_literals(&[(b"a".to_vec(), value.clone())]);
            assert_eq!(
                Decoder::new().decode(&block).unwrap(),
                vec![(b"a".to_vec(), value)]
            );
        }
    }
}
