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
