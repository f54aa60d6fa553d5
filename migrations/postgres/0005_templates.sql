-- Custom templates: an owner's alias for a root filesystem built from a
-- spec. `ready_build` is the build new sandboxes get; a rebuild only moves
-- it once it succeeds, and never removes what running sandboxes use.
CREATE TABLE templates (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    alias           TEXT NOT NULL,
    spec            JSONB NOT NULL,
    vcpus           BIGINT NOT NULL,
    memory_mb       BIGINT NOT NULL,
    disk_mb         BIGINT NOT NULL,
    ready_build     TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    UNIQUE (owner_id, alias)
);

CREATE TABLE template_builds (
    id              TEXT PRIMARY KEY,
    template_id     TEXT NOT NULL REFERENCES templates(id),
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    -- building | completed | failed
    status          TEXT NOT NULL,
    -- The bounded log, written when the build ends (live lines stay in the
    -- building node's memory until then).
    logs            JSONB NOT NULL,
    node_id         TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ
);
CREATE INDEX template_builds_node_status ON template_builds(node_id, status);
