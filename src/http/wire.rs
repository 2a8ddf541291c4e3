//! A lean HTTP/1.1 client for the requests that wait: long-polls to Synapse.
//!
//! hyper's client gives each connection an 8 KiB head buffer from the start, an 8 KiB read
//! buffer while it waits for the answer (hyper `proto/h1/io.rs`, `INIT_BUFFER_SIZE`) and a task
//! of its own; 5,000 idle `/sync` are 5,000 such connections. Here the request goes out in one
//! write, the wait is `readable()` on the socket with nothing allocated, the answer is read in
//! the caller's task, and only its arrival allocates. An idle connection kept for reuse is a
//! bare socket.
//!
//! Framing follows RFC 9112: the answer's body is delimited by `Transfer-Encoding: chunked`
//! (§7.1), `Content-Length` (§6.2) or the connection's close (§6.3); answers to HEAD and
//! 1xx/204/304 answers have none (§6.3 rule 1).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version, request};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Body, BoxError};

/// Request bodies up to this size are read before the request goes out, so that a request
/// on a reused connection that Synapse had closed can be sent again; larger ones stream, on
/// a fresh connection. Sliding-sync bodies (MSC4186) are a few KiB.
const REPLAYABLE_BODY: usize = 64 * 1024;
/// The most an answer's head may take (Synapse's are well under 2 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// The most one chunk-size or trailer line may take (RFC 9112 §7.1.1 sets no limit).
const MAX_LINE: usize = 4096;
/// How much is read from the socket at a time once the answer is there.
const READ_SIZE: usize = 8 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("talking to the upstream: {0}")]
    Io(#[from] io::Error),
    /// The client's request body failed (it broke off, or grew past the body limit).
    #[error("reading the request body: {0}")]
    Body(BoxError),
    #[error("the upstream closed the connection before it answered")]
    Closed,
    #[error("the upstream's answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("the upstream did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Connections to one upstream, with up to `max_idle` idle ones kept for reuse.
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
    max_idle: usize,
}

impl Pool {
    pub fn new(addr: SocketAddr, max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    /// Sends the request and returns the answer once its head is in, or
    /// [`Error::TimedOut`] when that takes longer than `head_timeout` after the request was
    /// sent in full. The answer's body reads from the connection as it is polled. With
    /// `resend`, a request that meets a kept connection closing under it goes again on a new
    /// one; the caller says whether the request may be repeated.
    pub async fn send(
        self: &Arc<Self>,
        parts: request::Parts,
        body: Body,
        head_timeout: Duration,
        resend: bool,
    ) -> Result<Response<Body>, Error> {
        let mut outgoing = Outgoing::read(body).await?;
        let head = encode_head(&parts, &outgoing);
        let head_only = parts.method == Method::HEAD;
        drop(parts);
        // A body that cannot be sent again goes on a fresh connection. A request that may go
        // again skips the probe (a syscall per request): a closed connection is found by the
        // exchange itself, and the request resent.
        let mut stream = if outgoing.replayable() {
            self.checkout(!resend)
        } else {
            None
        };
        loop {
            let reused = stream.is_some();
            let s = match stream.take() {
                Some(s) => s,
                None => self.connect().await?,
            };
            match self
                .exchange(s, &head, &mut outgoing, head_only, head_timeout)
                .await
            {
                // A kept connection closed under the request (Synapse closed it while idle, or
                // went away): once more on a new one, when the caller says the request may be
                // repeated (RFC 9110 §9.2.2).
                Err(Error::Closed | Error::Io(_)) if reused && resend && outgoing.replayable() => {
                    continue;
                }
                r => return r,
            }
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        mut s: TcpStream,
        head: &[u8],
        outgoing: &mut Outgoing,
        head_only: bool,
        head_timeout: Duration,
    ) -> Result<Response<Body>, Error> {
        outgoing.write(&mut s, head).await?;
        let (parts, buf, framing) = tokio::time::timeout(head_timeout, read_head(&s, head_only))
            .await
            .map_err(|_| Error::TimedOut(head_timeout))??;
        let reusable = parts.version == Version::HTTP_11
            && !framing.until_close()
            && !connection_close(&parts.headers);
        let mut body = Answer {
            stream: Some(s),
            buf,
            framing,
            pool: reusable.then(|| self.clone()),
        };
        if framing == Framing::Length(0) {
            body.finish(); // no body to wait for; no reader will poll it
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// An idle connection, if there is one; with `probe`, one that still looks open.
    fn checkout(&self, probe: bool) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap();
        while let Some(s) = idle.pop() {
            if !probe {
                return Some(s);
            }
            // Open and quiet: reading would block. EOF or stray bytes: Synapse closed it or
            // broke framing; either way it is not reused.
            if matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            {
                return Some(s);
            }
        }
        None
    }

    fn checkin(&self, s: TcpStream) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push(s);
        }
    }

    async fn connect(&self) -> Result<TcpStream, Error> {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| Error::Connect(self.addr, io::ErrorKind::TimedOut.into()))?
            .map_err(|e| Error::Connect(self.addr, e))?;
        s.set_nodelay(true)
            .map_err(|e| Error::Connect(self.addr, e))?;
        Ok(s)
    }
}

