-- A user's email is unique ignoring case, as mail systems treat it:
-- dev@example.com and DEV@example.com are one person, and a lookup by
-- email finds either spelling. The email is kept as typed, for display.
-- Lookups use the same expression (`lower(name) = lower($1)`).
--
-- A store that already holds two users whose emails differ only in case
-- cannot take this index: the upgrade stops here, naming the index, until
-- one of the two is renamed or deleted (with the previous keygate).
CREATE UNIQUE INDEX users_email_unique_ignoring_case ON principals (lower(name))
    WHERE kind = 'user';
