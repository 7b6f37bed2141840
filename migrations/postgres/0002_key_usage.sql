-- Usage per key in a narrow table of its own: a usage flush rewrote each
-- used key's whole row (a new tuple and index entries per key under MVCC)
-- and held the keys' rows against admin updates; here it writes only these
-- small rows, and the keys' rows are only share-locked against a delete.
CREATE TABLE key_usage (
    key_id        TEXT COLLATE "C" PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    request_count BIGINT NOT NULL,
    last_used_ms  BIGINT
);

INSERT INTO key_usage (key_id, request_count, last_used_ms)
    SELECT id, request_count, last_used_ms FROM api_keys
    WHERE request_count > 0 OR last_used_ms IS NOT NULL;

ALTER TABLE api_keys DROP COLUMN last_used_ms, DROP COLUMN request_count;
