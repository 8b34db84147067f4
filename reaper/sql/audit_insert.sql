-- One batch of audit rows, one array per column: a single statement, so all or none of the
-- batch is written (autocommit) and one round trip carries it. {columns} and {arrays} come from
-- reaper/activity.py's AUDIT_COLUMNS (without `instance` for a table made by an earlier
-- pg-reaper that the reaper's role may not alter, docs/audit.md).
INSERT INTO {table} ({columns})
SELECT *
FROM unnest({arrays})
