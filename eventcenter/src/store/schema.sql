-- The schema every migration together must produce; a test compares them. Update it with
-- each new migration.

-- Store-wide values: retention_floor is the highest cursor deleted by retention.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- Producer identities, interned: "a/<cluster>/<node>/<boot id>" for an agent boot,
-- "p/<producer>/<report id>" for a report, "c" for the center itself.
CREATE TABLE origins (
    id  INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE
);

-- Append-only. `cursor` is assigned by the single writer in commit order; (origin, origin_seq)
-- is the event's identity, so a resent observation is stored once.
-- `node_ref` (added by 0006) is the `origins` id of `n/<cluster>/<node>` for events about a node.
CREATE TABLE events (
    cursor      INTEGER PRIMARY KEY,
    origin      INTEGER NOT NULL,
    origin_seq  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    fault_id    INTEGER,
    body        BLOB NOT NULL
, node_ref INTEGER);
CREATE UNIQUE INDEX events_identity ON events (origin, origin_seq);
CREATE INDEX events_fault ON events (fault_id) WHERE fault_id IS NOT NULL;
CREATE INDEX events_node ON events (node_ref) WHERE node_ref IS NOT NULL;

-- One row per node; `info` is an encoded nodekeeper.v1.Node with its static fields;
-- `decommissioned_ms` is set while the node is decommissioned (added by 0004 with ALTER TABLE,
-- whose text SQLite splices in where it is below).
CREATE TABLE nodes (
    cluster             TEXT NOT NULL,
    name                TEXT NOT NULL,
    lost                INTEGER NOT NULL DEFAULT 0,
    liveness_changed_ms INTEGER NOT NULL,
    info                BLOB NOT NULL, decommissioned_ms INTEGER,
    PRIMARY KEY (cluster, name)
) WITHOUT ROWID;

-- `body` is an encoded nodekeeper.v1.Fault kept in step with the columns.
CREATE TABLE faults (
    id      INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    node    TEXT NOT NULL,
    type    TEXT NOT NULL,
    state   INTEGER NOT NULL,
    body    BLOB NOT NULL
);
CREATE INDEX faults_open ON faults (cluster, node, type) WHERE state <> 4;
CREATE INDEX faults_node ON faults (cluster, node);

-- Latest state of each condition of each node; `body` is an encoded nodekeeper.v1.NodeCondition.
CREATE TABLE conditions (
    cluster TEXT NOT NULL,
    node    TEXT NOT NULL,
    type    TEXT NOT NULL,
    body    BLOB NOT NULL,
    PRIMARY KEY (cluster, node, type)
) WITHOUT ROWID;

-- Durable named consumers and their acknowledged positions.
CREATE TABLE consumers (
    name         TEXT PRIMARY KEY,
    acked_cursor INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
) WITHOUT ROWID;
-- Desired components: one row per target of a cluster ("node:<name>" or "selector:<k=v,...>"),
-- `specs` an encoded nodekeeper.v1.DesiredState; `generation` from meta's components_generation.
CREATE TABLE desired_components (
    cluster    TEXT NOT NULL,
    target     TEXT NOT NULL,
    generation INTEGER NOT NULL,
    specs      BLOB NOT NULL,
    PRIMARY KEY (cluster, target)
) WITHOUT ROWID;

-- The latest component status each node reported: an encoded nodekeeper.v1.ComponentStatusReport.
CREATE TABLE component_status (
    cluster    TEXT NOT NULL,
    node       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    body       BLOB NOT NULL,
    PRIMARY KEY (cluster, node)
) WITHOUT ROWID;
-- The rate-limit center. `body` of a permit is an encoded nodekeeper.v1.Permit; `active` is 0
-- once it was released or its lease expired. `granted_ms` serves the per-window limits.
CREATE TABLE permits (
    id         TEXT PRIMARY KEY,
    cluster    TEXT NOT NULL,
    granted_ms INTEGER NOT NULL,
    active     INTEGER NOT NULL,
    body       BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX permits_recent ON permits (granted_ms);

-- Freezes and breakers: one row per cluster ("" for the global freeze); `body` an encoded
-- nodekeeper.v1.ClusterGuard.
CREATE TABLE guards (
    cluster TEXT PRIMARY KEY,
    body    BLOB NOT NULL
) WITHOUT ROWID;

-- Fleet rollouts: `body` an encoded nodekeeper.v1.Rollout (spec, phase, waves, each node's state).
CREATE TABLE rollouts (
    name    TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    body    BLOB NOT NULL
) WITHOUT ROWID;

-- The events of each rollout's timeline.
CREATE TABLE rollout_events (
    name   TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    PRIMARY KEY (name, cursor)
) WITHOUT ROWID;
