-- Who the reaper is on this server and what it may see and signal.
SELECT pg_backend_pid() AS own_pid,
       current_user AS role,
       r.rolsuper AS superuser,
       pg_has_role('pg_signal_backend', 'USAGE') AS signal_backend,
       pg_has_role('pg_read_all_stats', 'USAGE') AS read_all_stats,
       current_setting('server_version_num')::int AS server_version_num,
       current_setting('max_connections')::int AS max_connections
FROM pg_roles r
WHERE r.rolname = current_user
