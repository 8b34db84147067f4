-- Client sessions with their ages by the server's clock (PostgreSQL 14-18), and the rows the
-- reaper's role may not see: without pg_read_all_stats another role's row has NULL in every
-- column but pid, database and role, backend_type included. They are returned (and counted as
-- state unknown) so that the reaper can say how much it cannot see; no policy can match them.
-- Runs in autocommit: pg_stat_activity is snapshotted once per transaction, so a poll inside a
-- long transaction would keep seeing the first snapshot.
-- member: whether the reaper's role has the privileges of the session's role, which (with
-- pg_signal_backend and superuser) decides whether pg_terminate_backend may signal it.
SELECT a.pid,
       coalesce(a.backend_type, 'unknown') AS backend_type,
       a.datname,
       a.usename,
       a.application_name,
       host(a.client_addr) AS client_addr,
       a.state,
       a.backend_start,
       a.state_change,
       extract(epoch FROM now() - a.state_change)::float8 AS idle_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS transaction_seconds,
       extract(epoch FROM now() - a.query_start)::float8 AS runtime_seconds,
       extract(epoch FROM now() - a.backend_start)::float8 AS connection_seconds,
       coalesce(r.rolsuper, false) AS superuser,
       CASE WHEN r.oid IS NULL THEN false ELSE pg_has_role(r.oid, 'USAGE') END AS member,
       CASE WHEN %(include_query)s THEN a.query END AS query
FROM pg_stat_activity a
LEFT JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
   OR (a.backend_type IS NULL AND a.datname IS NOT NULL AND a.usename IS NOT NULL)
