//! The servers' own accept loop: TLS handshakes, and the limits that keep a
//! stranger from exhausting a server (a cap on connections, streams per
//! connection, calls and long-lived streams in flight, each shared fairly
//! between client addresses, header sizes, and time for handshakes,
//! headers, calls, unread responses and idleness). tonic's `Server` exposes
//! neither a connection cap, nor the HTTP/1 timeouts, nor a way to end a
//! response its client stops reading, so connections are served here with
//! hyper's auto (HTTP/1.1 + HTTP/2) builder.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    time::Instant,
};
use tonic::{
    body::Body,
    codegen::Service,
    transport::server::{Connected as _, TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    config::Limits,
    keyed_limit::{KeyedLimit, Refused},
    tls::ServerTls,
};

/// A response body that holds `guard` until it has been sent (or dropped):
/// a call counts as in flight until its last byte.
struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> http_body::Body for Guarded<G> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn guarded<G: Send + Unpin + 'static>(response: http::Response<Body>, guard: G) -> http::Response<Body> {
    response.map(|inner| Body::new(Guarded { inner, _guard: guard }))
}

/// What the accept loop serves (the server's whole stack, cloned per
/// connection and per call), and what it wraps.
pub trait Stack:
    Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Stack for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The methods whose calls may stay open as long as the client likes:
/// server streams and bidirectional streams. They are counted apart from
/// unary calls and are not cut by the request timeout. (A streaming method
/// added to a service belongs here.)
const LONG_LIVED_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Whether a call to `path` may stay open as long as the client likes.
fn is_long_lived(path: &str) -> bool {
    LONG_LIVED_METHODS.contains(&path)
}

/// The bounds on calls in flight across the server (unary calls, and
/// long-lived streams apart), and the deadline of each unary call. Sits
/// inside the gRPC-Web translation, so that its answers reach browsers in
/// their protocol.
#[derive(Clone)]
pub struct CallLimits<S> {
    inner: S,
    /// Unary calls, per client address and for the whole server.
    in_flight: Arc<KeyedLimit<Option<IpAddr>>>,
    /// Long-lived streams, the same way.
    streams: Arc<KeyedLimit<Option<IpAddr>>>,
    timeout: Duration,
}

impl<S> CallLimits<S> {
    pub fn new(inner: S, limits: &Limits) -> Self {
        CallLimits {
            inner,
            in_flight: KeyedLimit::fair(
                limits.max_concurrent_calls_per_client as usize,
                limits.max_concurrent_calls as usize,
            ),
            streams: KeyedLimit::fair(
                limits.max_streaming_calls_per_client as usize,
                limits.max_streaming_calls as usize,
            ),
            timeout: Duration::from_secs(limits.request_timeout_secs),
        }
    }
}

/// The client a budget counts: an IPv4 address, or an IPv6 address's /64
/// (one host is commonly given a whole /64, so its single addresses are no
/// clients of their own). An IPv4 address mapped into IPv6 is the IPv4 one.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// The client (see [`client_of`]) of the connection a call came on (plain
/// or TLS).
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr())
        })
        .map(|addr| client_of(addr.ip()))
}

impl<S> Service<http::Request<Body>> for CallLimits<S>
where
    S: Stack,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service's readiness is awaited per call, under the deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Shedding at once costs nothing to hold; queueing would let a
        // flood of stalled calls pile up memory.
        let long_lived = is_long_lived(request.uri().path());
        let budget = if long_lived { &self.streams } else { &self.in_flight };
        let permit = match budget.try_start(&peer_ip(&request)) {
            Ok(permit) => permit,
            Err(refused) => {
                let message = match (refused, long_lived) {
                    (Refused::Key, false) => "too many calls in flight from your address; try again",
                    (Refused::Total, false) => "the server has too many calls in flight; try again",
                    (Refused::Key, true) => "too many streams open from your address; close one first",
                    (Refused::Total, true) => "the server has too many streams open; try again later",
                };
                return Box::pin(async move { Ok(tonic::Status::resource_exhausted(message).into_http()) });
            }
        };
        // The caller's own deadline (grpc-timeout), when it is the shorter:
        // work nobody waits for any more stops there.
        let timeout = client_deadline(request.headers()).map_or(self.timeout, |d| d.min(self.timeout));
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let call = async {
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                inner.call(request).await
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(response)) => Ok(guarded(client_faults_as_contract_says(response), permit)),
                Ok(Err(never)) => match never {},
                // A call whose request never completes ends here; on HTTP/1.1
                // hyper then closes the connection (its body is unread).
                Err(_) => Ok(tonic::Status::deadline_exceeded("the call took longer than the server allows")
                    .into_http()),
            }
        })
    }
}

