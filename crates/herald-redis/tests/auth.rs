//! A Redis server of this test's own with a password: a wrong one is a configuration error at
//! start-up, not an outage retried forever, and never appears in the error.

use std::time::Duration;

use herald_core::{Error, SecretUrl};
use herald_redis::RedisTransport;

#[tokio::test]
async fn a_refused_login_is_a_configuration_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--requirepass", "right-pw"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (see .ci/run)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let good = format!("redis://:right-pw@127.0.0.1:{port}");
    let ok = RedisTransport::connect(SecretUrl::parse("broker", &good).unwrap()).await;
    let bad = format!("redis://:wrong-s3cret@127.0.0.1:{port}");
    let refused = RedisTransport::connect(SecretUrl::parse("broker", &bad).unwrap()).await;
    let tls =
        RedisTransport::connect(SecretUrl::parse("broker", "rediss://127.0.0.1:1").unwrap()).await;
    let _ = server.kill();
    let _ = server.wait();
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.chain()));
    let err = refused.err().expect("a wrong password connected");
    assert!(matches!(err, Error::Config(_)), "{}", err.chain());
    assert!(
        err.chain().contains("refused the login") && !err.chain().contains("wrong-s3cret"),
        "{}",
        err.chain()
    );
    let err = tls.err().expect("rediss:// is not built");
    assert!(
        matches!(err, Error::Config(_)) && err.to_string().contains("not supported"),
        "{err}"
    );
}
