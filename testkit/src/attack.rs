//! Hostile clients, for the tests and the measurement of the abuse limits:
//! a raw HTTP/2 client that opens streams and never sends their bodies
//! (ignoring the server's stream limit, as an attacker would), or sends
//! them and then never reads the answers, from any loopback address; and
//! raw HTTP/1.1 helpers.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    sync::mpsc,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
/// RST_STREAM error code for a stream refused before any processing.
pub const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK header block of literals (no indexing, no Huffman): every stream
/// can send the same bytes.
fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        // The length as an HPACK integer with a 7-bit prefix (RFC 7541 5.1).
        let mut len = s.len();
        if len < 127 {
            out.push(len as u8);
        } else {
            out.push(127);
            len -= 127;
            while len >= 128 {
                out.push((len % 128) as u8 | 0x80);
                len /= 128;
            }
            out.push(len as u8);
        }
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        string(&mut out, name);
        string(&mut out, value);
    }
    out
}

/// What the server did with the streams of one [`H2Flood`] connection.
#[derive(Default)]
pub struct H2Counts {
    /// SETTINGS_MAX_CONCURRENT_STREAMS, once the server's SETTINGS arrived.
    pub advertised_max_streams: AtomicU32,
    pub settings_seen: AtomicBool,
    /// Streams reset by the server, and how many of them as REFUSED_STREAM.
    pub reset: AtomicUsize,
    pub refused: AtomicUsize,
    /// Streams answered (response headers received).
    pub answered: AtomicUsize,
    /// The server sent GOAWAY, or closed the connection.
    pub goaway: AtomicBool,
    pub closed: AtomicBool,
}

/// One HTTP/2 connection (prior knowledge, no TLS) that opens streams and
/// never sends a byte of their bodies.
pub struct H2Flood {
    pub counts: Arc<H2Counts>,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    next_stream: u32,
    block: Vec<u8>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl H2Flood {
    /// Connects and sends the preface; streams go to `path` with `headers`
    /// besides the pseudo-headers and gRPC's own.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<H2Flood> {
        Self::connect_from(None, addr, path, headers, None).await
    }

