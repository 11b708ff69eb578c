-- Relays share the outbox by partitions: each relay run (an incarnation) heart-beats in
-- herald_outbox_relays, and each partition has at most one owning incarnation. SQLite has one
-- writer and no hash function in SQL, so its outbox has one partition: one relay publishes, the
-- others stand by and take over when it stops heart-beating. Times are microseconds since the epoch.

CREATE TABLE IF NOT EXISTS herald_outbox_relays (
    incarnation   INTEGER PRIMARY KEY,
    relay_id      TEXT    NOT NULL,
    host          TEXT    NOT NULL,
    pid           INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    stopped_at    INTEGER,
    taken_over_by INTEGER,
    taken_over_at INTEGER
);

CREATE TABLE IF NOT EXISTS herald_outbox_partitions (
    part          INTEGER PRIMARY KEY,
    owner         INTEGER,
    since         INTEGER
);

INSERT OR IGNORE INTO herald_outbox_partitions (part) VALUES (0)
