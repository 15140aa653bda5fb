-- Conditions and faults (as in SQLite): the latest state of each condition of each node, an
-- encoded nodekeeper.v1.NodeCondition; faults with their state beside an encoded
-- nodekeeper.v1.Fault. Condition events fold into them under the log head's lock.
CREATE TABLE conditions (
    cluster TEXT NOT NULL,
    node    TEXT NOT NULL,
    type    TEXT NOT NULL,
    body    BYTEA NOT NULL,
    PRIMARY KEY (cluster, node, type)
);

CREATE TABLE faults (
    id      BIGSERIAL PRIMARY KEY,
    cluster TEXT NOT NULL,
    node    TEXT NOT NULL,
    type    TEXT NOT NULL,
    state   INTEGER NOT NULL,
    body    BYTEA NOT NULL
);
CREATE INDEX faults_open ON faults (cluster, node, type) WHERE state <> 4;
CREATE INDEX faults_node ON faults (cluster, node);