    /// As [`H2Flood::connect`], from the local address `from` (any of
    /// 127.0.0.0/8 on loopback: each counts as its own client), announcing
    /// `window` as every stream's flow-control window (0: a client that
    /// reads no response data at all).
    pub async fn connect_from(
        from: Option<IpAddr>,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        window: Option<u32>,
    ) -> std::io::Result<H2Flood> {
        let stream = match from {
            None => TcpStream::connect(addr).await?,
            Some(from) => {
                let socket = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(from, 0))?;
                socket.connect(addr).await?
            }
        };
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        let (writer, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let counts = Arc::new(H2Counts::default());
        let writing = tokio::spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let reading = {
            let (counts, writer) = (counts.clone(), writer.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 9];
                loop {
                    if read.read_exact(&mut head).await.is_err() {
                        counts.closed.store(true, Ordering::Release);
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        counts.closed.store(true, Ordering::Release);
                        return;
                    }
                    match kind {
                        SETTINGS if flags & ACK == 0 => {
                            for setting in payload.chunks_exact(6) {
                                let id = u16::from_be_bytes([setting[0], setting[1]]);
                                let value =
                                    u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                                if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                                    counts.advertised_max_streams.store(value, Ordering::Release);
                                }
                            }
                            counts.settings_seen.store(true, Ordering::Release);
                            let _ = writer.send(frame(SETTINGS, ACK, 0, &[]));
                        }
                        PING if flags & ACK == 0 => {
                            let _ = writer.send(frame(PING, ACK, 0, &payload));
                        }
                        RST_STREAM => {
                            counts.reset.fetch_add(1, Ordering::AcqRel);
                            if payload.len() == 4
                                && u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                                    == REFUSED_STREAM
                            {
                                counts.refused.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        HEADERS => {
                            // Response headers, or trailers (END_STREAM):
                            // count the first of each stream only roughly, by
                            // counting header frames without END_STREAM plus
                            // trailers-only answers.
                            counts.answered.fetch_add(1, Ordering::AcqRel);
                        }
                        GOAWAY => counts.goaway.store(true, Ordering::Release),
                        DATA => {}
                        _ => {}
                    }
                }
            })
        };
        let mut bytes = PREFACE.to_vec();
        let mut settings = Vec::new();
        if let Some(window) = window {
            settings.extend_from_slice(&SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes());
            settings.extend_from_slice(&window.to_be_bytes());
        }
        bytes.extend(frame(SETTINGS, 0, 0, &settings));
        writer.send(bytes).map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        let mut all = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "storegate"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        all.extend_from_slice(headers);
        Ok(H2Flood {
            counts,
            writer,
            next_stream: 1,
            block: header_block(&all),
            tasks: vec![writing, reading],
        })
    }

    /// Waits until the server's SETTINGS have arrived (or `timeout`).
    pub async fn settings(&self, timeout: Duration) -> Option<u32> {
        let started = std::time::Instant::now();
        while !self.counts.settings_seen.load(Ordering::Acquire) {
            if started.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(self.counts.advertised_max_streams.load(Ordering::Acquire))
    }

    /// Opens `n` more streams whose request bodies never come.
    pub fn open_stalled(&mut self, n: u32) {
        let mut bytes = Vec::with_capacity(n as usize * (9 + self.block.len()));
        for _ in 0..n {
            bytes.extend(frame(HEADERS, END_HEADERS, self.next_stream, &self.block));
            self.next_stream += 2;
        }
        let _ = self.writer.send(bytes);
    }

    /// Opens `n` more streams, each with a whole request (one empty gRPC
    /// message), whose answers this client then reads or not as its window
    /// says.
    pub fn open_complete(&mut self, n: u32) {
        // The gRPC frame of an empty message: not compressed, length 0.
        let message = [0u8; 5];
        let mut bytes = Vec::with_capacity(n as usize * (27 + self.block.len()));
        for _ in 0..n {
            bytes.extend(frame(HEADERS, END_HEADERS, self.next_stream, &self.block));
            bytes.extend(frame(DATA, END_STREAM, self.next_stream, &message));
            self.next_stream += 2;
        }
        let _ = self.writer.send(bytes);
    }

    /// Opens one more stream with a whole request, and gives it a window
    /// of its own large enough for its answer: a stream this client reads,
    /// whatever the window of the others.
    pub fn open_read(&mut self) {
        let stream = self.next_stream;
        self.open_complete(1);
        let _ = self.writer.send(frame(WINDOW_UPDATE, 0, stream, &(1u32 << 20).to_be_bytes()));
    }

    pub fn is_closed(&self) -> bool {
        self.counts.closed.load(Ordering::Acquire)
    }

    /// How many of its streams the server reset.
    pub fn resets(&self) -> usize {
        self.counts.reset.load(Ordering::Acquire)
    }
}

