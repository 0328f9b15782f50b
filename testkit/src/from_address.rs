//! Clients that call from a chosen loopback address. On Linux every address
//! of 127.0.0.0/8 is the loopback interface's (127.0.0.2 … 127.0.3.250 and
//! on), so one test can be many clients: the server sees each connection's
//! own peer address, as it would see clients on other machines.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use storegate::pb::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::{Channel, Endpoint};

/// The `n`-th test client address: 127.0.0.2 for 0, then on through
/// 127.0.1.x, 127.0.2.x, … (never 127.0.0.1, the tests' usual address).
pub fn client_address(n: u32) -> IpAddr {
    let n = n + 2;
    IpAddr::V4(Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8))
}

/// A channel to `server` whose connection is bound to `from` before it
/// connects.
pub async fn channel_from(from: IpAddr, server: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{server}"))
        .expect("an http URL")
        .local_address(Some(from))
        .connect()
        .await
}

/// An AuthService client calling from `from`.
pub async fn auth_from(from: IpAddr, server: SocketAddr) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(
        channel_from(from, server).await.unwrap_or_else(|e| panic!("connect from {from}: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_distinct_loopback_addresses_other_than_the_usual_one() {
        let all: std::collections::HashSet<IpAddr> = (0..2000).map(client_address).collect();
        assert_eq!(all.len(), 2000);
        assert!(all.iter().all(|a| a.is_loopback() && *a != IpAddr::from([127, 0, 0, 1])));
        assert_eq!(client_address(0), IpAddr::from([127, 0, 0, 2]));
        assert_eq!(client_address(254), IpAddr::from([127, 0, 1, 0]));
    }
}
