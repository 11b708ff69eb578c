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
