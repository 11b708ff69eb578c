-- herald on MySQL 8 / MariaDB 10.6+: outbox, dead letters and inbox (InnoDB).
-- `herald migrate` runs this file with `herald_outbox` replaced by the configured table name, on a
-- connection of its own: MySQL commits implicitly around DDL, so it never runs in a caller's
-- transaction. Times are UTC (DATETIME(6) filled with UTC_TIMESTAMP(6)), whatever the session's
-- time zone.

CREATE TABLE IF NOT EXISTS herald_outbox (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY, -- publication order
    message_id    CHAR(36)     NOT NULL DEFAULT (UUID()),
    kind          VARCHAR(16)  NOT NULL DEFAULT 'event',
    message_type  VARCHAR(255) NOT NULL,
    source        VARCHAR(255) NOT NULL DEFAULT '',
    destination   VARCHAR(255) NOT NULL,
    ordering_key  VARCHAR(255) NULL,
    headers       TEXT         NOT NULL DEFAULT ('{}'),
    content_type  VARCHAR(255) NOT NULL DEFAULT 'application/json',
    payload       LONGBLOB     NOT NULL,
    created_at    DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    attempts      INT          NOT NULL DEFAULT 0,
    last_error    TEXT         NULL,
    lease_owner   VARCHAR(255) NULL,
    lease_token   BIGINT       NULL,
    lease_until   DATETIME(6)  NULL,
    CONSTRAINT herald_outbox_kind_check CHECK (kind IN ('event', 'command')),
    KEY herald_outbox_leased_idx (lease_until)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS herald_outbox_dead_letter (
    id               BIGINT       NOT NULL PRIMARY KEY, -- the outbox id it had
    message_id       CHAR(36)     NOT NULL,
    kind             VARCHAR(16)  NOT NULL,
    message_type     VARCHAR(255) NOT NULL,
    source           VARCHAR(255) NOT NULL,
    destination      VARCHAR(255) NOT NULL,
    ordering_key     VARCHAR(255) NULL,
    headers          TEXT         NOT NULL,
    content_type     VARCHAR(255) NOT NULL,
    payload          LONGBLOB     NOT NULL,
    created_at       DATETIME(6)  NOT NULL,
    attempts         INT          NOT NULL,
    reason           TEXT         NOT NULL,
    dead_lettered_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS herald_outbox_inbox (
    consumer      VARCHAR(255) NOT NULL,
    message_id    CHAR(36)     NOT NULL,
    processed_at  DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, message_id),
    KEY herald_outbox_inbox_processed_idx (processed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Last applied version per consumer and key, for consumers that skip stale versions.
CREATE TABLE IF NOT EXISTS herald_outbox_inbox_version (
    consumer      VARCHAR(255) NOT NULL,
    ordering_key  VARCHAR(255) NOT NULL,
    version       BIGINT       NOT NULL,
    PRIMARY KEY (consumer, ordering_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Messages a consumer could not apply (handler kept failing, or undecodable: message_id NULL).
CREATE TABLE IF NOT EXISTS herald_outbox_consumer_dead_letter (
    id               BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    consumer         VARCHAR(255) NOT NULL,
    message_id       CHAR(36)     NULL,
    kind             VARCHAR(16)  NOT NULL DEFAULT 'event',
    message_type     VARCHAR(255) NOT NULL DEFAULT '',
    source           VARCHAR(255) NOT NULL DEFAULT '',
    destination      VARCHAR(255) NOT NULL,
    ordering_key     VARCHAR(255) NULL,
    headers          TEXT         NOT NULL DEFAULT ('{}'),
    content_type     VARCHAR(255) NOT NULL DEFAULT '',
    payload          LONGBLOB     NOT NULL,
    created_at       DATETIME(6)  NULL,
    attempts         INT          NOT NULL,
    reason           TEXT         NOT NULL,
    replay_requested BOOLEAN      NOT NULL DEFAULT FALSE,
    dead_lettered_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
