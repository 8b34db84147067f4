-- The pressure probe with per-role counts, for a server with when_role_connections_above
-- policies: probe.sql's count (the total row, total true) and, in rows of their own (total
-- false), the client sessions of each role whose CONNECTION LIMIT applies, counted the same way.
-- Role names are returned as data; the reaper compares them with its policies in Python.
SELECT c.total,
       r.rolname AS role,
       r.rolconnlimit AS connection_limit,
       c.sessions
FROM (
    SELECT b.role_oid,
           GROUPING(b.role_oid) = 1 AS total,
           pg_catalog.count(*)::int4 AS sessions
    FROM (
        SELECT pg_catalog.pg_stat_get_backend_userid(i) AS role_oid
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