/// How tonic words its answer to a request message above
/// `max_decoding_message_size` (tonic 0.14, `codec/decode.rs`).
const TONIC_OVERSIZED: &str = "Error, decoded message length too large";

/// How tonic (0.14: `codec/decode.rs`, `server/grpc.rs`, tonic-prost's
/// codec, tonic-web's `call.rs`) words its INTERNAL answers to a request
/// that is not a well-formed gRPC message: a frame flag other than 0 or 1,
/// the compressed flag without `grpc-encoding`, data that does not
/// decompress, a body cut inside a frame, no message at all, bytes that
/// are not protobuf, gRPC-Web text that is not base64. gRPC's own
/// documents ask for INTERNAL in some of these; this service's contract
/// answers a client's mistake INVALID_ARGUMENT, never INTERNAL.
const TONIC_MALFORMED: [&str; 6] = [
    "protocol error: received message with",
    "Error decompressing:",
    "Unexpected EOF decoding stream.",
    "Missing request message.",
    "failed to decode Protobuf message",
    "tonic-web: ",
];

/// tonic's own answers to a request it could not read, said as this
/// contract says them, before any handler ran (a trailers-only response):
/// a message over the size limit as RESOURCE_EXHAUSTED, as gRPC's own
/// servers answer it and the contract names it ("too large"; tonic says
/// OUT_OF_RANGE), and a malformed request as INVALID_ARGUMENT (tonic says
/// INTERNAL). Any other answer passes as it is.
fn client_faults_as_contract_says(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let message = status.message();
    match status.code() {
        tonic::Code::OutOfRange if message.starts_with(TONIC_OVERSIZED) => {
            tonic::Status::resource_exhausted("the request message is larger than this server accepts").into_http()
        }
        tonic::Code::Internal if TONIC_MALFORMED.iter().any(|known| message.starts_with(known)) => {
            tonic::Status::invalid_argument(
                "the request is not a well-formed gRPC message (one uncompressed protobuf message in a frame)",
            )
            .into_http()
        }
        _ => response,
    }
}

/// The `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u,
/// n), per the gRPC HTTP/2 protocol. Anything else is no deadline.
fn client_deadline(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// One open connection, as the cap, the idle limit and the write timeout
/// see it.
struct Conn {
    /// The client's address (None when the socket could not tell).
    ip: Option<IpAddr>,
    calls: AtomicUsize,
    /// Milliseconds since `Registry::epoch` when the last call ended (or the
    /// connection opened).
    idle_since_ms: AtomicU64,
    evict: Notify,
    /// Responses waiting for the client to read them (by a number of their
    /// own), each with the instant after which it is stopped, and how.
    unread: Mutex<HashMap<u64, (Instant, Arc<StreamStop>)>>,
    next_response: AtomicU64,
    /// Wakes the connection task when a response starts waiting while none
    /// did (the task may be asleep until an idle deadline minutes away).
    unread_started: Notify,
}

impl Conn {
    fn unread(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, Arc<StreamStop>)>> {
        self.unread.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the next response left unread reaches its limit.
    fn next_limit(&self) -> Option<Instant> {
        self.unread().values().map(|(limit, _)| *limit).min()
    }

    /// Stops every response unread past its limit: an HTTP/2 stream alone
    /// (its task ends, h2 resets it), the other calls on the connection go
    /// on. False when one of them can only be stopped with the whole
    /// connection (HTTP/1.1: one response per connection anyway).
    fn stop_overdue(&self, now: Instant) -> bool {
        let mut unread = self.unread();
        let mut streams_only = true;
        unread.retain(|_, (limit, stop)| {
            if *limit > now {
                return true;
            }
            streams_only &= stop.stop();
            false
        });
        streams_only
    }
}

/// How the connection task ends one HTTP/2 stream's task: hyper spawns a
/// task per stream through [`StreamExecutor`], which races it against this.
#[derive(Default)]
struct StreamStop {
    /// Set once the stream's task races against `notify`.
    attached: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl StreamStop {
    /// Ends the stream's task; false when no task races against this.
    fn stop(&self) -> bool {
        if !self.attached.load(Ordering::Acquire) {
            return false;
        }
        tracing::debug!("resetting a stream whose client stopped reading its response");
        self.notify.notify_one();
        true
    }
}

std::thread_local! {
    /// The stop of the stream whose task hyper spawns next. hyper's HTTP/2
    /// server calls the service (`ConnService::call`, which sets it) and
    /// then spawns the stream's task (`StreamExecutor::execute`, which takes
    /// it) in one step on one thread: this is the only way from one to the
    /// other, as hyper's executor sees only an opaque future.
    static NEXT_STREAM_STOP: std::cell::RefCell<Option<Arc<StreamStop>>> =
        const { std::cell::RefCell::new(None) };
}

/// Spawns hyper's tasks on tokio; a stream's task races against the stop
/// its call left in [`NEXT_STREAM_STOP`]. Dropping a stream's task drops
/// its h2 handles, and h2 then resets the stream (RST_STREAM CANCEL): one
/// stalled response ends without its connection. (hyper offers no way to
/// reset a stream whose window the client keeps shut: it polls the body
/// only once there is room to send.)
#[derive(Clone, Copy, Debug)]
struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        let stop = NEXT_STREAM_STOP.with(|next| next.borrow_mut().take());
        let Some(stop) = stop else {
            tokio::spawn(task);
            return;
        };
        stop.attached.store(true, Ordering::Release);
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.notify.notified() => {}
            }
        });
    }
}

