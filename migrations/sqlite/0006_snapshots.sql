-- Filesystem snapshots of sandboxes: the sandbox's root filesystem as a
-- tar.gz in object storage (key snapshots/OWNER/ID.tar.gz), so it outlives
-- the sandbox and its node. Memory is not kept (mem_size_bytes is NULL).
CREATE TABLE snapshots (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    sandbox_id      TEXT NOT NULL,
    -- What the sandbox ran from: a built-in name or a custom template id.
    template        TEXT NOT NULL,
    source          TEXT NOT NULL,
    blob_key        TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE INDEX snapshots_owner_created ON snapshots(owner_id, created_at DESC, id DESC);
