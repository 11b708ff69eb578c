//! `herald verify` end to end against real servers: the outbox mode passes under every fault the
//! environment allows, and the naive modes show the failures they are known for. Each run has a
//! fixed seed (so the fault plan is the same every time) and its own tables, topics and temporary
//! directory.
//!
//! Needs PostgreSQL, RabbitMQ and nats-server (`.ci/run` starts and installs them).

mod common;

use common::{amqp_url, pg_url};

use std::path::{Path, PathBuf};
use std::process::Command;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "herald-verify-test-{name}-{:x}",
        uuid::Uuid::new_v4().as_u64_pair().0
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `herald verify` with `args`, returns (exit success, the modes of verify.json by name).
fn verify(dir: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("verify")
        .args(args)
        .args(["--out", dir.to_str().unwrap()])
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_BROKER_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    let json = std::fs::read_to_string(dir.join("verify.json"))
        .unwrap_or_else(|e| panic!("verify.json missing ({e}); stderr:\n{stderr}"));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut modes = serde_json::Map::new();
    for m in doc["modes"].as_array().unwrap() {
        modes.insert(m["mode"].as_str().unwrap().to_owned(), m.clone());
    }
    (out.status.success(), serde_json::Value::Object(modes))
}

fn n(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

fn assert_outbox_held(modes: &serde_json::Value) {
    let o = &modes["outbox"];
    for field in ["lost", "phantom", "out_of_order", "duplicate_effects"] {
        assert_eq!(n(o, field), 0, "outbox {field}: {o}");
    }
    assert!(n(o, "committed") > 100, "the workload ran: {o}");
    assert!(n(o, "faults") > 0, "faults were injected: {o}");
    assert!(o["drained_s"].is_number(), "the backlog drained: {o}");
    assert_eq!(o["ok"], true);
}

/// SQLite + embedded broker: all four modes side by side.
#[test]
fn sqlite_embedded_outbox_holds_and_publish_then_save_makes_phantoms() {
    let dir = out_dir("sqlite");
    let (ok, modes) = verify(&dir, &["--duration", "4s", "--seed", "11", "--rate", "150"]);
    assert!(ok, "verify exits 0 when the outbox holds");
    assert_outbox_held(&modes);
    // Every rollback after a successful publish is a phantom.
    assert!(n(&modes["publish-then-save"], "phantom") > 0, "{modes}");
    assert!(dir.join("history-outbox.jsonl").exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// PostgreSQL + RabbitMQ: the outbox under relay kills, failpoints, zombies, terminated sessions
/// and a broken network to broker and database; save-then-publish loses under crashes.
#[test]
fn postgres_rabbitmq_outbox_holds_under_every_fault() {
    let dir = out_dir("pg-amqp");
    let (pg, amqp) = (pg_url(), amqp_url());
    // Fault families run separately, so each gets enough of the few seconds to matter.
    for faults in [
        "kill-relay,relay-failpoint,pause-relay,terminate-sessions",
        "broker-link,database-link",
    ] {
        let (ok, modes) = verify(
            &dir,
            &[
                "--database",
                &pg,
                "--broker",
                &amqp,
                "--duration",
                "6s",
                "--seed",
                "12",
                "--modes",
                "outbox",
                "--faults",
                faults,
            ],
        );
        assert!(ok, "verify exits 0 when the outbox holds ({faults})");
        assert_outbox_held(&modes);
    }

    let (ok, modes) = verify(
        &dir,
        &[
            "--database",
            &pg,
            "--broker",
            &amqp,
            "--duration",
            "3s",
            "--seed",
            "13",
            "--modes",
            "save-then-publish",
            "--faults",
            "app-crash",
        ],
    );
    assert!(ok, "no outbox mode ran, so nothing to fail");
    assert!(n(&modes["save-then-publish"], "lost") > 0, "{modes}");
    let _ = std::fs::remove_dir_all(dir);
}

/// PostgreSQL + NATS JetStream started by verify itself, so it can kill -9 and pause the broker.
#[test]
fn postgres_nats_outbox_holds_while_the_broker_is_killed_and_paused() {
    let Some(nats) = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        panic!("nats-server must be installed (.ci/run installs it)");
    };
    let dir = out_dir("pg-nats");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let store = dir.join("jetstream");
    let command = format!("{nats} -a 127.0.0.1 -p {port} -js -sd {}", store.display());
    let broker = format!("nats://127.0.0.1:{port}");
    let pg = pg_url();
    let (ok, modes) = verify(
        &dir,
        &[
            "--database",
            &pg,
            "--broker",
            &broker,
            "--broker-command",
            &command,
            "--duration",
            "8s",
            "--seed",
            "14",
            "--modes",
            "fallback,outbox",
            "--faults",
            "kill-broker,pause-broker,kill-relay,relay-failpoint,broker-link",
        ],
    );
    assert!(ok, "verify exits 0 when the outbox holds");
    assert_outbox_held(&modes);
    let _ = std::fs::remove_dir_all(dir);
}
