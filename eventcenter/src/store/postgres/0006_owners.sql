-- Which replica watches a node's liveness (`owner`, the identity of its `replica/<id>` lease):
-- the one that has its agent's stream, or that took the node over when its owner died.
-- `connections` counts the node's agent streams open on its owner.
ALTER TABLE nodes ADD COLUMN owner TEXT;
ALTER TABLE nodes ADD COLUMN connections INTEGER NOT NULL DEFAULT 0;
CREATE INDEX nodes_owner ON nodes (owner) WHERE decommissioned_ms IS NULL;
