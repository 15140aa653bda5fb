-- When a node was decommissioned (NULL: it is in the fleet); its `info` says so too.
ALTER TABLE nodes ADD COLUMN decommissioned_ms INTEGER;
