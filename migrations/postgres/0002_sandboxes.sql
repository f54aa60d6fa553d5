CREATE TABLE sandboxes (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    template        TEXT NOT NULL,
    state           TEXT NOT NULL,
    -- Which node runs it: placement and proxying when there are several.
    node_id         TEXT NOT NULL,
    envd_token      TEXT NOT NULL,
    timeout_secs    BIGINT NOT NULL,
    metadata        JSONB NOT NULL,
    envs            JSONB NOT NULL,
    -- Create fields we accept but do not act on yet (network, lifecycle, …).
    extra           JSONB NOT NULL,
    -- Per-attachment hydrate status.
    volumes         JSONB NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    end_at          TIMESTAMPTZ,
    killed_at       TIMESTAMPTZ
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
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (owner_id, key)
);