/// The open connections, for the cap. At it, the longest-idle one makes
/// room for a new one (an attacker's silent connections cannot lock out
/// callers), and when every one has a call in flight the new one is closed.
/// One address may open another only while it holds fewer than half of the
/// places still free (else its own longest-idle connection makes room), so
/// that a few addresses cannot take them all.
struct Registry {
    epoch: Instant,
    max: usize,
    next_id: AtomicU64,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<u64, Arc<Conn>>,
    /// Open connections per address; an address with none has no entry.
    per_ip: HashMap<Option<IpAddr>, usize>,
}

impl Open {
    fn remove(&mut self, id: u64) -> Option<Arc<Conn>> {
        let conn = self.by_id.remove(&id)?;
        match self.per_ip.get_mut(&conn.ip) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                self.per_ip.remove(&conn.ip);
            }
        }
        Some(conn)
    }

    /// The longest-idle connection with no call in flight, among those
    /// `which` picks.
    fn idlest(&self, which: impl Fn(&Conn) -> bool) -> Option<u64> {
        self.by_id
            .iter()
            .filter(|(_, c)| which(c) && c.calls.load(Ordering::Acquire) == 0)
            .min_by_key(|(id, c)| (c.idle_since_ms.load(Ordering::Relaxed), **id))
            .map(|(id, _)| *id)
    }
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn admit(&self, ip: Option<IpAddr>) -> Option<(u64, Arc<Conn>)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let free = self.max.saturating_sub(open.by_id.len());
        let mine = open.per_ip.get(&ip).copied().unwrap_or(0);
        let make_room = if mine > 0 && mine >= (free / 2).max(1) {
            Some(open.idlest(|c| c.ip == ip)?)
        } else if free == 0 {
            Some(open.idlest(|_| true)?)
        } else {
            None
        };
        if let Some(evicted) = make_room.and_then(|id| open.remove(id)) {
            evicted.evict.notify_one();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            ip,
            calls: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            evict: Notify::new(),
            unread: Mutex::default(),
            next_response: AtomicU64::new(0),
            unread_started: Notify::new(),
        });
        open.by_id.insert(id, conn.clone());
        *open.per_ip.entry(ip).or_default() += 1;
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// Counts a call on its connection until its response has been sent.
struct CallOnConn {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl CallOnConn {
    fn new(conn: &Arc<Conn>, registry: &Arc<Registry>) -> Self {
        conn.calls.fetch_add(1, Ordering::AcqRel);
        CallOnConn { conn: conn.clone(), registry: registry.clone() }
    }
}

impl Drop for CallOnConn {
    fn drop(&mut self) {
        self.conn.idle_since_ms.store(self.registry.now_ms(), Ordering::Relaxed);
        self.conn.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that notes on its connection whenever it waits for the
/// client to read: from when it is handed to hyper until hyper first asks
/// for a frame, and from each frame it gives until hyper asks for the next.
/// (hyper asks for the next frame only once the client's flow-control
/// window or the socket has room.) Waiting on the service for data to send
/// is not waiting for the client. The connection task stops a response
/// that waited past its limit ([`Conn::stop_overdue`], from [`serve_http`]).
struct Unread {
    inner: Body,
    call: CallOnConn,
    id: u64,
    stop: Arc<StreamStop>,
    /// How long the client may leave a frame unread.
    patience: Duration,
    /// The unary call's deadline: no frame is sent after it, and no wait
    /// goes past it.
    deadline: Option<Instant>,
}

impl Unread {
    fn new(
        inner: Body,
        call: CallOnConn,
        stop: Arc<StreamStop>,
        patience: Duration,
        deadline: Option<Instant>,
    ) -> Self {
        let id = call.conn.next_response.fetch_add(1, Ordering::Relaxed);
        let body = Unread { inner, call, id, stop, patience, deadline };
        body.waiting();
        body
    }

    fn waiting(&self) {
        let limit = Instant::now() + self.patience;
        let limit = self.deadline.map_or(limit, |deadline| deadline.min(limit));
        let mut unread = self.call.conn.unread();
        if unread.is_empty() {
            self.call.conn.unread_started.notify_one();
        }
        unread.insert(self.id, (limit, self.stop.clone()));
    }
}

impl http_body::Body for Unread {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        self.call.conn.unread().remove(&self.id);
        if self.deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            // hyper resets the stream (HTTP/2) or closes the connection.
            return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
                "the response was not read within the server's time for a call",
            ))));
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(Some(Ok(_)))) && !self.inner.is_end_stream() {
            self.waiting();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        self.call.conn.unread().remove(&self.id);
    }
}

