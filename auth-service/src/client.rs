//! Who is calling, as far as throttling is concerned: the peer address of
//! the connection, or, when that peer is a configured trusted gateway, the
//! address it forwards in `x-forwarded-for`.
//!
//! Throttles are kept per username *and* client, so that a stranger who
//! guesses at an account slows down only their own attempts; the owner,
//! calling from elsewhere, still gets in. IPv6 clients are grouped by their
//! /64, which one subscriber usually holds whole.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use tonic::Request;

/// Gateways whose `x-forwarded-for` is believed (`TRUSTED_PROXIES`).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&addr))
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated addresses or CIDR ranges (`10.0.0.0/8, ::1`).
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies(nets))
    }
}

/// The client a call is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    Address(IpAddr),
    /// No peer address (an in-process transport): all such calls share one
    /// count.
    Unknown,
}

impl Client {
    /// The caller of `request`.
    pub fn of<T>(request: &Request<T>, trusted: &TrustedProxies) -> Client {
        let forwarded = request.metadata().get("x-forwarded-for").and_then(|v| v.to_str().ok());
        Self::from_peer(request.remote_addr(), forwarded, trusted)
    }

    /// The caller of a plain HTTP request (the token endpoint), by the
    /// connection details the server put in its extensions.
    pub fn of_parts(parts: &http::request::Parts, trusted: &TrustedProxies) -> Client {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let peer =
            parts.extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr).or_else(|| {
                parts
                    .extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        Self::from_peer(peer, forwarded, trusted)
    }

    fn from_peer(
        peer: Option<std::net::SocketAddr>,
        forwarded: Option<&str>,
        trusted: &TrustedProxies,
    ) -> Client {
        let Some(peer) = peer.map(|a| canonical(a.ip())) else {
            return Client::Unknown;
        };
        Client::Address(client_address(peer, forwarded, trusted))
    }
}

impl Client {
    /// The address itself (an IPv6 one whole, not its /64), for the audit
    /// trail.
    pub fn address(self) -> Option<IpAddr> {
        match self {
            Client::Address(addr) => Some(addr),
            Client::Unknown => None,
        }
    }

    /// The client as limits in memory key it: an IPv6 address by its /64,
    /// as the throttles do (see the `Display` impl).
    pub fn grouped(self) -> Client {
        match self {
            Client::Address(IpAddr::V6(v6)) => {
                let s = v6.segments();
                Client::Address(IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
            }
            other => other,
        }
    }
}

/// Walks the forwarding chain from the nearest hop outwards while the hop is
/// a trusted gateway: the first address not vouched for by one is the
/// client. Anything a client wrote itself sits further left and is never
/// reached, so it cannot choose its own throttle.
fn client_address(peer: IpAddr, forwarded: Option<&str>, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer;
    let Some(forwarded) = forwarded else { return client };
    for hop in forwarded.rsplit(',') {
        if !trusted.trusts(client) {
            break;
        }
        match hop.trim().parse::<IpAddr>() {
            Ok(addr) => client = canonical(addr),
            // A malformed entry: the last hop we could vouch for stands.
            Err(_) => break,
        }
    }
    client
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The key the throttles use: an IPv4 address, or an IPv6 /64.
impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Address(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Client::Address(IpAddr::V6(v6)) => {
                let s = v6.segments();
                write!(f, "{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            Client::Unknown => f.write_str("unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &str) -> TrustedProxies {
        list.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let none = TrustedProxies::default();
        assert_eq!(client_address(ip("10.0.0.1"), Some("203.0.113.9"), &none), ip("10.0.0.1"));
    }

    #[test]
    fn a_trusted_gateway_forwards_the_client_address() {
        let gateway = trusted("10.0.0.0/8");
        assert_eq!(client_address(ip("10.0.0.1"), Some("203.0.113.9"), &gateway), ip("203.0.113.9"));
        // Through two trusted hops.
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("203.0.113.9, 10.1.2.3"), &gateway),
            ip("203.0.113.9")
        );
        // Only the gateway's own entry is believed, not what the client
        // wrote before it.
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("198.51.100.1, 203.0.113.9"), &gateway),
            ip("203.0.113.9")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(client_address(ip("192.0.2.7"), Some("203.0.113.9"), &gateway), ip("192.0.2.7"));
        // A malformed hop leaves the gateway as the client.
        assert_eq!(client_address(ip("10.0.0.1"), Some("not an address"), &gateway), ip("10.0.0.1"));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_by_the_ipv4() {
        let a = Client::Address(canonical(ip("2001:db8:1:2:aaaa::1")));
        let b = Client::Address(canonical(ip("2001:db8:1:2:bbbb::2")));
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(a.grouped(), b.grouped());
        assert_ne!(a.grouped(), Client::Address(canonical(ip("2001:db8:1:3::1"))).grouped());
        assert_eq!(Client::Address(canonical(ip("::ffff:192.0.2.1"))).to_string(), "192.0.2.1");
    }

    #[test]
    fn trusted_proxies_parse_addresses_and_ranges() {
        assert!("10.0.0.0/8, ::1, 192.168.1.1".parse::<TrustedProxies>().is_ok());
        assert!("".parse::<TrustedProxies>().unwrap().0.is_empty());
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("gateway".parse::<TrustedProxies>().is_err());
    }
}
