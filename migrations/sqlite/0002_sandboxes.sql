CREATE TABLE sandboxes (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    template        TEXT NOT NULL,
    state           TEXT NOT NULL,
    -- Which node runs it: placement and proxying when there are several.
    node_id         TEXT NOT NULL,
    envd_token      TEXT NOT NULL,
    timeout_secs    INTEGER NOT NULL,
    metadata        TEXT NOT NULL,
    envs            TEXT NOT NULL,
    -- Create fields we accept but do not act on yet (network, lifecycle, …).
    extra           TEXT NOT NULL,
    -- Per-attachment hydrate status.
    volumes         TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    end_at          TEXT,
    killed_at       TEXT
);
CREATE INDEX sandboxes_owner_started ON sandboxes(owner_id, started_at DESC, id DESC);
CREATE INDEX sandboxes_node_state ON sandboxes(node_id, state);

CREATE TABLE idempotency_keys (
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    key             TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    -- NULL while the first request is still running.
    status          INTEGER,
    response        TEXT,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (owner_id, key)
);
