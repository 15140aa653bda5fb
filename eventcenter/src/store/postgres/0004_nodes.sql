-- One row per node (as in SQLite): `info` an encoded nodekeeper.v1.Node with its static fields,
-- liveness in the columns, `decommissioned_ms` set while it is decommissioned.
CREATE TABLE nodes (
    cluster             TEXT NOT NULL,
    name                TEXT NOT NULL,
    lost                BOOLEAN NOT NULL DEFAULT FALSE,
    liveness_changed_ms BIGINT NOT NULL,
    info                BYTEA NOT NULL,
    decommissioned_ms   BIGINT,
    PRIMARY KEY (cluster, name)
);
