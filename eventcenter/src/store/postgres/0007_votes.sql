-- Detector votes (`DetectorVote` events) marked, so that the leader folds every replica's votes
-- by reading only them (a partial index holds just those rows) instead of the whole log.
ALTER TABLE events ADD COLUMN vote BOOLEAN;
CREATE INDEX events_votes ON events (cursor) WHERE vote;