/// The per-connection face of the server's service: adds what tonic's
/// `Request::remote_addr` (and `peer_certs`) read, counts calls, and notes
/// responses left unread.
struct ConnService<S, I> {
    inner: S,
    connect_info: I,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    write_timeout: Duration,
    request_timeout: Duration,
}

impl<S, I> hyper::service::Service<http::Request<Incoming>> for ConnService<S, I>
where
    S: Stack,
    I: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<http::Response<Body>, Infallible>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.connect_info.clone());
        let on_conn = CallOnConn::new(&self.conn, &self.registry);
        // A second past the call's own deadline, so that the server's
        // DEADLINE_EXCEEDED answer, made at that deadline, still goes out.
        let deadline = (!is_long_lived(request.uri().path()))
            .then(|| Instant::now() + self.request_timeout + Duration::from_secs(1));
        let patience = self.write_timeout;
        let stop = Arc::new(StreamStop::default());
        if request.version() == http::Version::HTTP_2 {
            NEXT_STREAM_STOP.with(|next| *next.borrow_mut() = Some(stop.clone()));
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let response = inner.call(request.map(Body::new)).await?;
            Ok(response.map(|body| Body::new(Unread::new(body, on_conn, stop, patience, deadline))))
        })
    }
}

/// Everything a connection task needs, shared by all of them.
struct Shared<S> {
    service: S,
    tls: Option<ServerTls>,
    http: auto::Builder<StreamExecutor>,
    registry: Arc<Registry>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    write_timeout: Duration,
    request_timeout: Duration,
}

fn http_builder(limits: &Limits) -> auto::Builder<StreamExecutor> {
    let mut http = auto::Builder::new(StreamExecutor);

    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .max_buf_size(limits.max_header_bytes.max(8192) as usize)
        .max_headers(64);
    let mut http2 = http.http2();
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes);
    if limits.http2_keepalive_interval_secs > 0 {
        let keepalive = Duration::from_secs(limits.http2_keepalive_interval_secs);
        http2.keep_alive_interval(keepalive).keep_alive_timeout(keepalive.min(Duration::from_secs(20)));
    }
    http
}

/// Serves `service` on `listener` until `stop` completes; then stops
/// accepting (closing the listening socket at once), asks every connection
/// to finish gracefully (HTTP/2 GOAWAY; HTTP/1.1 after its current call) and
/// returns once all have closed.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: &Limits,
    service: S,
    stop: impl Future<Output = ()>,
) where
    S: Stack + Sync,
{
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        max: limits.max_connections as usize,
        next_id: AtomicU64::new(0),
        open: Mutex::default(),
    });
    let shared = Arc::new(Shared {
        service,
        tls,
        http: http_builder(limits),
        registry: registry.clone(),
        handshake_timeout: Duration::from_secs(limits.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
        write_timeout: Duration::from_secs(limits.write_timeout_secs),
        request_timeout: Duration::from_secs(limits.request_timeout_secs),
    });
    let (draining, _) = watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or a peer gone before accept):
                    // wait a moment rather than spin.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some((id, conn)) = registry.admit(Some(client_of(peer.ip()))) else {
            tracing::debug!(
                "connection refused: at MAX_CONNECTIONS, or at the address's share, with a call in flight on each"
            );
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY, small responses wait out delayed ACKs (~40 ms).
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_one(shared.clone(), stream, id, conn, draining.subscribe()));
    }
    drop(listener);
    draining.send_replace(true);
    draining.closed().await;
}

