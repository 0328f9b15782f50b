//! gRPC-Web over HTTP/1.1 as anyone with a socket can send it: frames made
//! up by proptest (any flag, lengths that lie, cut short, a trailers frame
//! from the client, compressed without an encoding, base64 with bad
//! padding for `application/grpc-web-text`), POSTed to auth-service on
//! port 0. Every request gets an HTTP answer with a `grpc-status`, never a
//! panic or a closed connection, never INTERNAL, UNKNOWN or DATA_LOSS, and
//! the server keeps serving.
//!
//! tonic's request decoder answers INTERNAL for several malformed requests
//! (a frame flag other than 0, compressed without `grpc-encoding`, a body
//! that ends inside a frame, no message at all, a message that is not
//! protobuf, gRPC-Web text that is not base64); the server says those
//! INVALID_ARGUMENT (`src/connections.rs`), and
//! `malformed_requests_are_client_errors` holds the smallest of each.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use storegate_testkit::{Backend, TestStack};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const GET_JWKS: &str = "/storegate.auth.v1.AuthService/GetJwks";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const PATHS: [&str; 4] =
    [GET_JWKS, HEALTH_CHECK, "/storegate.auth.v1.AuthService/NoSuchMethod", "/no.such.Service/Call"];

/// Codes that say the server failed, not the client: never for what a
/// client sent.
const SERVER_FAILURES: [tonic::Code; 3] =
    [tonic::Code::Unknown, tonic::Code::Internal, tonic::Code::DataLoss];

/// How long a server may take to answer one request.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// One length-prefixed frame as a client writes it.
#[derive(Debug, Clone)]
struct Frame {
    flag: u8,
    /// Added to the payload's true length in the prefix (saturating).
    length_lie: i64,
    payload: Vec<u8>,
}

/// How a request's body travels.
#[derive(Debug, Clone)]
enum Text {
    /// `application/grpc-web(+proto)`: the frames as they are.
    Binary,
    /// `application/grpc-web-text(+proto)`: base64, then `edit`ed.
    Base64(TextEdit),
}

#[derive(Debug, Clone)]
enum TextEdit {
    None,
    StripPadding,
    ExtraPadding,
    /// A byte that is no base64 at this index of the text.
    Insert(prop::sample::Index, char),
    /// Each frame encoded on its own (padded chunks one after another),
    /// none cut.
    PerFrame,
}

#[derive(Debug, Clone)]
struct Case {
    path: &'static str,
    text: Text,
    subtype: &'static str,
    frames: Vec<Frame>,
    /// Where the body is cut, if it is.
    cut: Option<prop::sample::Index>,
    /// Extra request headers.
    headers: Vec<(&'static str, String)>,
    /// Sent with `transfer-encoding: chunked` in pieces of these sizes.
    chunks: Option<Vec<usize>>,
}

impl Case {
    fn content_type(&self) -> String {
        let base = match self.text {
            Text::Binary => "application/grpc-web",
            Text::Base64(_) => "application/grpc-web-text",
        };
        format!("{base}{}", self.subtype)
    }

    fn frames_bytes(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in frames {
            let length =
                (frame.payload.len() as i64).saturating_add(frame.length_lie).clamp(0, u32::MAX.into());
            out.push(frame.flag);
            out.extend_from_slice(&(length as u32).to_be_bytes());
            out.extend_from_slice(&frame.payload);
        }
        out
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Self::frames_bytes(&self.frames);
        if let Some(cut) = &self.cut {
            body.truncate(cut.index(body.len() + 1));
        }
        match &self.text {
            Text::Binary => body,
            Text::Base64(edit) => {
                let mut text = STANDARD.encode(&body);
                match edit {
                    TextEdit::None => {}
                    TextEdit::StripPadding => text = text.trim_end_matches('=').to_owned(),
                    TextEdit::ExtraPadding => text.push_str("=="),
                    TextEdit::Insert(at, c) => text.insert(at.index(text.len() + 1), *c),
                    TextEdit::PerFrame => {
                        text = self
                            .frames
                            .iter()
                            .map(|f| STANDARD.encode(Self::frames_bytes(std::slice::from_ref(f))))
                            .collect();
                    }
                }
                text.into_bytes()
            }
        }
    }

    /// The request on the wire.
    fn request(&self) -> Vec<u8> {
        let body = self.body();
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: storegate\r\ncontent-type: {}\r\nx-grpc-web: 1\r\n\
             connection: close\r\n",
            self.path,
            self.content_type()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let mut out = Vec::new();
        match &self.chunks {
            None => {
                head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(&body);
            }
            Some(sizes) => {
                head.push_str("transfer-encoding: chunked\r\n\r\n");
                out.extend_from_slice(head.as_bytes());
                let mut rest = body.as_slice();
                for size in sizes.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, tail) = rest.split_at((*size).clamp(1, rest.len()));
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                    rest = tail;
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }
}

/// A protobuf payload: the empty message both calls take, a
/// HealthCheckRequest naming a service, or any bytes.
fn any_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        2 => "[a-z.]{0,20}".prop_map(|service| {
            let mut out = vec![0x0a, service.len() as u8];
            out.extend_from_slice(service.as_bytes());
            out
        }),
        2 => proptest::collection::vec(any::<u8>(), 0..64),
        // A trailers frame's text, as a server sends one.
        1 => Just(b"grpc-status:0\r\ngrpc-message:\r\n".to_vec()),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    let flag =
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(0x80u8), 1 => Just(0x81u8), 1 => any::<u8>()];
    let length_lie = prop_oneof![
        6 => Just(0i64),
        2 => -8..8i64,
        1 => Just(4 * 1024 * 1024 + 1),
        1 => Just(i64::from(u32::MAX)),
    ];
    (flag, length_lie, any_payload()).prop_map(|(flag, length_lie, payload)| Frame {
        flag,
        length_lie,
        payload,
    })
}

