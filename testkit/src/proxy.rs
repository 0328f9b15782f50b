//! A TCP proxy in front of a database server whose connection a test can
//! cut: refused (every connection closed at once, as when the server is
//! gone) or black-holed (connections stay open and nothing comes back, as
//! when the network drops packets).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Connections are closed as soon as they are made, and open ones now.
    Refused,
    /// Connections are accepted and held; nothing passes either way.
    BlackHole,
}

/// A proxy on a loopback port of its own to `upstream`.
pub struct CuttableProxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    accepting: JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<CuttableProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, _) = watch::channel(Link::Up);
        let accepting = tokio::spawn({
            let link = link.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, upstream, link.subscribe()));
                }
            }
        });
        Ok(CuttableProxy { addr, link, accepting })
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// `url` (`mysql://user@host:port/db?…`) with its host and port replaced
    /// by the proxy's.
    pub fn url_through(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let user = authority.rsplit_once('@').map(|(user, _)| format!("{user}@")).unwrap_or_default();
        format!("{scheme}://{user}{}{path}", self.addr)
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.link.send_replace(Link::Refused);
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<Link>) {
    let state = *link.borrow_and_update();
    match state {
        Link::Refused => return,
        Link::BlackHole => {
            hold_until_up(&mut link).await;
            return;
        }
        Link::Up => {}
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = async {
            let _ = link.wait_for(|l| *l != Link::Up).await;
        } => {
            if *link.borrow() == Link::BlackHole {
                // Keep both ends open, passing nothing, until the link
                // comes back; then drop them (the state is unknown).
                hold_until_up(&mut link).await;
            }
        }
    }
    let _ = client.shutdown().await;
}

async fn hold_until_up(link: &mut watch::Receiver<Link>) {
    let _ = tokio::time::timeout(Duration::from_secs(600), link.wait_for(|l| *l == Link::Up)).await;
}
