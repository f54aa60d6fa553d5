CREATE TABLE owners (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);

-- Only the SHA-256 of a key is stored; the key itself is shown once at creation.
CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES owners(id),
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX api_keys_owner ON api_keys(owner_id);

-- A deleted volume keeps its row (state 'deleted', blob gone) so that a
-- repeated DELETE by its owner stays idempotent and attaches get 403.
CREATE TABLE volumes (
    id                  TEXT PRIMARY KEY,
    owner_id            TEXT NOT NULL REFERENCES owners(id),
    name                TEXT NOT NULL,
    blob_key            TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    content_type        TEXT NOT NULL,
    uncompressed_bytes  INTEGER NOT NULL,
    entry_count         INTEGER NOT NULL,
    metadata            TEXT NOT NULL,
    state               TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX volumes_owner_created ON volumes(owner_id, created_at DESC);
