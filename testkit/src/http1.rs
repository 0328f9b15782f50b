//! Plain HTTP/1.1 exchanges as curl makes them, for the endpoints served
//! beside gRPC (discovery, the key set, the token endpoint): one request
//! per connection, read to its end.

use std::{collections::HashMap, net::SocketAddr};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An answer: its status, headers (names lower-cased) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// Sends `head` (a request line and headers, without the blank line) and
/// `body` on `stream`, and reads the answer to the end of the connection.
pub async fn exchange(mut stream: tokio::net::TcpStream, head: &str, body: &[u8]) -> HttpResponse {
    stream.write_all(format!("{head}connection: close\r\n\r\n").as_bytes()).await.unwrap();
    // The server may answer before it has read a body it refuses.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    HttpResponse { status, headers, body: body.to_owned() }
}

/// A GET of `path` at `addr`, with `extra` headers.
pub async fn get(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    exchange(stream, &head, b"").await
}
