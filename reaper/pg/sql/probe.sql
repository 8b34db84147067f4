-- The pressure probe (docs/pressure.md, "The fast path"): how many client sessions hold a
-- connection slot, in one row instead of a row per session. Run between polls on a server with
-- pressure policies; a level it finds crossed makes the daemon poll at once, and the poll
-- decides (on its own counts) whom to reap. probe_roles.sql adds per-role counts.
-- A client session is a backend with a client connection (client_port set: -1 on a Unix
-- socket, NULL for a background process, an autovacuum, parallel or background worker) that is
-- not a walsender (pg_stat_get_wal_senders): the backends PostgreSQL counts against
-- max_connections and a role's limit, as poll.sql's backend_type = 'client backend'. A walsender
-- is counted for the moment between its start and taking its slot (and at its exit): the probe
-- may then see one session more than the poll, which costs at most one early poll.
-- Cheap where pg_stat_get_activity(NULL) is not: the backends' status is copied once per
-- snapshot either way, but pg_stat_get_activity builds every column of every row, while this
-- reads two fields per backend (bench/poll_cost.py measures both against the poll).
-- client_port is NULL for every row but the reaper's own role's without pg_read_all_stats (or
-- superuser): pressure policies then do not act, and the daemon does not probe.
-- Runs in autocommit, like the poll: each probe reads a fresh snapshot.
SELECT true AS total,
       NULL::name AS role,
       NULL::int4 AS connection_limit,
       pg_catalog.count(*)::int4 AS sessions
FROM pg_catalog.pg_stat_get_backend_idset() AS i
WHERE pg_catalog.pg_stat_get_backend_client_port(i) IS NOT NULL
  AND pg_catalog.pg_stat_get_backend_pid(i) NOT IN (
      SELECT w.pid FROM pg_catalog.pg_stat_get_wal_senders() AS w WHERE w.pid IS NOT NULL)
