-- pg-reaper kill --block-connections: what still keeps a database in use, as DROP DATABASE and
-- ALTER DATABASE ... RENAME count it (CountOtherDBBackends in procarray.c): every other backend
-- connected to it, whatever its kind, and its prepared transactions, which hold it with no
-- backend at all. Autovacuum workers are left out: both commands end those themselves.
-- Without pg_read_all_stats another role's row has a NULL backend_type: returned as 'unknown'.
SELECT coalesce(a.backend_type, 'unknown') AS kind,
       a.pid,
       NULL::text AS gid
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = %(database)s
  AND a.pid <> pg_catalog.pg_backend_pid()
  AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
UNION ALL
SELECT 'prepared transaction', NULL, p.gid
FROM pg_catalog.pg_prepared_xacts p
WHERE p.database = %(database)s
ORDER BY 1, 2, 3
