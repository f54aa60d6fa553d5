-- Per-owner quota overrides; a NULL column means "the configured default".
CREATE TABLE owner_quotas (
    owner_id                TEXT PRIMARY KEY REFERENCES owners(id),
    max_running_sandboxes   BIGINT,
    max_volumes             BIGINT,
    max_volume_bytes        BIGINT
);

-- The periodic reconciler and sweeps look rows up by state and age.
CREATE INDEX volumes_state_updated ON volumes(state, updated_at);
CREATE INDEX sandboxes_state_killed ON sandboxes(state, killed_at);
CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