/// The request body: read whole when small (and then sent again if need be), else streamed
/// after what was read of it, with the length the client declared if it did.
enum Outgoing {
    Whole(Bytes),
    Streaming {
        read: Bytes,
        rest: Option<Body>,
        /// The client's Content-Length (Synapse's media upload refuses a body without one:
        /// 411), else None and the body goes chunked.
        declared: Option<u64>,
    },
}

impl Outgoing {
    async fn read(mut body: Body) -> Result<Outgoing, Error> {
        if body.is_end_stream() {
            return Ok(Outgoing::Whole(Bytes::new()));
        }
        let declared = body.size_hint().exact();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(Error::Body)?.into_data() {
                buf.extend_from_slice(&data);
                if buf.len() > REPLAYABLE_BODY {
                    return Ok(Outgoing::Streaming {
                        read: buf.freeze(),
                        rest: Some(body),
                        declared,
                    });
                }
            }
        }
        Ok(Outgoing::Whole(buf.freeze()))
    }

    fn replayable(&self) -> bool {
        matches!(self, Outgoing::Whole(_))
    }

    /// Writes the head and the body. A streamed body of unknown length goes chunked
    /// (RFC 9112 §7.1).
    async fn write(&mut self, s: &mut TcpStream, head: &[u8]) -> Result<(), Error> {
        match self {
            Outgoing::Whole(body) if body.is_empty() => s.write_all(head).await?,
            Outgoing::Whole(body) => {
                let mut out = Vec::with_capacity(head.len() + body.len());
                out.extend_from_slice(head);
                out.extend_from_slice(body);
                s.write_all(&out).await?;
            }
            Outgoing::Streaming {
                read,
                rest,
                declared,
            } => {
                let chunked = declared.is_none();
                s.write_all(head).await?;
                write_data(s, read, chunked).await?;
                let mut body = rest.take().ok_or(Error::Closed)?;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.map_err(Error::Body)?.into_data() {
                        write_data(s, &data, chunked).await?;
                    }
                }
                if chunked {
                    s.write_all(b"0\r\n\r\n").await?;
                }
            }
        }
        Ok(())
    }
}

/// Body bytes, as they are or as one chunk.
async fn write_data(s: &mut TcpStream, data: &[u8], chunked: bool) -> io::Result<()> {
    if !chunked {
        return s.write_all(data).await;
    }
    write_chunk(s, data).await
}

async fn write_chunk(s: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(()); // a zero-size chunk would end the body
    }
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    s.write_all(&out).await
}

