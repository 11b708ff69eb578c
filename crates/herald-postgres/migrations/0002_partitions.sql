-- Relays share the outbox by partitions of the ordering keys: each relay run (an incarnation)
-- heart-beats in herald_outbox_relays, and each partition has at most one owning incarnation.
-- A relay that stops heart-beating is marked taken over and its partitions pass to another.

CREATE TABLE IF NOT EXISTS herald_outbox_relays (
    incarnation   BIGINT      PRIMARY KEY,             -- one run of one relay process
    relay_id      TEXT        NOT NULL,
    host          TEXT        NOT NULL,
    pid           BIGINT      NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,                -- alive until then unless renewed
    stopped_at    TIMESTAMPTZ,                         -- stopped gracefully
    taken_over_by BIGINT,                              -- the incarnation that took it over
    taken_over_at TIMESTAMPTZ
);

-- 16 partitions: a key's partition is (hashtext(ordering_key) & 2147483647) % 16, a row without
-- a key goes by (id & 2147483647) % 16. Every relay reads the count from this table.
CREATE TABLE IF NOT EXISTS herald_outbox_partitions (
    part          INTEGER     PRIMARY KEY,
    owner         BIGINT,                              -- the owning incarnation
    since         TIMESTAMPTZ
);

INSERT INTO herald_outbox_partitions (part) SELECT generate_series(0, 15) ON CONFLICT DO NOTHING