async fn serve_one<S>(
    shared: Arc<Shared<S>>,
    stream: TcpStream,
    id: u64,
    conn: Arc<Conn>,
    mut draining: watch::Receiver<bool>,
) where
    S: Stack + Sync,
{
    let tcp_info = stream.connect_info();
    match &shared.tls {
        None => serve_http(&shared, stream, tcp_info, &conn, &mut draining).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(shared.handshake_timeout, acceptor.accept(stream)) => handshake,
                () = conn.evict.notified() => Ok(Err(std::io::ErrorKind::ConnectionAborted.into())),
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let info = stream.connect_info();
                    serve_http(&shared, stream, info, &conn, &mut draining).await
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
    shared.registry.remove(id);
}

/// How often a busy connection looks for responses left unread past their
/// limit (a response may start waiting without waking the connection task).
const UNREAD_CHECK: Duration = Duration::from_secs(1);

async fn serve_http<S, IO, I>(
    shared: &Shared<S>,
    io: IO,
    connect_info: I,
    conn: &Arc<Conn>,
    draining: &mut watch::Receiver<bool>,
) where
    S: Stack + Sync,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    let service = ConnService {
        inner: shared.service.clone(),
        connect_info,
        conn: conn.clone(),
        registry: shared.registry.clone(),
        write_timeout: shared.write_timeout,
        request_timeout: shared.request_timeout,
    };
    let mut connection = std::pin::pin!(shared.http.serve_connection(TokioIo::new(io), service));
    // After a graceful shutdown is asked for, how long the peer has to
    // finish before the connection is dropped (the drain limit of `serve`
    // covers a stopping server).
    let mut closing: Option<Instant> = None;
    loop {
        // A response left unread past its limit is stopped, also while the
        // connection drains: its client has stopped reading it. An HTTP/2
        // stream is reset alone; otherwise the connection is cut.
        let now = Instant::now();
        if conn.next_limit().is_some_and(|limit| limit <= now) && !conn.stop_overdue(now) {
            tracing::debug!("closing a connection whose client stopped reading its response");
            return;
        }
        let cut_at = conn.next_limit();
        let busy = conn.calls.load(Ordering::Acquire) > 0;
        let idle_deadline = (!busy && closing.is_none()).then(|| {
            let idle_since = Duration::from_millis(conn.idle_since_ms.load(Ordering::Relaxed));
            shared.registry.epoch + idle_since + shared.idle_timeout
        });
        if idle_deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            tracing::debug!("closing an idle connection");
            connection.as_mut().graceful_shutdown();
            closing = Some(Instant::now() + Duration::from_secs(5));
        }
        // When to look again: a busy connection each second too, for a
        // response that starts waiting while others already do (that wakes
        // no one).
        let look_again = match (cut_at, idle_deadline) {
            (Some(cut_at), _) => cut_at.min(Instant::now() + UNREAD_CHECK),
            (None, Some(idle)) => idle,
            (None, None) => Instant::now() + UNREAD_CHECK,
        };
        let look_again = closing.map_or(look_again, |closing| closing.min(look_again));
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Ok(_) = draining.wait_for(|d| *d), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + Duration::from_secs(3600));
            }
            () = conn.evict.notified() => {
                // Evicted to make room at the cap: idle, so nothing is lost.
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + Duration::from_secs(1));
            }
            () = conn.unread_started.notified() => {}
            () = tokio::time::sleep_until(look_again) => {
                if closing.is_some_and(|closing| closing <= Instant::now()) {
                    tracing::debug!("connection did not close in time; dropping it");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        client_deadline(&headers)
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_of(v4), v4);
        assert_eq!(client_of("::ffff:192.0.2.7".parse().unwrap()), v4);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        assert_eq!(deadline("5S"), Some(Duration::from_secs(5)));
        assert_eq!(deadline("250m"), Some(Duration::from_millis(250)));
        assert_eq!(deadline("2M"), Some(Duration::from_secs(120)));
        assert_eq!(deadline("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(deadline("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "1.5S"] {
            assert_eq!(deadline(bad), None, "{bad:?}");
        }
        assert_eq!(client_deadline(&http::HeaderMap::new()), None);
    }
}
