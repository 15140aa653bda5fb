-- The node an event is about, for a node's recent events: the id of its key `n/<cluster>/<node>`
-- in `origins` (NULL for events about a cluster or the fleet). Events stored before this
-- migration have none: a node's indexed history starts here, complete once retention has dropped
-- the older ones. The index holds the cursor (the rowid) after the node.
ALTER TABLE events ADD COLUMN node_ref INTEGER;
CREATE INDEX events_node ON events (node_ref) WHERE node_ref IS NOT NULL;
