-- The audit table (docs/audit.md), made beforehand by an administrator, so that pg-reaper's role
-- needs only USAGE on its schema and INSERT on it: no CREATE anywhere (PostgreSQL 15+ no longer
-- lets every role create in schema public).
--
-- Runs on PostgreSQL 14 to 18, as a superuser, in the audit database, after pg_reaper_role.sql,
-- and as often as you like (it changes nothing the second time):
--   psql -v ON_ERROR_STOP=1 -d ops -f deploy/sql/pg_reaper_audit.sql
-- then, in the config:
--   [audit]
--   dsn = "host=... dbname=ops user=pg-reaper"
--   table = "reaper.audit"
--
-- The schema and the table belong to the superuser that runs this: pg-reaper refuses a table
-- (or schema) owned by any other role but its own, whose owner could make its INSERT run code
-- (triggers, column defaults). ("pg_reaper" is not a valid schema name: PostgreSQL reserves the
-- pg_ prefix.)

CREATE SCHEMA IF NOT EXISTS reaper;
GRANT USAGE ON SCHEMA reaper TO "pg-reaper";

-- The columns of the table pg-reaper makes itself (reaper/pg/sql/audit_create.sql): one row per
-- decision.
CREATE TABLE IF NOT EXISTS reaper.audit (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logged_at           timestamptz NOT NULL,
    event               text NOT NULL,
    server              text NOT NULL,
    policy              text,
    action              text,
    dry_run             boolean NOT NULL,
    result              text NOT NULL,
    pid                 integer NOT NULL,
    backend_start       timestamptz,
    database            text,
    "user"              text,
    application         text,
    client_addr         text,
    state               text,
    idle_seconds        double precision,
    transaction_seconds double precision,
    connection_seconds  double precision,
    reason              text,
    detail              text,
    query               text,
    instance            text
);
-- A table made by an older script has no instance column.
ALTER TABLE reaper.audit ADD COLUMN IF NOT EXISTS instance text;
CREATE INDEX IF NOT EXISTS audit_logged_at_idx ON reaper.audit (logged_at);

-- Writing only: the daemon never reads, changes or deletes rows. Give SELECT to whoever reads the
-- audit (GRANT SELECT ON reaper.audit TO ...): `pg-reaper report` reads it as the role of its
-- [audit] dsn (docs/report.md). Keep old rows with a DELETE of your own.
GRANT INSERT ON reaper.audit TO "pg-reaper";
