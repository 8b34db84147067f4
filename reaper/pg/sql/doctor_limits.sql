-- doctor: roles and databases with a connection limit, and their sessions now.
-- The server does not apply a role's limit to a superuser (nor a database's limit to a
-- superuser's session, which still counts); datconnlimit -2 (15+) marks a database left invalid
-- by an interrupted DROP DATABASE. Only client backends are counted here; a row whose
-- backend_type is hidden (no pg_read_all_stats) counts as one.
SELECT 'role' AS kind,
       r.rolname AS name,
       r.rolconnlimit AS connection_limit,
       (SELECT pg_catalog.count(*)
        FROM pg_catalog.pg_stat_activity a
        WHERE a.usesysid = r.oid
          AND coalesce(a.backend_type, 'client backend') = 'client backend') AS sessions
FROM pg_catalog.pg_roles r
WHERE r.rolconnlimit >= 0
  AND r.rolcanlogin
  AND NOT r.rolsuper
UNION ALL
SELECT 'database',
       d.datname,
       d.datconnlimit,
       (SELECT pg_catalog.count(*)
        FROM pg_catalog.pg_stat_activity a
        WHERE a.datid = d.oid
          AND a.usesysid IS NOT NULL
          AND coalesce(a.backend_type, 'client backend') = 'client backend')
FROM pg_catalog.pg_database d
WHERE d.datconnlimit >= 0
  AND d.datallowconn
ORDER BY 1, 2