fn any_text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        3 => Just(TextEdit::None),
        1 => Just(TextEdit::StripPadding),
        1 => Just(TextEdit::ExtraPadding),
        1 => (any::<prop::sample::Index>(), prop::sample::select(vec!['=', '!', '-', '_', ' ', '\n', 'é']))
            .prop_map(|(at, c)| TextEdit::Insert(at, c)),
        1 => Just(TextEdit::PerFrame),
    ]
}

fn any_case() -> impl Strategy<Value = Case> {
    let text = prop_oneof![2 => Just(Text::Binary), 1 => any_text_edit().prop_map(Text::Base64)];
    let header = prop_oneof![
        (
            Just("grpc-encoding"),
            prop::sample::select(vec!["gzip", "identity", "zstd", "br", ""]).prop_map(str::to_owned)
        ),
        (Just("grpc-accept-encoding"), "[a-z, ]{0,12}"),
        (Just("grpc-timeout"), "[0-9]{0,10}[HMSmun]?"),
        (Just("te"), Just("trailers".to_owned())),
    ];
    (
        prop_oneof![3 => Just(PATHS[0]), 3 => Just(PATHS[1]), 1 => Just(PATHS[2]), 1 => Just(PATHS[3])],
        text,
        prop_oneof![4 => Just(""), 4 => Just("+proto"), 1 => Just("+json"), 1 => Just("+thrift")],
        // Mostly one frame, as a unary call sends.
        prop_oneof![
            3 => proptest::collection::vec(any_frame(), 1..=1),
            2 => proptest::collection::vec(any_frame(), 0..4),
        ],
        proptest::option::weighted(0.3, any::<prop::sample::Index>()),
        proptest::collection::vec(header, 0..2),
        proptest::option::weighted(0.3, proptest::collection::vec(1..16usize, 1..5)),
    )
        .prop_map(|(path, text, subtype, frames, cut, headers, chunks)| Case {
            path,
            text,
            subtype,
            frames,
            cut,
            headers,
            chunks,
        })
}

/// An HTTP/1.1 answer, read to the end of the connection.
#[derive(Debug)]
struct Answer {
    http_status: u16,
    /// The `grpc-status`, from the headers (trailers only) or from the
    /// trailers frame, and its message.
    grpc_status: Option<i32>,
    grpc_message: String,
}

async fn exchange(addr: SocketAddr, request: &[u8]) -> Result<Answer, String> {
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        // The server may answer (and close) before it has read a body it
        // refuses: a failed write is no failure if an answer is there.
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let read = stream.read_to_end(&mut response).await;
        if response.is_empty() {
            return Err(format!("the connection closed without an answer ({read:?})"));
        }
        parse(&response)
    };
    tokio::time::timeout(ANSWER_WITHIN, call).await.unwrap_or_else(|_| Err("no answer in time".into()))
}

fn parse(response: &[u8]) -> Result<Answer, String> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head: {:?}", String::from_utf8_lossy(response)))?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let mut body = response[split + 4..].to_vec();
    let mut lines = head.lines();
    let http_status = lines
        .next()
        .and_then(|status| status.strip_prefix("http/1.1 "))
        .and_then(|status| status.get(..3)?.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 answer: {head:?}"))?;
    let headers: Vec<(&str, &str)> =
        lines.filter_map(|line| line.split_once(':')).map(|(n, v)| (n.trim(), v.trim())).collect();
    let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        body = unchunk(&body)?;
    }
    if header("content-type").is_some_and(|ct| ct.starts_with("application/grpc-web-text")) {
        body = unbase64(&body)?;
    }
    let mut grpc_status = header("grpc-status").and_then(|s| s.parse().ok());
    // grpc-message as sent (percent-encoded), from the original head.
    let raw_head = String::from_utf8_lossy(&response[..split]);
    let mut grpc_message = raw_head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("grpc-message")))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mut rest = body.as_slice();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = rest.get(5..5 + len).ok_or("a response frame cut short")?;
        if rest[0] & 0x80 != 0 {
            let trailers = String::from_utf8_lossy(frame);
            for line in trailers.lines() {
                match line.split_once(':') {
                    Some((name, value)) if name.eq_ignore_ascii_case("grpc-status") => {
                        grpc_status = value.trim().parse().ok();
                    }
                    Some((name, value)) if name.eq_ignore_ascii_case("grpc-message") => {
                        grpc_message = value.trim().to_owned();
                    }
                    _ => {}
                }
            }
        }
        rest = &rest[5 + len..];
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last response frame", rest.len()));
    }
    Ok(Answer { http_status, grpc_status, grpc_message: percent_decode(&grpc_message) })
}

