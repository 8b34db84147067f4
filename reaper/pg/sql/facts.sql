-- Who the reaper is on this server and what it may see and signal; how many connection slots an
-- ordinary role can use (max_connections less the slots reserved for superusers and, 16+, for
-- pg_use_reserved_connections). Read once per connection: those settings need a restart.
-- Every function and relation is schema-qualified: nothing a database owner puts on the
-- search_path can stand in for them.
SELECT pg_catalog.pg_backend_pid() AS own_pid,
       current_user AS role,
       r.rolsuper AS superuser,
       pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') AS signal_backend,
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS read_all_stats,
       pg_catalog.current_setting('server_version_num')::int AS server_version_num,
       pg_catalog.current_setting('max_connections')::int AS max_connections,
       pg_catalog.current_setting('superuser_reserved_connections')::int
           AS superuser_reserved_connections,
       coalesce(pg_catalog.current_setting('reserved_connections', true)::int, 0)
           AS reserved_connections
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
