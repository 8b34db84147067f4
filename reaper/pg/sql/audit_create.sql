-- The audit table: one row per decision, the fields of the session_reaped and
-- session_reap_failed log events. IF NOT EXISTS: another pg-reaper may have made it meanwhile.
CREATE TABLE IF NOT EXISTS {table} (
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
CREATE INDEX IF NOT EXISTS {index} ON {table} (logged_at);
