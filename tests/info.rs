//! Every INFO the server sends is rewritten: the first one, and the async ones a cluster sends
//! when its membership changes, which would otherwise hand agents the servers' own addresses.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .expect("a line arrives in time")
        .expect("read");
    line
}

fn info_json(line: &str) -> Value {
    let json = line
        .strip_prefix("INFO ")
        .unwrap_or_else(|| panic!("not an INFO line: {line:?}"));
    serde_json::from_str(json.trim()).expect("INFO carries JSON")
}

#[tokio::test]
async fn initial_and_async_cluster_info_are_rewritten() {
    let route_a = free_port();
    let node_a = NatsServer::start_core(&format!(
        "server_name: a\ncluster {{ name: c1, listen: 127.0.0.1:{route_a} }}"
    ));
    let p = proxy(&node_a).await;

    let stream = TcpStream::connect(p.local_addr).await.unwrap();
    let mut r = BufReader::new(stream);
    let first = info_json(&read_line(&mut r).await);
    let direct = {
        let mut s = BufReader::new(TcpStream::connect(node_a.addr()).await.unwrap());
        info_json(&read_line(&mut s).await)
    };
    assert_eq!(
        first["server_id"], direct["server_id"],
        "the rest passes through"
    );
    assert_eq!(
        first["max_payload"].as_u64().unwrap(),
        direct["max_payload"].as_u64().unwrap() - 48
    );
    assert_eq!(
        first["port"].as_u64().unwrap(),
        u64::from(p.local_addr.port())
    );
    assert_eq!(first["host"], p.local_addr.ip().to_string());
    assert!(first.get("tls_required").is_none());

    r.get_mut()
        .write_all(b"CONNECT {\"verbose\":false,\"protocol\":1}\r\nPING\r\n")
        .await
        .unwrap();
    assert_eq!(read_line(&mut r).await, "PONG\r\n");

    // A second node joins: node A tells its clients about the new URL with an async INFO.
    let node_b = NatsServer::start_core(&format!(
        "server_name: b\ncluster {{ name: c1, listen: 127.0.0.1:{}, routes: [\"nats-route://127.0.0.1:{route_a}\"] }}",
        free_port()
    ));
    let mut proxied_async = None;
    for _ in 0..20 {
        let line = read_line(&mut r).await;
        if line.starts_with("INFO ") {
            proxied_async = Some(info_json(&line));
            break;
        }
        // PINGs from the server pass through; answer them like a client would.
        if line == "PING\r\n" {
            r.get_mut().write_all(b"PONG\r\n").await.unwrap();
        }
    }
    let async_info = proxied_async.expect("the async INFO reaches the agent");
    assert!(async_info.get("connect_urls").is_none(), "{async_info}");
    assert!(async_info.get("ws_connect_urls").is_none());
    assert_eq!(
        async_info["max_payload"].as_u64().unwrap(),
        direct["max_payload"].as_u64().unwrap() - 48
    );
    assert_eq!(
        async_info["port"].as_u64().unwrap(),
        u64::from(p.local_addr.port())
    );

    // Without the proxy the same server does advertise the cluster, so the strip is real.
    let mut saw_urls = false;
    for _ in 0..50 {
        let mut s = BufReader::new(TcpStream::connect(node_a.addr()).await.unwrap());
        if info_json(&read_line(&mut s).await)
            .get("connect_urls")
            .is_some()
        {
            saw_urls = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_urls,
        "the server advertises connect_urls to direct clients"
    );
    drop(node_b);
}
