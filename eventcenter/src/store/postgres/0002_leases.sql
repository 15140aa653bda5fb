-- Leases for work that must run once among the replicas (and, later, a replica's hold on its
-- nodes). Times are the database server's, so the replicas' clocks do not matter. `epoch` grows
-- at each change of holder: a fencing token for what the holder writes.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    epoch      BIGINT NOT NULL
);
