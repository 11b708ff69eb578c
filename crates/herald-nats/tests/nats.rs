//! The NATS JetStream transport against the real server (`HERALD_TEST_NATS`, default
//! `nats://127.0.0.1:4222`). Every test uses its own streams.

use std::time::Duration;

use herald_core::{Kind, Message, SecretUrl, Subscription, Transport};
use herald_nats::{NatsTransport, wire};
use herald_testkit::unique;

fn url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

async fn transport() -> NatsTransport {
    NatsTransport::connect(SecretUrl::parse("broker", &url()).unwrap())
        .await
        .expect("NATS must be running (see .ci/run)")
}

async fn cleanup(kind: Kind, name: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
    let _ = js.delete_stream(wire::stream_name(kind, name)).await;
}

/// A relay that publishes the same message twice (crash between ack and mark) leaves one copy:
/// JetStream deduplicates on Nats-Msg-Id.
#[tokio::test]
async fn republishing_the_same_id_stores_one_copy() {
    let topic = unique("dedup");
    let nats = transport().await;
    let m = Message::raw_event(&topic, "E", b"1".to_vec()).with_key("k");
    assert!(nats.publish(std::slice::from_ref(&m)).await[0].is_ok());
    assert!(
        nats.publish(std::slice::from_ref(&m)).await[0].is_ok(),
        "a duplicate is still a success"
    );
    let mut sub = nats
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .expect_message();
    assert_eq!(d.message.id, m.id);
    assert_eq!(d.message.payload, m.payload);
    sub.ack(d.tag).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "only one copy is stored"
    );
    assert_eq!(
        nats.lag(&Subscription::events(&topic, "svc"))
            .await
            .unwrap(),
        Some(0)
    );
    cleanup(Kind::Event, &topic).await;
}

/// A command sent before its owner subscribed is rejected (no stream takes it), not dropped;
/// after the owner subscribed it is delivered.
#[tokio::test]
async fn a_command_needs_its_owner() {
    let queue = unique("cmds");
    let nats = transport().await;
    let cmd = Message::raw_command(&queue, "Charge", b"{}".to_vec());
    let err = nats
        .publish(std::slice::from_ref(&cmd))
        .await
        .remove(0)
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("owner has not subscribed"),
        "{err}"
    );
    let mut owner = nats
        .subscribe(&Subscription::commands(&queue, "billing"))
        .await
        .unwrap();
    assert!(nats.publish(std::slice::from_ref(&cmd)).await[0].is_ok());
    let d = tokio::time::timeout(Duration::from_secs(10), owner.next())
        .await
        .unwrap()
        .unwrap()
        .expect_message();
    assert_eq!(d.message.id, cmd.id);
    assert_eq!(d.message.kind, Kind::Command);
    owner.ack(d.tag).await.unwrap();
    cleanup(Kind::Command, &queue).await;
}

/// Destinations that would reach other subjects are refused before anything is sent.
#[tokio::test]
async fn wildcard_destinations_are_refused() {
    let nats = transport().await;
    let bad = Message::raw_event("orders.>", "E", b"1".to_vec());
    let err = nats
        .publish(std::slice::from_ref(&bad))
        .await
        .remove(0)
        .unwrap_err();
    assert!(err.to_string().contains("not usable on NATS"), "{err}");
}

/// A NATS server of this test's own, with a user and password, on a free port; stopped on drop.
struct PrivateServer {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateServer {
    fn start(user: &str, pass: &str) -> PrivateServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("herald-nats-auth"));
        let bin = ["nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok()
            })
            .expect("nats-server must be installed (see .ci/run)");
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .args(["--user", user, "--pass", pass])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateServer { child, port, dir }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Credentials in the URL are used (async-nats itself ignores them there), percent-escapes
/// included; a wrong password is a configuration error at once, not a background retry loop that
/// looks connected; the password is never in the error.
#[tokio::test]
async fn credentials_in_the_url_are_used_and_a_refused_login_is_fatal() {
    let server = PrivateServer::start("herald", "p@ss:w0rd");
    let good = format!("nats://herald:p%40ss%3Aw0rd@127.0.0.1:{}", server.port);
    let nats = NatsTransport::connect(SecretUrl::parse("broker", &good).unwrap())
        .await
        .unwrap();
    let topic = unique("auth");
    let m = Message::raw_event(&topic, "T", b"x".to_vec());
    let r = nats.publish(std::slice::from_ref(&m)).await;
    assert!(r[0].is_ok(), "{:?}", r[0]);

    let bad = format!("nats://herald:wrong-s3cret@127.0.0.1:{}", server.port);
    let err = match NatsTransport::connect(SecretUrl::parse("broker", &bad).unwrap()).await {
        Ok(_) => panic!("a wrong password connected"),
        Err(e) => e,
    };
    assert!(
        matches!(err, herald_core::Error::Config(_)),
        "{}",
        err.chain()
    );
    assert!(err.chain().contains("refused the login"), "{}", err.chain());
    assert!(!err.chain().contains("wrong-s3cret"), "{}", err.chain());
}

/// Two destinations whose stream names collide (`a_b` and `a.b`): the second is refused with a
/// reason that says so (it was dead-lettered as "the stream is missing"), the first keeps working.
#[tokio::test]
async fn destinations_sharing_a_stream_name_are_refused_with_the_reason() {
    let base = unique("fold");
    let underscore = format!("{base}_x");
    let dotted = format!("{base}.x");
    let nats = transport().await;
    let r = nats
        .publish(&[Message::raw_event(&underscore, "T", b"1".to_vec())])
        .await;
    assert!(r[0].is_ok(), "{:?}", r[0]);
    let r = nats
        .publish(&[
            Message::raw_event(&dotted, "T", b"2".to_vec()),
            Message::raw_event(&underscore, "T", b"3".to_vec()),
        ])
        .await;
    let err = r[0].as_ref().unwrap_err();
    assert!(
        matches!(err, herald_core::Error::Unpublishable { .. })
            && err.to_string().contains("differ only in"),
        "{err}"
    );
    assert!(r[1].is_ok(), "{:?}", r[1]);
    cleanup(Kind::Event, &underscore).await;
}