/// The request line and header section (RFC 9112 §3, §5), with the body's framing: the
/// client's own Content-Length or Transfer-Encoding is replaced by ours.
fn encode_head(parts: &request::Parts, body: &Outgoing) -> Vec<u8> {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        // A GET without a body says nothing of one (RFC 9110 §8.6: a user agent should not
        // send Content-Length when there is no content and the method defines no meaning
        // for it).
        Outgoing::Whole(b) if b.is_empty() && !method_has_body(&parts.method) => {}
        Outgoing::Whole(b) => {
            out.extend_from_slice(format!("content-length: {}\r\n", b.len()).as_bytes())
        }
        Outgoing::Streaming {
            declared: Some(n), ..
        } => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Outgoing::Streaming { declared: None, .. } => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn method_has_body(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

fn connection_close(headers: &http::HeaderMap) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("close"))
}

/// The options a Connection field lists (RFC 9110 §7.6.1), trimmed.
pub fn connection_tokens(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Waits for the answer without a buffer, then reads and parses its head. Returns the head,
/// what was read past it, and how the body is delimited. Interim answers (1xx) are skipped.
async fn read_head(
    s: &TcpStream,
    head_only: bool,
) -> Result<(http::response::Parts, BytesMut, Framing), Error> {
    let mut buf = BytesMut::new();
    loop {
        s.readable().await?;
        if buf.capacity() - buf.len() < READ_SIZE / 2 {
            buf.reserve(READ_SIZE);
        }
        match s.try_read_buf(&mut buf) {
            Ok(0) if buf.is_empty() => return Err(Error::Closed),
            Ok(0) => return Err(Error::Malformed("the connection closed inside the head")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
        while let Some(parts) = parse_head(&mut buf)? {
            if parts.status.is_informational() {
                if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Malformed("101 to a request that asked no upgrade"));
                }
                continue;
            }
            let framing = Framing::of(&parts, head_only)?;
            return Ok((parts, buf, framing));
        }
        if buf.len() > MAX_HEAD {
            return Err(Error::Malformed("the head is larger than 64 KiB"));
        }
    }
}

/// A complete head at the start of `buf`, taken off it; None if more is needed. The header
/// values share the bytes read (no copy per field, as hyper does).
fn parse_head(buf: &mut BytesMut) -> Result<Option<http::response::Parts>, Error> {
    let len = match httparse::Response::new(&mut [httparse::EMPTY_HEADER; 100]).parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Error::Malformed("the head does not parse")),
    };
    let head = buf.split_to(len).freeze();
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut r = httparse::Response::new(&mut headers);
    // The same bytes again, now that they are shared: complete.
    r.parse(&head)
        .map_err(|_| Error::Malformed("the head does not parse"))?;
    let mut resp = Response::new(());
    *resp.status_mut() = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Malformed("bad status code"))?;
    *resp.version_mut() = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let map = resp.headers_mut();
    map.reserve(r.headers.len());
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
            .map_err(|_| Error::Malformed("bad header value"))?;
        map.append(name, value);
    }
    Ok(Some(resp.into_parts().0))
}

/// How the answer's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Framing {
    fn of(parts: &http::response::Parts, head_only: bool) -> Result<Framing, Error> {
        let s = parts.status;
        if head_only || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
            return Ok(Framing::Length(0));
        }
        let h = &parts.headers;
        if let Some(te) = h.get_all(header::TRANSFER_ENCODING).iter().next_back() {
            // Chunked must come last; any other final coding is delimited by the close.
            let last = te.to_str().ok().and_then(|v| v.rsplit(',').next());
            return Ok(match last.map(str::trim) {
                Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunked::Size),
                _ => Framing::UntilClose,
            });
        }
        let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
        match lengths.next() {
            None => Ok(Framing::UntilClose),
            Some(first) => {
                if lengths.any(|v| v != first) {
                    return Err(Error::Malformed("differing Content-Length values"));
                }
                first
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .map(Framing::Length)
                    .ok_or(Error::Malformed("bad Content-Length"))
            }
        }
    }

    fn until_close(self) -> bool {
        self == Framing::UntilClose
    }
}

