//! A minimal gRPC-Web client for tests and load: one unary call over
//! HTTP/1.1 (`application/grpc-web+proto`), as a browser's client sends it,
//! with its answer read back as a browser's client would report it.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// Calls `path` (e.g. `/storegate.auth.v1.AuthService/GetJwks`) at `addr`
/// with the encoded `message` and `headers` (`name: value` lines, e.g. an
/// authorization), on a connection of its own. The response message on
/// OK; otherwise the code: the trailer's `grpc-status`, UNAVAILABLE for a
/// connection that failed or an HTTP status other than 200 (as a proxy in
/// front answers for a replica it cannot reach), DEADLINE_EXCEEDED after
/// `timeout`.
pub async fn unary(
    addr: SocketAddr,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Vec<u8>, Code> {
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|_| Code::Unavailable)?;
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: storegate\r\ncontent-type: application/grpc-web+proto\r\n\
             x-grpc-web: 1\r\ncontent-length: {}\r\nconnection: close\r\n",
            message.len() + 5
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut body = Vec::with_capacity(message.len() + 5);
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        stream.write_all(head.as_bytes()).await.map_err(|_| Code::Unavailable)?;
        stream.write_all(&body).await.map_err(|_| Code::Unavailable)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(|_| Code::Unavailable)?;
        answer(&response)
    };
    tokio::time::timeout(timeout, call).await.unwrap_or(Err(Code::DeadlineExceeded))
}

/// The message of an HTTP/1.1 gRPC-Web response (`connection: close`, so
/// its body is the rest of the stream), or its code.
fn answer(response: &[u8]) -> Result<Vec<u8>, Code> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or(Code::Unavailable)?;
    let (head, body) =
        (String::from_utf8_lossy(&response[..split]).to_ascii_lowercase(), &response[split + 4..]);
    if !head.starts_with("http/1.1 200") {
        return Err(Code::Unavailable);
    }
    let body = if head.contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_vec() };
    // A trailers-only answer has its status in the headers.
    let mut status = header_status(&head);
    let mut message = None;
    let mut rest = body.as_slice();
    while rest.len() >= 5 {
        let (flag, len) = (rest[0], u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize);
        let frame = rest.get(5..5 + len).ok_or(Code::Unknown)?;
        if flag & 0x80 != 0 {
            status = header_status(&String::from_utf8_lossy(frame).to_ascii_lowercase());
        } else {
            message = Some(frame.to_vec());
        }
        rest = &rest[5 + len..];
    }
    match status {
        Some(0) => message.ok_or(Code::Unknown),
        Some(code) => Err(Code::from(code)),
        None => Err(Code::Unknown),
    }
}

/// The `grpc-status` in lowercased header lines.
fn header_status(lines: &str) -> Option<i32> {
    lines.lines().find_map(|line| line.strip_prefix("grpc-status:")?.trim().parse().ok())
}

/// The payload of a chunked HTTP/1.1 body.
fn unchunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        let Some(chunk) = body.get(start..start + size) else { break };
        out.extend_from_slice(chunk);
        body = body.get(start + size + 2..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn answers_are_read_as_a_browser_reads_them() {
        let mut ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web+proto\r\n\r\n".to_vec();
        ok.extend(frame(0, b"hello"));
        ok.extend(frame(0x80, b"grpc-status:0\r\ngrpc-message:\r\n"));
        assert_eq!(answer(&ok), Ok(b"hello".to_vec()));

        let only_trailers = b"HTTP/1.1 200 OK\r\ngrpc-status: 16\r\ngrpc-message: no\r\n\r\n";
        assert_eq!(answer(only_trailers), Err(Code::Unauthenticated));
        assert_eq!(answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"), Err(Code::Unavailable));

        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let mut payload = frame(0, b"hi");
        payload.extend(frame(0x80, b"grpc-status:5\r\n"));
        chunked.extend(format!("{:x}\r\n", payload.len()).as_bytes());
        chunked.extend(&payload);
        chunked.extend(b"\r\n0\r\n\r\n");
        assert_eq!(answer(&chunked), Err(Code::NotFound));
    }
}
