-- keygate schema, PostgreSQL. The same tables as the SQLite schema, so that
-- both backends behave alike: times are Unix milliseconds (BIGINT), flags
-- are BOOLEAN, JSON is kept as TEXT. Secrets are never stored: only SHA-256
-- digests (32-byte BYTEA).

CREATE TABLE account_settings (
    id                    INTEGER PRIMARY KEY CHECK (id = 1),
    api_keys_enabled      BOOLEAN NOT NULL DEFAULT TRUE,
    max_key_lifetime_secs BIGINT NOT NULL DEFAULT 7776000,
    max_keys_per_owner    BIGINT NOT NULL DEFAULT 10,
    resource_version      BIGINT NOT NULL DEFAULT 1,
    modified_ms           BIGINT NOT NULL
);
INSERT INTO account_settings (id, modified_ms)
VALUES (1, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT);

-- Ids are COLLATE "C": listings page by id with `id > cursor`, and must order
-- them bytewise as SQLite does, whatever the database's default collation.

-- Users (name = email) and service accounts (name = name): both own keys.
CREATE TABLE principals (
    id               TEXT COLLATE "C" PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind IN ('user', 'service-account')),
    name             TEXT NOT NULL,
    description      TEXT NOT NULL DEFAULT '',
    account_role     TEXT NOT NULL CHECK (account_role IN ('admin', 'developer', 'read')),
    namespace_access TEXT NOT NULL DEFAULT '{}',
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    resource_version BIGINT NOT NULL DEFAULT 1,
    created_ms       BIGINT NOT NULL,
    modified_ms      BIGINT NOT NULL,
    UNIQUE (kind, name)
);

CREATE TABLE namespaces (
    id               TEXT COLLATE "C" PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    description      TEXT NOT NULL DEFAULT '',
    resource_version BIGINT NOT NULL DEFAULT 1,
    created_ms       BIGINT NOT NULL,
    modified_ms      BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id                      TEXT COLLATE "C" PRIMARY KEY,
    secret_digest           BYTEA NOT NULL,
    previous_digest         BYTEA,
    previous_valid_until_ms BIGINT,
    display_name            TEXT NOT NULL,
    description             TEXT NOT NULL DEFAULT '',
    owner_id                TEXT COLLATE "C" NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    namespaces              TEXT NOT NULL DEFAULT '[]',
    expiry_ms               BIGINT,
    disabled                BOOLEAN NOT NULL DEFAULT FALSE,
    resource_version        BIGINT NOT NULL DEFAULT 1,
    created_ms              BIGINT NOT NULL,
    modified_ms             BIGINT NOT NULL,
    last_used_ms            BIGINT,
    request_count           BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_by_owner ON api_keys (owner_id);

CREATE TABLE audit_events (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    time_ms     BIGINT NOT NULL,
    actor_id    TEXT NOT NULL,
    actor_type  TEXT NOT NULL,
    actor_name  TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);

-- The change feed: one row per committed change that can alter what a
-- replica's cache holds. `seq` is gapless and in commit order (writers take
-- an advisory lock before assigning it), so a replica that has applied
-- everything up to N only ever needs `seq > N`, and a jump tells it that
-- pruned rows were missed.
CREATE TABLE changes (
    seq      BIGINT PRIMARY KEY,
    time_ms  BIGINT NOT NULL,
    key_ids  TEXT NOT NULL DEFAULT '[]',
    settings BOOLEAN NOT NULL DEFAULT FALSE
);
