//! A TCP forwarder that can be brought up late, to play "Synapse is down,
//! then back" without stopping the Synapse other tests share.

use tokio::net::{TcpListener, TcpStream};

/// A loopback port with nothing listening on it (yet).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Forwards connections on `port` to `target` until the task is aborted.
pub async fn forward(port: u16, target: String) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind proxy port");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}
