-- One batch of audit rows, one array per column: a single statement, so all or none of the
-- batch is written (autocommit) and one round trip carries it. {columns} and {arrays} come from
-- reaper/pg/audit.py's AUDIT_COLUMNS (without `instance` for a table made by an earlier
-- pg-reaper that the reaper's role may not alter, docs/audit.md), each array in its own
-- pg_catalog.unnest (only the bare name unnest takes several arrays).
INSERT INTO {table} ({columns})
SELECT *
FROM ROWS FROM ({arrays})