/// Where a chunked body's decoder stands (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines (dropped) up to an empty line.
    Trailer,
    Done,
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    /// More bytes are needed from the socket.
    More,
    Done,
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    // chunk-size [ chunk-ext ]: the extensions are ignored (§7.1.1).
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(|s| s.trim_matches([' ', '\t']))
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(Error::Malformed("bad chunk size"))?;
                    *self = if size == 0 {
                        Chunked::Trailer
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Malformed("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailer => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        *self = Chunked::Done;
                    }
                }
                Chunked::Done => return Ok(Decoded::Done),
            }
        }
    }
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let line = buf.split_to(i).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(Error::Malformed("a chunk line is too long")),
        None => Ok(None),
    }
}

/// The answer's body, read from the connection as it is polled. Once it is read in full the
/// connection goes back to the pool, if it may be reused.
struct Answer {
    stream: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    /// Where the connection goes when done; None when it must close.
    pool: Option<Arc<Pool>>,
}

impl Answer {
    /// Reads more from the socket into `buf`; Ok(0) at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(s) = &self.stream else {
            return Poll::Ready(Ok(0));
        };
        loop {
            ready!(s.poll_read_ready(cx))?;
            self.buf.reserve(READ_SIZE);
            match s.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// The body is read in full.
    fn finish(&mut self) {
        let stream = self.stream.take();
        if let (Some(s), Some(pool)) = (stream, self.pool.take()) {
            // Bytes past the body would be the start of no answer we asked for.
            if self.buf.is_empty() {
                pool.checkin(s);
            }
        }
        self.buf = BytesMut::new();
    }

    /// The body broke off: the connection closes (its framing is lost), and `e` is the
    /// reader's error.
    fn fail(&mut self, e: Error) -> BoxError {
        self.pool = None;
        self.finish();
        e.into()
    }

    /// Whether the body holds no more data: a sized body is read in full, or what is
    /// buffered of a chunked one is only its end (the CRLF, the last chunk, the trailer).
    /// Synapse answers chunked and sends that end with the data, so an h2 client gets
    /// END_STREAM on the DATA frame rather than in an empty frame of its own: one TLS
    /// record and one write fewer per answer (RFC 9113 §8.1).
    fn only_end_left(&mut self) -> bool {
        match &mut self.framing {
            Framing::Length(left) => *left == 0,
            Framing::Chunked(state @ Chunked::DataEnd) if self.buf.len() <= MAX_LINE => {
                // Decode a copy, so that a next chunk's data stays where it is.
                let (mut probe, mut rest) = (*state, self.buf.clone());
                let done = matches!(probe.step(&mut rest), Ok(Decoded::Done));
                if done {
                    (*state, self.buf) = (probe, rest);
                }
                done
            }
            _ => false,
        }
    }

    fn next(&mut self) -> Result<Decoded, Error> {
        match &mut self.framing {
            Framing::Length(0) => Ok(Decoded::Done),
            Framing::Length(left) => {
                if self.buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = self
                    .buf
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok(Decoded::Data(self.buf.split_to(n).freeze()))
            }
            Framing::Chunked(state) => state.step(&mut self.buf),
            Framing::UntilClose => Ok(if self.buf.is_empty() {
                Decoded::More
            } else {
                Decoded::Data(self.buf.split().freeze())
            }),
        }
    }
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.stream.is_none() && this.buf.is_empty() {
                return Poll::Ready(None);
            }
            match this.next() {
                Ok(Decoded::Data(d)) => {
                    // The last data: done now, since a reader that trusts `is_end_stream`
                    // polls no more.
                    if this.only_end_left() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.framing.until_close() => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(this.fail(Error::Closed)))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e.into())))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Length(0) || self.stream.is_none() && self.buf.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, Error> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            match state.step(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Done => return Ok(out),
                Decoded::More if rest.is_empty() => return Err(Error::Closed),
                Decoded::More => {
                    let n = split.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";
        for split in [1, 2, 3, 7, 1000] {
            assert_eq!(
                decode_all(wire, split).unwrap(),
                b"hello 0123456789",
                "split {split}"
            );
        }
    }

    #[test]
    fn malformed_chunks_are_errors_not_guesses() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(
                matches!(decode_all(bad, 1000), Err(Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'1'; MAX_LINE + 10];
        assert!(matches!(
            decode_all(&long, 10_000),
            Err(Error::Malformed(_))
        ));
    }

    /// An answer whose remaining bytes are all in `buf` already.
    fn buffered(framing: Framing, bytes: &[u8]) -> Answer {
        Answer {
            stream: None,
            buf: BytesMut::from(bytes),
            framing,
            pool: None,
        }
    }

    /// The data frames up to the one after which `is_end_stream` holds, and whether it did.
    fn frames_until_end(mut body: Answer) -> (Vec<Bytes>, bool) {
        use hyper::body::Body;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut frames = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            frames.push(frame.into_data().unwrap());
            if body.is_end_stream() {
                return (frames, true);
            }
        }
        (frames, false)
    }

    #[test]
    fn the_last_data_frame_already_ends_the_body() {
        let chunked = || Framing::Chunked(Chunked::Size);
        let (frames, ended) = frames_until_end(buffered(chunked(), b"5\r\nhello\r\n0\r\n\r\n"));
        assert_eq!((frames, ended), (vec![Bytes::from("hello")], true));
        let trailer = b"5\r\nhello\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        let (frames, ended) = frames_until_end(buffered(chunked(), trailer));
        assert_eq!(frames, [Bytes::from("hello"), Bytes::from("abc")]);
        assert!(ended, "the trailer is part of the end");
        // The end has not arrived yet: the data goes out, and the stream stays open.
        let (frames, ended) = frames_until_end(buffered(chunked(), b"5\r\nhello\r\n0\r\n"));
        assert_eq!((frames, ended), (vec![Bytes::from("hello")], false));
        let (frames, ended) = frames_until_end(buffered(Framing::Length(5), b"hello"));
        assert_eq!((frames, ended), (vec![Bytes::from("hello")], true));
    }

    fn head(raw: &str) -> (http::response::Parts, usize) {
        let mut buf = BytesMut::from(raw);
        let parts = parse_head(&mut buf).unwrap().unwrap();
        (parts, raw.len() - buf.len())
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let f = |raw: &str, head_only| Framing::of(&head(raw).0, head_only).unwrap();
        let cl = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(f(cl, false), Framing::Length(12));
        assert_eq!(f(cl, true), Framing::Length(0));
        assert_eq!(
            f(
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Framing::Length(0)
        );
        // Transfer-Encoding wins over Content-Length (§6.3 rule 3).
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Framing::Chunked(Chunked::Size)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Framing::UntilClose
        );
        assert_eq!(f("HTTP/1.0 200 OK\r\n\r\n", false), Framing::UntilClose);
        let two = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").0;
        assert!(matches!(Framing::of(&two, false), Err(Error::Malformed(_))));
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(parse_head(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 25, "a partial head stays where it is");
        let (parts, len) = head("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nbody");
        assert_eq!((parts.headers["x-a"].as_bytes(), len), (&b"1"[..], 27));
    }

    #[test]
    fn the_head_keeps_the_clients_fields_and_frames_the_body_itself() {
        let (mut parts, ()) = http::Request::post("/_matrix/client/unstable/x/sync?timeout=30000")
            .header("host", "matrix.example.com")
            .header("authorization", "Bearer t")
            .header("content-length", "999")
            .body(())
            .unwrap()
            .into_parts();
        let head = encode_head(&parts, &Outgoing::Whole(Bytes::from_static(b"{}")));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /_matrix/client/unstable/x/sync?timeout=30000 HTTP/1.1\r\n\
             host: matrix.example.com\r\nauthorization: Bearer t\r\ncontent-length: 2\r\n\r\n"
        );
        parts.method = Method::GET;
        let head = encode_head(&parts, &Outgoing::Whole(Bytes::new()));
        assert!(!String::from_utf8(head).unwrap().contains("content-length"));
    }
}
