-- The event log on PostgreSQL (the same shape as SQLite's, see ../schema.sql).

-- The newest cursor. Every append transaction locks this row first, so appends of all replicas
-- commit one after another, in cursor order. `received_ms` is the newest append's receive time:
-- the next one takes at least it, so times never go back along the log (retention removes a
-- prefix) whatever the replicas' clocks. `floor`: every cursor up to it was removed by retention.
CREATE TABLE log_head (
    one         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    head        BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    floor       BIGINT NOT NULL
);
INSERT INTO log_head (head, received_ms, floor) VALUES (0, 0, 0);

-- Interned keys: event origins (`a/<cluster>/<node>/<boot>`, `p/<producer>/<report>`,
-- `c/<replica>`) and nodes (`n/<cluster>/<node>`).
CREATE TABLE origins (
    id  BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL UNIQUE
);

-- Append-only; (origin, origin_seq) is the event's identity.
CREATE TABLE events (
    cursor      BIGINT PRIMARY KEY,
    origin      BIGINT NOT NULL,
    origin_seq  BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    fault_id    BIGINT,
    node_ref    BIGINT,
    body        BYTEA NOT NULL
);
CREATE UNIQUE INDEX events_identity ON events (origin, origin_seq);
CREATE INDEX events_fault ON events (fault_id) WHERE fault_id IS NOT NULL;
CREATE INDEX events_node ON events (node_ref, cursor) WHERE node_ref IS NOT NULL;

-- Durable consumers: the position each acknowledged (the key `owner:name` as in SQLite).
CREATE TABLE consumers (
    name         TEXT PRIMARY KEY,
    acked_cursor BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL
);
