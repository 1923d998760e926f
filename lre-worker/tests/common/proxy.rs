//! A TCP proxy between a worker and its server that stops passing the worker's bytes on
//! once it has passed a given number of them, until thawed: an upload that cannot finish,
//! without depending on how fast the machine is.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FreezingProxy {
    pub addr: SocketAddr,
    thaw: watch::Sender<bool>,
}

impl FreezingProxy {
    /// Forwards to `upstream`; worker-to-server traffic stops after `limit` bytes in all.
    pub async fn start(upstream: SocketAddr, limit: u64) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (thaw, thawed) = watch::channel(false);
        let sent = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut cr, cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                tokio::spawn(pass_on(sr, cw));
                let (sent, mut thawed) = (sent.clone(), thawed.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        if sent.load(Ordering::SeqCst) >= limit
                            && !*thawed.borrow()
                            && thawed.wait_for(|t| *t).await.is_err()
                        {
                            return;
                        }
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        sent.fetch_add(n as u64, Ordering::SeqCst);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FreezingProxy { addr, thaw }
    }

    /// Lets everything through from now on.
    pub fn thaw(&self) {
        let _ = self.thaw.send(true);
    }
}

async fn pass_on(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
}
