-- Relays share the outbox by partitions of the ordering keys: each relay run (an incarnation)
-- heart-beats in herald_outbox_relays, and each partition has at most one owning incarnation.
-- A relay that stops heart-beating is marked taken over and its partitions pass to another.

CREATE TABLE IF NOT EXISTS herald_outbox_relays (
    incarnation   BIGINT       NOT NULL PRIMARY KEY,
    relay_id      VARCHAR(255) NOT NULL,
    host          VARCHAR(255) NOT NULL,
    pid           BIGINT       NOT NULL,
    started_at    DATETIME(6)  NOT NULL,
    heartbeat_at  DATETIME(6)  NOT NULL,
    expires_at    DATETIME(6)  NOT NULL,
    stopped_at    DATETIME(6)  NULL,
    taken_over_by BIGINT       NULL,
    taken_over_at DATETIME(6)  NULL
) ENGINE = InnoDB;

-- 16 partitions: a key's partition is CRC32(ordering_key) % 16, a row without a key goes by
-- (id & 2147483647) % 16. Every relay reads the count from this table.
CREATE TABLE IF NOT EXISTS herald_outbox_partitions (
    part          INT          NOT NULL PRIMARY KEY,
    owner         BIGINT       NULL,
    since         DATETIME(6)  NULL
) ENGINE = InnoDB;

INSERT IGNORE INTO herald_outbox_partitions (part) VALUES
    (0), (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15)
