-- A change that created keys says so: its `key_ids` are keys that did not
-- exist before it, so a replica drops only what it remembers of them as
-- unknown, never a copy of the key it read after the creation committed
-- (evicting that one made a key's first use read the store twice, and fail
-- with 503 if the store was down in between).
--
-- The ids stay in `key_ids` too: a replica of the previous keygate, during
-- a rolling upgrade, reads only `key_ids` and drops them as before. Rows
-- written by such a replica have `created = 0`, and are dropped as before.
ALTER TABLE changes ADD COLUMN created INTEGER NOT NULL DEFAULT 0;
