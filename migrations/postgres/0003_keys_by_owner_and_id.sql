-- An owner's keys in id order, as the admin API pages them: with the index
-- on owner_id alone, a page of one owner's keys was read by walking every
-- key in id order.
DROP INDEX api_keys_by_owner;
CREATE INDEX api_keys_by_owner ON api_keys (owner_id, id);
