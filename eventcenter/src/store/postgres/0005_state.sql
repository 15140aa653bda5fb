-- The small state beside the log (as in SQLite): desired components per target at a generation,
-- the last component status of each node, permits, guards (freezes and breakers), rollouts and
-- their timelines. Each change is written with the events that record it, under the log head's
-- lock.
CREATE SEQUENCE components_generation;

CREATE TABLE desired_components (
    cluster    TEXT NOT NULL,
    target     TEXT NOT NULL,
    generation BIGINT NOT NULL,
    specs      BYTEA NOT NULL,
    PRIMARY KEY (cluster, target)
);

CREATE TABLE component_status (
    cluster    TEXT NOT NULL,
    node       TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    body       BYTEA NOT NULL,
    PRIMARY KEY (cluster, node)
);

CREATE TABLE permits (
    id         TEXT PRIMARY KEY,
    cluster    TEXT NOT NULL,
    granted_ms BIGINT NOT NULL,
    active     BOOLEAN NOT NULL,
    body       BYTEA NOT NULL
);
CREATE INDEX permits_recent ON permits (granted_ms);

CREATE TABLE guards (
    cluster TEXT PRIMARY KEY,
    body    BYTEA NOT NULL
);

CREATE TABLE rollouts (
    name    TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    body    BYTEA NOT NULL
);

CREATE TABLE rollout_events (
    name   TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    PRIMARY KEY (name, cursor)
);
