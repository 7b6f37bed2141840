-- The latest usage flush applied per flush stream (one stream per keygate
-- process), written in the flush's own transaction: a flush sent again
-- because its answer was lost (a stuck write, a timeout) finds its sequence
-- here and writes nothing, so usage counts each request once. Rows of
-- streams not heard from for 7 days are deleted by later flushes.
-- Additive: a process on the previous keygate never reads the table.
CREATE TABLE usage_flushes (
    stream        TEXT PRIMARY KEY,
    last_sequence INTEGER NOT NULL,
    flushed_ms    INTEGER NOT NULL
) WITHOUT ROWID;
