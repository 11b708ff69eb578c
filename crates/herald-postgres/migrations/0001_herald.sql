-- herald on PostgreSQL: outbox, dead letters and inbox.
-- `herald migrate` runs this file with `herald_outbox` replaced by the configured table name.

CREATE TABLE IF NOT EXISTS herald_outbox (
    id            BIGSERIAL   PRIMARY KEY,             -- publication order, assigned on insert
    message_id    UUID        NOT NULL DEFAULT gen_random_uuid(),
    kind          TEXT        NOT NULL DEFAULT 'event' CHECK (kind IN ('event', 'command')),
    message_type  TEXT        NOT NULL,
    source        TEXT        NOT NULL DEFAULT '',
    destination   TEXT        NOT NULL,
    ordering_key  TEXT,
    headers       JSONB       NOT NULL DEFAULT '{}',
    content_type  TEXT        NOT NULL DEFAULT 'application/json',
    payload       BYTEA       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts      INTEGER     NOT NULL DEFAULT 0,
    last_error    TEXT,
    lease_owner   TEXT,
    lease_token   BIGINT,
    lease_until   TIMESTAMPTZ
);

-- Every index on the outbox is paid for by every producer's insert: there are two, the primary
-- key (claims walk it in id order) and the partial index below (empty for pending rows). Earlier
-- versions also indexed (ordering_key, id) and made message_id unique: neither is read any more.
DROP INDEX IF EXISTS herald_outbox_key_idx;
ALTER TABLE herald_outbox DROP CONSTRAINT IF EXISTS herald_outbox_message_id_key;
-- The rows under a live lease (or waiting out a retry delay): few, read once per claim to find
-- the keys that are busy.
CREATE INDEX IF NOT EXISTS herald_outbox_leased_idx ON herald_outbox (lease_until) WHERE lease_until IS NOT NULL;

-- Every published row is deleted, so the table is a queue: vacuum it after a fixed number of dead
-- rows rather than a fraction of its (small) size, and without cost-based throttling.
ALTER TABLE herald_outbox SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 2000,
                               autovacuum_vacuum_cost_delay = 0);

CREATE TABLE IF NOT EXISTS herald_outbox_dead_letter (
    id               BIGINT      PRIMARY KEY,          -- the outbox id it had
    message_id       UUID        NOT NULL,
    kind             TEXT        NOT NULL,
    message_type     TEXT        NOT NULL,
    source           TEXT        NOT NULL,
    destination      TEXT        NOT NULL,
    ordering_key     TEXT,
    headers          JSONB       NOT NULL,
    content_type     TEXT        NOT NULL,
    payload          BYTEA       NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    attempts         INTEGER     NOT NULL,
    reason           TEXT        NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS herald_outbox_inbox (
    consumer      TEXT        NOT NULL,
    message_id    UUID        NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS herald_outbox_inbox_processed_idx ON herald_outbox_inbox (processed_at);

-- Last applied version per consumer and key, for consumers that skip stale versions.
CREATE TABLE IF NOT EXISTS herald_outbox_inbox_version (
    consumer      TEXT        NOT NULL,
    ordering_key  TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    PRIMARY KEY (consumer, ordering_key)
);

-- Messages a consumer could not apply (handler kept failing, or undecodable: message_id NULL).
CREATE TABLE IF NOT EXISTS herald_outbox_consumer_dead_letter (
    id               BIGSERIAL   PRIMARY KEY,
    consumer         TEXT        NOT NULL,
    message_id       UUID,
    kind             TEXT        NOT NULL DEFAULT 'event',
    message_type     TEXT        NOT NULL DEFAULT '',
    source           TEXT        NOT NULL DEFAULT '',
    destination      TEXT        NOT NULL,
    ordering_key     TEXT,
    headers          JSONB       NOT NULL DEFAULT '{}',
    content_type     TEXT        NOT NULL DEFAULT '',
    payload          BYTEA       NOT NULL,
    created_at       TIMESTAMPTZ,
    attempts         INTEGER     NOT NULL,
    reason           TEXT        NOT NULL,
    replay_requested BOOLEAN     NOT NULL DEFAULT false,
    dead_lettered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
