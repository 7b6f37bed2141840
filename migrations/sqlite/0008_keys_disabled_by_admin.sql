-- A key an account admin disabled (not its owner) stays disabled until an
-- admin enables it: its owner may not undo the admin's decision. Additive,
-- so a replica on the previous keygate reads and writes the table as before
-- (it neither sets nor checks the flag).
ALTER TABLE api_keys ADD COLUMN disabled_by_admin BOOLEAN NOT NULL DEFAULT 0;
