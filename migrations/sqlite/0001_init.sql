-- keygate schema, SQLite. Times are Unix milliseconds; flags are 0/1.
-- Secrets are never stored: only SHA-256 digests (32-byte BLOBs).

CREATE TABLE account_settings (
    id                    INTEGER PRIMARY KEY CHECK (id = 1),
    api_keys_enabled      INTEGER NOT NULL DEFAULT 1,
    max_key_lifetime_secs INTEGER NOT NULL DEFAULT 7776000,
    max_keys_per_owner    INTEGER NOT NULL DEFAULT 10,
    resource_version      INTEGER NOT NULL DEFAULT 1,
    modified_ms           INTEGER NOT NULL
);
INSERT INTO account_settings (id, modified_ms) VALUES (1, CAST(strftime('%s', 'now') AS INTEGER) * 1000);

-- Users (name = email) and service accounts (name = name): both own keys.
CREATE TABLE principals (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind IN ('user', 'service-account')),
    name             TEXT NOT NULL,
    description      TEXT NOT NULL DEFAULT '',
    account_role     TEXT NOT NULL CHECK (account_role IN ('admin', 'developer', 'read')),
    namespace_access TEXT NOT NULL DEFAULT '{}',
    disabled         INTEGER NOT NULL DEFAULT 0,
    resource_version INTEGER NOT NULL DEFAULT 1,
    created_ms       INTEGER NOT NULL,
    modified_ms      INTEGER NOT NULL,
    UNIQUE (kind, name)
);

CREATE TABLE namespaces (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    description      TEXT NOT NULL DEFAULT '',
    resource_version INTEGER NOT NULL DEFAULT 1,
    created_ms       INTEGER NOT NULL,
    modified_ms      INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id                      TEXT PRIMARY KEY,
    secret_digest           BLOB NOT NULL,
    previous_digest         BLOB,
    previous_valid_until_ms INTEGER,
    display_name            TEXT NOT NULL,
    description             TEXT NOT NULL DEFAULT '',
    owner_id                TEXT NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    namespaces              TEXT NOT NULL DEFAULT '[]',
    expiry_ms               INTEGER,
    disabled                INTEGER NOT NULL DEFAULT 0,
    resource_version        INTEGER NOT NULL DEFAULT 1,
    created_ms              INTEGER NOT NULL,
    modified_ms             INTEGER NOT NULL,
    last_used_ms            INTEGER,
    request_count           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_by_owner ON api_keys (owner_id);

CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    time_ms     INTEGER NOT NULL,
    actor_id    TEXT NOT NULL,
    actor_type  TEXT NOT NULL,
    actor_name  TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
