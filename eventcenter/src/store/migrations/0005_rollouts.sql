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
