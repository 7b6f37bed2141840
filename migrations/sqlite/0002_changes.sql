-- The change feed: one row per committed change that can alter what a
-- replica's cache holds (key ids as a JSON array; `settings` for the
-- account settings). `seq` is gapless and in commit order, because every
-- write goes through the one writer connection with BEGIN IMMEDIATE, so a
-- process that has applied everything up to N only needs `seq > N`.
CREATE TABLE changes (
    seq      INTEGER PRIMARY KEY,
    time_ms  INTEGER NOT NULL,
    key_ids  TEXT NOT NULL DEFAULT '[]',
    settings INTEGER NOT NULL DEFAULT 0
);
