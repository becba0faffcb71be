//! Agents log in to the server themselves, through the proxy: token, user/password and nkey,
//! each against a server configured for it. The proxy passes the server's INFO nonce and the
//! agent's CONNECT through unchanged, so the right credentials work through two proxies and the
//! wrong ones are refused by the server, exactly as without the proxy.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::*;
use async_nats::{ConnectErrorKind, ConnectOptions, ServerInfo};
use base64::Engine;
use cipherbus::envelope::MAGIC;
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

/// Publishes through one proxy and receives through another, both agents logged in with
/// `opts`, while an observer logged in straight to the server sees only ciphertext. Returns
/// what the subscribing agent was told about the server.
async fn round_trip_through_two_proxies(
    server: &NatsServer,
    opts: impl Fn() -> ConnectOptions,
) -> ServerInfo {
    let (pa, pb) = (proxy(server).await, proxy(server).await);
    let publisher = opts()
        .connect(proxy_url(&pa))
        .await
        .expect("publisher logs in through the proxy");
    let subscriber = opts()
        .connect(proxy_url(&pb))
        .await
        .expect("subscriber logs in through the proxy");
    let observer = opts()
        .connect(server.url())
        .await
        .expect("observer logs in straight to the server");

    let mut sub = subscriber.subscribe("auth.check").await.unwrap();
    let mut raw = observer.subscribe("auth.check").await.unwrap();
    subscriber.flush().await.unwrap();
    observer.flush().await.unwrap();
    // async-nats' flush writes out the socket but waits for no PONG; ask the server instead.
    assert!(
        wait_for_interest(server, "auth.check", 2).await,
        "both subscriptions reach the server"
    );

    publisher
        .publish("auth.check", "logged-in plaintext".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    let got = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("delivery in time")
        .expect("subscription open");
    assert_eq!(&got.payload[..], b"logged-in plaintext");
    let seen = tokio::time::timeout(WAIT, raw.next())
        .await
        .expect("observer delivery in time")
        .expect("subscription open");
    assert_eq!(seen.payload[0], MAGIC, "the bus carries the sealed payload");
    assert!(!contains(&seen.payload, b"logged-in plaintext"));
    subscriber.server_info()
}

/// Waits until the server lists `n` subscriptions on `subject`.
async fn wait_for_interest(server: &NatsServer, subject: &str, n: usize) -> bool {
    let quoted = format!("\"{subject}\"");
    eventually(WAIT, || {
        server.monitor("connz?subs=1").matches(&quoted).count() >= n
    })
    .await
}

/// Connecting through the proxy with `opts` fails the way a bad login fails at the server.
async fn assert_refused(url: &str, opts: ConnectOptions, what: &str) {
    let attempt = tokio::time::timeout(WAIT, opts.connect(url))
        .await
        .unwrap_or_else(|_| panic!("{what}: the refusal arrives in time"));
    match attempt {
        Ok(_) => panic!("{what}: the login was accepted"),
        Err(e) => assert_eq!(
            e.kind(),
            ConnectErrorKind::AuthorizationViolation,
            "{what}: refused as an authorization violation, got {e}"
        ),
    }
}

#[tokio::test]
async fn token_login_passes_through_and_a_wrong_token_is_refused() {
    let server = NatsServer::start_with_config(r#"authorization { token: "s3cret" }"#);
    let info =
        round_trip_through_two_proxies(&server, || ConnectOptions::with_token("s3cret".into()))
            .await;
    assert!(
        info.auth_required,
        "the agent is told the server requires auth"
    );

    let p = proxy(&server).await;
    let url = proxy_url(&p);
    assert_refused(
        &url,
        ConnectOptions::with_token("wrong".into()),
        "wrong token",
    )
    .await;
    assert_refused(&url, ConnectOptions::new(), "no token").await;
}

#[tokio::test]
async fn user_password_login_passes_through_and_a_wrong_password_is_refused() {
    let server = NatsServer::start_with_config(
        r#"authorization { users = [ {user: "alice", password: "pw"} ] }"#,
    );
    let info = round_trip_through_two_proxies(&server, || {
        ConnectOptions::with_user_and_password("alice".into(), "pw".into())
    })
    .await;
    assert!(info.auth_required);

    let p = proxy(&server).await;
    let url = proxy_url(&p);
    assert_refused(
        &url,
        ConnectOptions::with_user_and_password("alice".into(), "nope".into()),
        "wrong password",
    )
    .await;
    assert_refused(
        &url,
        ConnectOptions::with_user_and_password("mallory".into(), "pw".into()),
        "unknown user",
    )
    .await;
}

#[tokio::test]
async fn nkey_login_signs_the_servers_nonce_through_the_proxy() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users = [ {{nkey: "{}"}} ] }}"#,
        user.public_key()
    ));
    let info =
        round_trip_through_two_proxies(&server, || ConnectOptions::with_nkey(seed.clone())).await;
    assert!(
        !info.nonce.is_empty(),
        "the agent behind the proxy is given the server's nonce to sign"
    );

    let p = proxy(&server).await;
    let stranger = nkeys::KeyPair::new_user();
    assert_refused(
        &proxy_url(&p),
        ConnectOptions::with_nkey(stranger.seed().unwrap()),
        "unknown nkey",
    )
    .await;
}

/// A raw agent signs the nonce it reads from the proxy's INFO. The server accepts the signature
/// only over the nonce it generated for that very connection, so a login proves the proxy passed
/// the nonce through untouched; a signature over anything else is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nonce_an_agent_sees_is_the_one_its_server_connection_generated() {
    // Blocking sockets in the test body are fine: the proxy runs on the worker threads.
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users = [ {{nkey: "{}"}} ] }}"#,
        user.public_key()
    ));
    let p = proxy(&server).await;

    let login = |sign: &dyn Fn(&str) -> String| -> (String, String) {
        let mut s = TcpStream::connect(p.local_addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let json = line
            .strip_prefix("INFO ")
            .expect("the proxy speaks first with INFO");
        let info: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        let nonce = info["nonce"]
            .as_str()
            .expect("INFO carries a nonce")
            .to_owned();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(user.sign(sign(&nonce).as_bytes()).unwrap());
        write!(
            s,
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"nkey\":\"{}\",\"sig\":\"{sig}\"}}\r\nPING\r\n",
            user.public_key()
        )
        .unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        (nonce, answer)
    };

    let (first, answer) = login(&|nonce| nonce.to_owned());
    assert!(!first.is_empty());
    assert_eq!(
        answer, "PONG\r\n",
        "a signature over the nonce the agent saw logs in"
    );

    let (second, answer) = login(&|nonce| format!("{nonce}-tampered"));
    assert_ne!(
        first, second,
        "every upstream connection brings a fresh nonce"
    );
    assert_eq!(
        answer, "-ERR 'Authorization Violation'\r\n",
        "a signature over anything but the server's nonce is refused"
    );
}
