//! Where the real servers are, for the process-level tests (`.ci/run` starts them).

/// PostgreSQL (`HERALD_TEST_POSTGRES`).
pub fn pg_url() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// RabbitMQ (`HERALD_TEST_AMQP`).
pub fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// MariaDB or MySQL (`HERALD_TEST_MYSQL`), without a database in the path.
#[allow(dead_code)]
pub fn mysql_server() -> String {
    std::env::var("HERALD_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
        .rsplit_once('/')
        .map(|(server, _)| server.to_owned())
        .unwrap_or_default()
}

/// NATS with JetStream (`HERALD_TEST_NATS`).
#[allow(dead_code)]
pub fn nats_url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}
