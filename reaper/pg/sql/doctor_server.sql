-- doctor: the server and the reaper's role on it (PostgreSQL 14-18).
-- pg_has_role(..., 'USAGE') asks for the role's privileges (what the server checks), not bare
-- membership; a superuser has the privileges of every role. pg_use_reserved_connections exists
-- from PostgreSQL 16 on: looked up in pg_roles, NULL before.
SELECT pg_catalog.current_setting('server_version') AS server_version,
       pg_catalog.current_setting('server_version_num')::int AS server_version_num,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       current_user AS role,
       r.rolsuper AS superuser,
       r.rolconnlimit AS connection_limit,
       pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') AS signal_backend,
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS read_all_stats,
       pg_catalog.pg_has_role('pg_monitor', 'USAGE') AS monitor,
       (SELECT pg_catalog.pg_has_role(u.oid, 'USAGE')
        FROM pg_catalog.pg_roles u
        WHERE u.rolname = 'pg_use_reserved_connections') AS use_reserved_connections,
       pg_catalog.current_setting('track_activities')::bool AS track_activities
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
