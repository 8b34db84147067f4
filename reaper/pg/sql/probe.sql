-- The pressure probe (docs/pressure.md, "The fast path"): how many connection slots client
-- sessions take, in a few rows instead of a row per session. Run between polls on a server with
-- pressure policies; a level it finds crossed makes the daemon poll at once, and the poll
-- decides (on its own counts) whom to reap.
--   total row (total true)   client sessions, the reaper's own included
--   role rows (total false)  client sessions of each role whose CONNECTION LIMIT applies
--                            (only with %(per_role)s: when_role_connections_above)
-- A client session is a backend with a client connection (client_port set: -1 on a Unix
-- socket, NULL for a background process, an autovacuum, parallel or background worker) that is
-- not a walsender (pg_stat_get_wal_senders): the backends PostgreSQL counts against
-- max_connections and a role's limit, as poll.sql's backend_type = 'client backend'. A walsender
-- is counted for the moment between its start and taking its slot (and at its exit): the probe
-- may then see one session more than the poll, which costs at most one early poll.
-- Cheap where pg_stat_get_activity(NULL) is not: the backends' status is copied once per
-- snapshot either way, but pg_stat_get_activity builds every column of every row, while this
-- reads two or three fields per backend (bench/poll_cost.py measures both against the poll).
-- client_port is NULL for every row but the reaper's own role's without pg_read_all_stats (or
-- superuser): pressure policies then do not act, and the daemon does not probe.
-- Role names are returned as data; the reaper compares them with its policies in Python.
-- Runs in autocommit, like the poll: each probe reads a fresh snapshot.
SELECT c.total,
       r.rolname AS role,
       r.rolconnlimit AS connection_limit,
       c.sessions
FROM (
    SELECT b.role_oid,
           GROUPING(b.role_oid) = 1 AS total,
           pg_catalog.count(*)::int4 AS sessions
    FROM (
        SELECT CASE WHEN %(per_role)s THEN pg_catalog.pg_stat_get_backend_userid(i) END
                   AS role_oid
        FROM pg_catalog.pg_stat_get_backend_idset() AS i
        WHERE pg_catalog.pg_stat_get_backend_client_port(i) IS NOT NULL
          AND pg_catalog.pg_stat_get_backend_pid(i) NOT IN (
              SELECT w.pid FROM pg_catalog.pg_stat_get_wal_senders() AS w WHERE w.pid IS NOT NULL)
    ) AS b
    GROUP BY ROLLUP (b.role_oid)
) AS c
LEFT JOIN pg_catalog.pg_roles AS r
       ON NOT c.total
      AND r.oid = c.role_oid
      AND r.rolconnlimit >= 0
      AND r.rolcanlogin
      AND NOT r.rolsuper
WHERE c.total OR r.oid IS NOT NULL
