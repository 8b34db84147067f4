-- One poll of a server, in one statement (PostgreSQL 14-18), as five kinds of rows told apart by
-- the key column that is set (reaper/pg/activity.py puts them together):
--   session   (pid set)                        a client session, as pg_stat_get_activity has it
--   role      (role_oid set, pid NULL)         one per role: name, superuser, member, limit
--             (every role, or only the roles that have a backend: see below)
--   database  (database_oid set, pid NULL)     one per database: name
--   blocker   (blocker set)                    a backend that blocks lock waits: which, since when
--             (only with %(include_blocking)s: see below)
--   clock     (only now set)                   the server's now()
-- Cheaper for the server than SELECT * FROM pg_stat_activity (bench/poll_cost.py): the per-session
-- rows come from pg_stat_get_activity(NULL) alone, with no join and no per-row computation; names
-- and privileges are looked up once per role and per database instead of once per session, and
-- the ages are subtracted by the reaper from the server's own now() (the same
-- microseconds as now() - state_change in SQL: ages are by the server's clock, never the reaper's).
-- Runs in autocommit: activity is snapshotted once per transaction, so a poll inside a long
-- transaction would keep seeing the first snapshot; now() is the statement's transaction start.
--
-- Sessions: client backends, and the rows the reaper's role may not see. Without
-- pg_read_all_stats another role's row has NULL in every column but pid, database, role and
-- application_name, backend_type included. Those are returned (and counted as state unknown) so
-- that the reaper can say how much it cannot see; no policy can match them. Like a NULL
-- backend_type row of pg_stat_activity whose database or role has no name, such a row is dropped
-- by the reaper when its database or role has no row below.
-- Roles: member is whether the reaper's role has the privileges of the role, which (with
-- pg_signal_backend and superuser) decides whether pg_terminate_backend may signal its sessions.
-- signaller is whether the role could be a pg-reaper's: it has the privileges of
-- pg_signal_backend (superusers have every role's), or it is the reaper's own role. Only its
-- sessions named 'pg-reaper' are spared as another pg-reaper's: application_name is the client's
-- to choose, and would otherwise make any session immune.
-- connection_limit is set where the role's limit applies, for when_role_connections_above (read
-- at every poll: ALTER ROLE ... CONNECTION LIMIT takes effect at once); the reaper counts its
-- client sessions in this poll's own session rows, as PostgreSQL counts against the limit
-- (client backends only). PostgreSQL does not apply a role's limit to a superuser; -1 is none.
-- The query text is read only with %(include_query)s: a policy filters on it (queries,
-- exclude_queries) or [log] include_query is set.
SELECT a.pid,
       a.backend_type,
       a.datid AS database_oid,
       a.usesysid AS role_oid,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       a.state,
       a.backend_start,
       a.state_change,
       a.xact_start,
       a.query_start,
       CASE WHEN %(include_query)s THEN a.query END AS query,
       NULL::name AS name,
       NULL::boolean AS superuser,
       NULL::boolean AS member,
       NULL::boolean AS signaller,
       NULL::int4 AS connection_limit,
       NULL::int4 AS blocker,
       NULL::int4[] AS blocked,
       NULL::timestamptz AS wait_start,
       NULL::timestamptz AS now
FROM pg_catalog.pg_stat_get_activity(NULL) AS a
WHERE a.backend_type = 'client backend'
   OR (a.backend_type IS NULL AND a.datid IS NOT NULL AND a.usesysid IS NOT NULL)
UNION ALL
SELECT NULL, NULL, NULL, r.oid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       r.rolname,
       r.rolsuper,
       pg_catalog.pg_has_role(r.oid, 'USAGE'),
       pg_catalog.pg_has_role(r.oid, 'pg_signal_backend', 'USAGE') OR r.rolname = current_user,
       CASE WHEN r.rolconnlimit >= 0 AND r.rolcanlogin AND NOT r.rolsuper THEN r.rolconnlimit END,
       NULL, NULL, NULL, NULL
FROM pg_catalog.pg_roles AS r
-- One row per role costs about what one backend costs through pg_stat_get_backend_idset(), so the
-- reaper reads every role unless the server has more roles than sessions (activity.py decides).
-- Both read the same snapshot as pg_stat_get_activity (one per transaction).
WHERE {every_role}
   OR r.oid IN (SELECT pg_catalog.pg_stat_get_backend_userid(b) FROM pg_catalog.pg_stat_get_backend_idset() AS b)
UNION ALL
SELECT NULL, NULL, d.oid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       d.datname, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM pg_catalog.pg_database AS d
UNION ALL
-- Blockers, for when_blocking, only with %(include_blocking)s (a false parameter is a one-time
-- filter: pg_locks and pg_blocking_pids are not even read). Both take every lock-manager
-- partition lock for a moment: pg_blocking_pids is called once per backend waiting for a lock,
-- not once per session. A row per backend that blocks at least one waiter: the waiters' pids and
-- the earliest start of their waits (pg_locks.waitstart, 14+, by the server's clock; NULL for a
-- moment after a wait begins: counted as now). pg_blocking_pids counts the holders of a
-- conflicting lock and the waiters queued ahead; 0 stands for a prepared transaction. The lock
-- manager is read live, not from the activity snapshot: a few microseconds apart.
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL,
       b.blocker,
       pg_catalog.array_agg(DISTINCT w.pid),
       pg_catalog.min(coalesce(w.waitstart, pg_catalog.now())),
       NULL
FROM pg_catalog.pg_locks AS w
CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS b(blocker)
WHERE %(include_blocking)s AND NOT w.granted AND w.pid IS NOT NULL AND b.blocker <> 0
GROUP BY b.blocker
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, pg_catalog.now()
