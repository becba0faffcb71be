//! The plain TCP forwarder the proxy is compared against: bytes in, bytes out, nothing parsed.

use super::*;

/// A plain TCP forwarder: bytes in, bytes out, nothing parsed. The floor cost of any proxy.
pub fn forward(listen: &str, upstream: &str) -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| err(format!("cannot listen on {listen}: {e}")))?;
        loop {
            let Ok((mut agent, _)) = listener.accept().await else {
                continue;
            };
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = agent.set_nodelay(true);
                let _ = up.set_nodelay(true);
                // The same read size as the proxy's pumps.
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut agent,
                    &mut up,
                    32 * 1024,
                    32 * 1024,
                )
                .await;
            });
        }
    })
}
