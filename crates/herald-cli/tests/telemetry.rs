//! `herald relay --http-addr` against the real PostgreSQL and RabbitMQ: the real Prometheus
//! server (Debian's `prometheus`) scrapes it and the values are read back through its HTTP API;
//! the spans it exports over OTLP/HTTP continue the rows' `traceparent`; JSON log lines carry
//! the trace id; `/readyz` turns 503, saying why, when the broker accepts TCP and never
//! answers, when the database is cut off, and when the outbox stalls, and turns 200 again after.
//!
//! Needs PostgreSQL, RabbitMQ and `prometheus` on the PATH (`.ci/run` installs and starts them).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Db, amqp_url, free_port, http_get, pg_url, relay, unique};
use herald_telemetry::sink::Sink;
use herald_testkit::{ChaosProxy, Link};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Kills the child when dropped (a failed assertion must not leave a relay running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

/// Reads the child's stderr as it comes (a full pipe would block the relay).
fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut pipe = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        use std::io::Read;
        let mut err = String::new();
        let _ = pipe.read_to_string(&mut err);
        err
    })
}

/// Stops the relay with SIGTERM (SIGKILL after 20 s) and returns what `log` collected.
fn stop(mut r: Running, log: std::thread::JoinHandle<String>) -> String {
    signal(&r.0, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.0.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = r.0.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log.join().unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `GET path` until `done` accepts the answer; panics with the last one after `within`.
async fn poll(
    at: SocketAddr,
    path: &str,
    within: Duration,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let last = match http_get(at, path) {
            Some((status, body)) => {
                let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
                if done(status, &json) {
                    return json;
                }
                (status, json)
            }
            None => (0, serde_json::Value::from("no answer (the relay exited?)")),
        };
        assert!(
            Instant::now() < deadline,
            "GET {path} never gave the expected answer within {within:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reasons `/readyz` gives, by check name.
fn reasons(body: &serde_json::Value) -> Vec<String> {
    body["relays"][0]["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["check"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The real Prometheus server, scraping `target` every second, on a private port.
struct Prometheus {
    child: Running,
    at: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("herald-prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let at = addr(free_port());
        let bin = ["/usr/bin/prometheus", "prometheus"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("the prometheus server must be installed (Debian's `prometheus`; .ci/run installs it)");
        let child = std::process::Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={at}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus {
            child: Running(child),
            at,
            dir,
        }
    }

    /// The value of an instant query with one series, once there is one.
    async fn value(&self, query: &str, within: Duration, done: impl Fn(f64) -> bool) -> f64 {
        let path = format!("/api/v1/query?query={}", encode(query));
        let body = poll(self.at, &path, within, |status, json| {
            status == 200
                && json["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(&done)
        })
        .await;
        body["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn insert(db: &Db, destination: &str, kind: &str, n: usize, traceparent: Option<&str>) {
    let headers = match traceparent {
        Some(tp) => serde_json::json!({ "traceparent": tp }).to_string(),
        None => "{}".to_owned(),
    };
    for i in 0..n {
        sqlx::query(
            "INSERT INTO herald_outbox (kind, message_type, destination, ordering_key, headers, payload) \
             VALUES ($1, 'OrderPlaced', $2, $3, $4::jsonb, convert_to('{}', 'UTF8'))",
        )
        .bind(kind)
        .bind(destination)
        .bind(format!("key-{}", i % 5))
        .bind(&headers)
        .execute(&db.pool)
        .await
        .unwrap();
    }
}

async fn wait_empty(db: &Db, within: Duration) {
    let deadline = Instant::now() + within;
    while db.pending().await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_what_was_published_and_the_spans_continue_the_rows() {
    let db = Db::new().await;
    let topic = unique("metrics");
    let sink = Sink::start().await.unwrap();
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    insert(&db, &topic, "event", 20, Some(&traceparent)).await;
    insert(&db, &topic, "event", 10, None).await;

    let http = addr(free_port());
    let http_arg = http.to_string();
    let child = relay(
        &db,
        &[
            "--http-addr",
            &http_arg,
            "--sample-interval",
            "500ms",
            "--log-format",
            "json",
        ],
    )
    .env("HERALD_LOG", "warn,herald_core::relay=debug")
    .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.http_endpoint())
    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    .env("OTEL_SERVICE_NAME", "herald-relay-test")
    .env("OTEL_BSP_SCHEDULE_DELAY", "100")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = child;
    let log = collect_stderr(&mut child);
    let relay = Running(child);
    wait_empty(&db, Duration::from_secs(30)).await;

    // The exposition itself, as a scraper sees it.
    let (status, text) = http_get(http, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    for line in [
        "# TYPE herald_relay_published_total counter",
        "# TYPE herald_relay_publish_duration_seconds histogram",
        "# TYPE herald_relay_claim_duration_seconds histogram",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }

    let prometheus = Prometheus::start(http);
    let long = Duration::from_secs(60);
    let published = format!("herald_relay_published_total{{destination=\"{topic}\"}}");
    assert_eq!(
        prometheus.value(&published, long, |v| v >= 30.0).await,
        30.0
    );
    assert_eq!(
        prometheus.value("up{job=\"herald\"}", long, |_| true).await,
        1.0
    );
    assert_eq!(
        prometheus
            .value("herald_relay_partitions_held", long, |_| true)
            .await,
        16.0
    );
    assert_eq!(
        prometheus
            .value("herald_dead_letters{side=\"outbox\"}", long, |_| true)
            .await,
        0.0
    );
    for (query, at_least) in [
        ("herald_relay_publish_duration_seconds_count", 1.0),
        ("herald_relay_claim_duration_seconds_count", 1.0),
        ("process_resident_memory_bytes", 1e6),
        ("process_open_fds", 3.0),
    ] {
        let v = prometheus.value(query, long, |_| true).await;
        assert!(v >= at_least, "{query} = {v}");
    }
    // Every query of the Grafana dashboard in docs/ is one Prometheus accepts.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$job", ".*");
            let path = format!("/api/v1/query?query={}", encode(&expr));
            let (status, body) = http_get(prometheus.at, &path).unwrap();
            assert_eq!(status, 200, "{expr}: {body}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} dashboard queries");
    drop(prometheus);
    // The alert rules in docs/OPERATIONS.md pass promtool's check.
    let doc = include_str!("../../../docs/OPERATIONS.md");
    let rules = doc
        .split("```yaml\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("OPERATIONS.md has the alert rules");
    let file = std::env::temp_dir().join(format!("{}.yml", unique("herald-rules")));
    std::fs::write(&file, rules).unwrap();
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (Debian's prometheus package) must be installed");
    let _ = std::fs::remove_file(&file);
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let stderr = stop(relay, log);
    // Every message had its publish span: continuing the row's trace where it had one.
    let spans = sink
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().filter(|s| s.name == "herald.publish").count() >= 30
        })
        .await;
    let publish: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "herald.publish")
        .collect();
    // Delivery is at least once (a lease lost on a slow machine publishes again): count ids.
    let ids = |f: &dyn Fn(&&&herald_telemetry::sink::ReceivedSpan) -> bool| {
        publish
            .iter()
            .filter(f)
            .map(|s| s.attributes["messaging.message.id"].clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert_eq!(ids(&|_| true), 30, "{spans:#?}");
    assert_eq!(
        ids(&|s| s.trace_id == TRACE && s.parent_span_id.as_deref() == Some(PARENT)),
        20,
        "{:#?}",
        &publish[..2]
    );
    assert_eq!(
        ids(&|s| s.parent_span_id.is_none()),
        10,
        "rows without a traceparent start a trace"
    );
    assert!(
        publish
            .iter()
            .all(|s| s.service.as_deref() == Some("herald-relay-test") && s.protocol == "http")
    );
    // JSON log lines emitted inside a publish span carry its trace id.
    let confirmed: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j["fields"]["message"] == "confirmed")
        .collect();
    assert!(confirmed.len() >= 30, "stderr:\n{stderr}");
    assert!(
        confirmed.iter().filter(|j| j["trace_id"] == TRACE).count() >= 20,
        "{:#?}",
        &confirmed[..2]
    );
    assert!(
        confirmed
            .iter()
            .all(|j| j["span_id"].as_str().is_some_and(|s| s.len() == 16))
    );
    db.drop().await;
}

/// `herald relay` on `database` and `broker`, serving its endpoints on a free port, sampling
/// every 500 ms; output discarded.
fn relay_serving(database: &str, broker: &str, extra: &[&str]) -> (Running, SocketAddr) {
    let http = addr(free_port());
    let http_arg = http.to_string();
    let mut args = vec![
        "relay",
        "--database",
        database,
        "--broker",
        broker,
        "--http-addr",
        &http_arg,
        "--sample-interval",
        "500ms",
    ];
    args.extend(extra);
    let child = common::herald(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Running(child), http)
}

fn host_port(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    let host = u.host_str().unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", u.port_or_known_default().unwrap_or(5672))
        .parse()
        .unwrap()
}

fn through(url: &str, proxy: SocketAddr) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("127.0.0.1")).unwrap();
    u.set_port(Some(proxy.port())).unwrap();
    u.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_broker_accepts_and_never_answers() {
    let db = Db::new().await;
    let proxy = ChaosProxy::start(host_port(&amqp_url())).await.unwrap();
    proxy.set(Link::Blackhole);
    let topic = unique("silent");
    insert(&db, &topic, "event", 3, None).await;
    let broker = through(&amqp_url(), proxy.addr());
    let (_relay, http) = relay_serving(
        &db.url,
        &broker,
        &["--publish-timeout", "2s", "--unreachable-after", "2s"],
    );

    let body = poll(http, "/readyz", Duration::from_secs(60), |status, body| {
        status == 503 && reasons(body).contains(&"broker".to_owned())
    })
    .await;
    let message = body["relays"][0]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == "broker")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("broker unreachable"), "{message}");
    assert!(!message.contains("guest:guest"), "no password in {message}");
    // Alive all the while: the loops turn, only the broker is silent.
    let (status, _) = http_get(http, "/healthz").unwrap();
    assert_eq!(status, 200);
    assert_eq!(db.pending().await, 3);

    proxy.set(Link::Healthy);
    poll(http, "/readyz", Duration::from_secs(60), |status, _| {
        status == 200
    })
    .await;
    wait_empty(&db, Duration::from_secs(60)).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_database_is_cut_off() {
    let db = Db::new().await;
    let proxy = ChaosProxy::start(host_port(&pg_url())).await.unwrap();
    let database = through(&db.url, proxy.addr());
    let (_relay, http) = relay_serving(&database, &amqp_url(), &["--unreachable-after", "2s"]);
    poll(http, "/readyz", Duration::from_secs(30), |status, _| {
        status == 200
    })
    .await;

    proxy.cut();
    let body = poll(http, "/readyz", Duration::from_secs(30), |status, body| {
        status == 503 && reasons(body).contains(&"database".to_owned())
    })
    .await;
    assert!(
        body["relays"][0]["reasons"][0]["for_seconds"]
            .as_f64()
            .unwrap()
            >= 2.0
    );
    proxy.heal();
    poll(http, "/readyz", Duration::from_secs(30), |status, _| {
        status == 200
    })
    .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_outbox_stalls_and_metrics_show_why() {
    let db = Db::new().await;
    // A command whose owner has not declared its queue: refused, retried, never published.
    let queue = unique("unowned");
    insert(&db, &queue, "command", 1, None).await;
    let (_relay, http) = relay_serving(
        &db.url,
        &amqp_url(),
        &["--stall-after", "2s", "--retry-delay-max", "1s"],
    );
    let body = poll(http, "/readyz", Duration::from_secs(30), |status, body| {
        status == 503 && reasons(body) == ["stalled"]
    })
    .await;
    assert_eq!(body["relays"][0]["pending"], 1);
    let (_, text) = http_get(http, "/metrics").unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    assert!(value("herald_relay_rejected_total") >= 1.0);
    assert_eq!(
        value(&format!(
            "herald_outbox_pending_messages{{destination=\"{queue}\"}}"
        )),
        1.0
    );
    assert!(
        value(&format!(
            "herald_outbox_oldest_pending_age_seconds{{destination=\"{queue}\"}}"
        )) >= 1.0
    );

    // The owner arrives: the command goes out, the stall ends.
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    wait_empty(&db, Duration::from_secs(30)).await;
    poll(http, "/readyz", Duration::from_secs(30), |status, _| {
        status == 200
    })
    .await;
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    db.drop().await;
}