impl Drop for H2Flood {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Waits up to `timeout` for `done`, polling.
pub async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// A gRPC-Web (HTTP/1.1) unary call to `path` whose body stops after its
/// first bytes: sends the head and 5 of `content_length` bytes, then waits.
pub async fn http1_stalled_body(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: storegate\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\ncontent-length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    // The 5-byte gRPC frame header of a 95-byte message, and nothing of it.
    stream.write_all(&[0, 0, 0, 0, 95]).await?;
    Ok(stream)
}

/// Reads until the peer closes the connection or `timeout` passes; returns
/// what was read and whether it closed.
pub async fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// One client address using every trick against the server's budgets at
/// once, until `until`: as many Health/Watch streams as it may hold, 256
/// Health/Check calls whose answers it never reads (a window of 0), 256
/// calls whose request bodies never come, and 64 idle connections. When
/// the server cuts any of it (a connection, or streams it resets), it
/// starts again. Returns how many times the server cut a connection or
/// reset streams of one.
pub async fn every_trick(from: IpAddr, addr: SocketAddr, until: std::time::Instant) -> usize {
    let mut idle = Vec::new();
    let mut cut = 0;
    while std::time::Instant::now() < until {
        let mut round = Vec::new();
        for (path, window, complete) in
            [(HEALTH_WATCH, None, true), (HEALTH_CHECK, Some(0), true), (HEALTH_CHECK, None, false)]
        {
            if let Ok(mut flood) = H2Flood::connect_from(Some(from), addr, path, &[], window).await {
                if complete {
                    flood.open_complete(256);
                } else {
                    flood.open_stalled(256);
                }
                round.push(flood);
            }
        }
        idle.retain(|stream: &TcpStream| stream.peer_addr().is_ok());
        while idle.len() < 64 {
            let Ok(socket) = TcpSocket::new_v4() else { break };
            if socket.bind(SocketAddr::new(from, 0)).is_err() {
                break;
            }
            match socket.connect(addr).await {
                Ok(stream) => idle.push(stream),
                Err(_) => break,
            }
        }
        // Hold until something is cut or the attack ends, then start again.
        let cut_off = |f: &H2Flood| f.is_closed() || f.resets() > 0;
        while std::time::Instant::now() < until && !round.iter().any(cut_off) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cut += round.iter().filter(|f| cut_off(f)).count();
    }
    cut
}

/// What a well-behaved client saw: the time of each answered call, and the
/// calls that failed.
#[derive(Debug, Default)]
pub struct Observed {
    pub latencies: Vec<Duration>,
    pub failures: Vec<tonic::Status>,
}

impl Observed {
    /// The `q`-quantile (0.0 to 1.0) of the answered calls' times.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
    }
}

/// A well-behaved client at `from`: unary Health/Check calls every 20 ms
/// until `until`, each tenth on a new connection (a client arriving), each
/// given 5 s.
pub async fn observe_health(addr: SocketAddr, from: IpAddr, until: std::time::Instant) -> Observed {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let connect = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid URL")
            .local_address(Some(from))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
        Ok::<_, tonic::Status>(HealthClient::new(channel))
    };
    let mut observed = Observed::default();
    let mut client = None;
    let mut calls = 0u32;
    while std::time::Instant::now() < until {
        let started = std::time::Instant::now();
        if client.is_none() || calls.is_multiple_of(10) {
            match connect().await {
                Ok(fresh) => client = Some(fresh),
                Err(status) => observed.failures.push(status),
            }
        }
        calls += 1;
        if let Some(client) = client.as_mut() {
            let check = client.check(HealthCheckRequest { service: String::new() });
            match tokio::time::timeout(Duration::from_secs(5), check).await {
                Ok(Ok(_)) => observed.latencies.push(started.elapsed()),
                Ok(Err(status)) => observed.failures.push(status),
                Err(_) => observed.failures.push(tonic::Status::deadline_exceeded("no answer in 5 s")),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    observed
}

/// `callers` BeginLogin calls at a time from `from`, each with a new
/// made-up username and a wrong password, until `until`: a client trying
/// to fill the password-hashing queue. Returns how many were answered
/// RESOURCE_EXHAUSTED (throttled or shed) and how many otherwise.
pub async fn login_flood(
    from: IpAddr,
    addr: SocketAddr,
    callers: usize,
    until: std::time::Instant,
) -> (usize, usize) {
    use storegate::pb::auth::v1::{BeginLoginRequest, auth_service_client::AuthServiceClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return (0, 0);
    };
    let Ok(channel) = endpoint.local_address(Some(from)).connect().await else {
        return (0, 0);
    };
    let mut loops = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let mut client = AuthServiceClient::new(channel.clone());
        loops.spawn(async move {
            let (mut exhausted, mut other) = (0, 0);
            let mut n = 0u64;
            while std::time::Instant::now() < until {
                n += 1;
                let request = BeginLoginRequest {
                    username: format!("nobody-{from}-{caller}-{n}"),
                    password: "not the password at all".to_owned(),
                    ..Default::default()
                };
                match client.begin_login(request).await {
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => exhausted += 1,
                    _ => other += 1,
                }
            }
            (exhausted, other)
        });
    }
    let (mut exhausted, mut other) = (0, 0);
    while let Some(Ok((e, o))) = loops.join_next().await {
        (exhausted, other) = (exhausted + e, other + o);
    }
    (exhausted, other)
}