fn unchunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = body.windows(2).position(|w| w == b"\r\n").ok_or("a chunk without its size line")?;
        let size = std::str::from_utf8(&body[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("a chunk size that is no number")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(end + 2..end + 2 + size).ok_or("a chunk cut short")?;
        out.extend_from_slice(chunk);
        body = body.get(end + 2 + size + 2..).ok_or("a chunk without its CRLF")?;
    }
}

/// Padded base64 chunks one after another, as tonic-web writes a frame at a time.
fn unbase64(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for group in text.chunks(4) {
        out.extend(STANDARD.decode(group).map_err(|e| format!("a text answer that is no base64: {e}"))?);
    }
    Ok(out)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()),
        ) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A well-formed GetJwks over gRPC-Web still answers OK.
async fn still_serving(addr: SocketAddr) -> bool {
    storegate_testkit::grpc_web::unary(addr, GET_JWKS, &[], &[], ANSWER_WITHIN).await.is_ok()
        && storegate_testkit::health_serving(addr).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn any_grpc_web_body_gets_a_grpc_answer_that_is_no_server_error() {
    let runtime = runtime();
    let stack = runtime.block_on(TestStack::start_auth(Backend::Sqlite));
    let addr = stack.auth_addr;
    let started = Instant::now();
    // Every answer's code, to see what was met.
    let codes: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
    let outcome = runner.run(&any_case(), |case| {
        let request = case.request();
        let answer = runtime.block_on(exchange(addr, &request)).map_err(TestCaseError::fail)?;
        // A content type that is no gRPC-Web is tonic-web's to refuse, as HTTP.
        if !matches!(case.subtype, "" | "+proto") {
            prop_assert_eq!(answer.http_status, 400, "{:?}", answer);
            *codes.lock().unwrap().entry("HTTP 400".into()).or_default() += 1;
            return Ok(());
        }
        prop_assert_eq!(answer.http_status, 200, "{:?}", answer);
        let status =
            answer.grpc_status.ok_or_else(|| TestCaseError::fail(format!("no grpc-status: {answer:?}")))?;
        *codes.lock().unwrap().entry(format!("{:?}", tonic::Code::from(status))).or_default() += 1;
        let code = tonic::Code::from(status);
        prop_assert!(!SERVER_FAILURES.contains(&code), "{:?}", answer);
        // A refusal names the client's mistake, never the server's inside.
        let message = answer.grpc_message.to_lowercase();
        prop_assert!(!message.contains("sql") && !message.contains("panicked"), "{:?}", answer);
        Ok(())
    });
    let serving = runtime.block_on(still_serving(addr));
    eprintln!(
        "{} cases in {:?}: {:?}",
        runner.config().cases,
        started.elapsed(),
        codes.into_inner().unwrap()
    );
    runtime.block_on(stack.stop());
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    assert!(serving, "the server stopped serving after the malformed requests");
}

/// The smallest requests tonic answers INTERNAL (see the module's doc):
/// each one is the client's mistake, and says so.
#[test]
fn malformed_requests_are_client_errors() {
    let runtime = runtime();
    let stack = runtime.block_on(TestStack::start_auth(Backend::Sqlite));
    let frame =
        |flag: u8, length_lie: i64, payload: &[u8]| Frame { flag, length_lie, payload: payload.to_vec() };
    let case = |path, text, frames| Case {
        path,
        text,
        subtype: "+proto",
        frames,
        cut: None,
        headers: Vec::new(),
        chunks: None,
    };
    let cases = [
        ("compressed flag, no grpc-encoding", case(GET_JWKS, Text::Binary, vec![frame(1, 0, b"")])),
        ("a trailers frame from the client", case(GET_JWKS, Text::Binary, vec![frame(0x80, 0, b"")])),
        ("a length longer than the body", case(GET_JWKS, Text::Binary, vec![frame(0, 1, b"")])),
        ("no message", case(GET_JWKS, Text::Binary, vec![])),
        ("no protobuf", case(HEALTH_CHECK, Text::Binary, vec![frame(0, 0, b"\xff")])),
        (
            "base64 with bad padding",
            case(GET_JWKS, Text::Base64(TextEdit::ExtraPadding), vec![frame(0, 0, b"")]),
        ),
    ];
    let mut failures = Vec::new();
    for (what, case) in cases {
        let request = case.request();
        let answer = runtime.block_on(exchange(stack.auth_addr, &request)).unwrap();
        if answer.grpc_status != Some(tonic::Code::InvalidArgument as i32) {
            failures.push(format!("{what}: {:?} → {answer:?}", String::from_utf8_lossy(&request)));
        }
    }
    runtime.block_on(stack.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
