-- herald on SQLite: outbox, dead letters and inbox.
-- `herald migrate` runs this file with `herald_outbox` replaced by the configured table name.
-- Times are microseconds since the Unix epoch (INTEGER).

CREATE TABLE IF NOT EXISTS herald_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,   -- publication order, assigned on insert
    message_id    TEXT    NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    kind          TEXT    NOT NULL DEFAULT 'event' CHECK (kind IN ('event', 'command')),
    message_type  TEXT    NOT NULL,
    source        TEXT    NOT NULL DEFAULT '',
    destination   TEXT    NOT NULL,
    ordering_key  TEXT,
    headers       TEXT    NOT NULL DEFAULT '{}',
    content_type  TEXT    NOT NULL DEFAULT 'application/json',
    payload       BLOB    NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    lease_owner   TEXT,
    lease_token   INTEGER,
    lease_until   INTEGER
);

-- Every index on the outbox is paid for by every producer's insert: there are two, the primary
-- key (claims walk it in id order) and the partial index below (empty for pending rows). Earlier
-- versions also indexed (ordering_key, id) and made message_id unique: neither is read any more.
DROP INDEX IF EXISTS herald_outbox_key_idx;
-- The rows under a live lease (or waiting out a retry delay): few, read once per claim to find
-- the keys that are busy.
CREATE INDEX IF NOT EXISTS herald_outbox_leased_idx ON herald_outbox (lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE IF NOT EXISTS herald_outbox_dead_letter (
    id              INTEGER PRIMARY KEY,               -- the outbox id it had
    message_id      TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    message_type    TEXT    NOT NULL,
    source          TEXT    NOT NULL,
    destination     TEXT    NOT NULL,
    ordering_key    TEXT,
    headers         TEXT    NOT NULL,
    content_type    TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    dead_lettered_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);

CREATE TABLE IF NOT EXISTS herald_outbox_inbox (
    consumer      TEXT    NOT NULL,
    message_id    TEXT    NOT NULL,
    processed_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS herald_outbox_inbox_processed_idx ON herald_outbox_inbox (processed_at);

-- Last applied version per consumer and key, for consumers that skip stale versions.
CREATE TABLE IF NOT EXISTS herald_outbox_inbox_version (
    consumer      TEXT    NOT NULL,
    ordering_key  TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    PRIMARY KEY (consumer, ordering_key)
);

-- Messages a consumer could not apply (handler kept failing, or undecodable: message_id NULL).
CREATE TABLE IF NOT EXISTS herald_outbox_consumer_dead_letter (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer         TEXT    NOT NULL,
    message_id       TEXT,
    kind             TEXT    NOT NULL DEFAULT 'event',
    message_type     TEXT    NOT NULL DEFAULT '',
    source           TEXT    NOT NULL DEFAULT '',
    destination      TEXT    NOT NULL,
    ordering_key     TEXT,
    headers          TEXT    NOT NULL DEFAULT '{}',
    content_type     TEXT    NOT NULL DEFAULT '',
    payload          BLOB    NOT NULL,
    created_at       INTEGER,
    attempts         INTEGER NOT NULL,
    reason           TEXT    NOT NULL,
    replay_requested INTEGER NOT NULL DEFAULT 0,
    dead_lettered_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);
