-- The owner's kind on the key itself (a principal's kind never changes),
-- indexed with the id: listing the keys of one kind of owner then reads
-- them in id order whether that kind owns most of the keys or few.
ALTER TABLE api_keys ADD COLUMN owner_type TEXT;
UPDATE api_keys SET owner_type = (SELECT kind FROM principals WHERE principals.id = api_keys.owner_id);
ALTER TABLE api_keys ALTER COLUMN owner_type SET NOT NULL,
    ADD CONSTRAINT api_keys_owner_type CHECK (owner_type IN ('user', 'service-account'));
CREATE INDEX api_keys_by_owner_type ON api_keys (owner_type, id);
