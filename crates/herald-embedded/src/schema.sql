CREATE TABLE IF NOT EXISTS herald_log (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination   TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    message_id    TEXT    NOT NULL,
    message_type  TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    ordering_key  TEXT,
    headers       TEXT    NOT NULL,
    content_type  TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    created_at    INTEGER NOT NULL,
    published_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS herald_log_destination_idx ON herald_log (destination, seq);
CREATE INDEX IF NOT EXISTS herald_log_published_idx ON herald_log (destination, published_at);
CREATE TABLE IF NOT EXISTS herald_group_offset (
    grp           TEXT    NOT NULL,
    destination   TEXT    NOT NULL,
    acked         INTEGER NOT NULL,
    handed        INTEGER NOT NULL,
    PRIMARY KEY (grp, destination)
);
CREATE TABLE IF NOT EXISTS herald_inflight (
    grp           TEXT    NOT NULL,
    destination   TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    deliveries    INTEGER NOT NULL,
    acked         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, destination, seq)
);
CREATE TABLE IF NOT EXISTS herald_dead (
    grp           TEXT    NOT NULL,
    destination   TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    deliveries    INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    dead_at       INTEGER NOT NULL,
    PRIMARY KEY (grp, destination, seq)
);
CREATE TABLE IF NOT EXISTS herald_queue_owner (
    queue         TEXT    PRIMARY KEY,
    service       TEXT    NOT NULL
)
