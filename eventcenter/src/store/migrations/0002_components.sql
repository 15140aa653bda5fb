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
