-- doctor: per-role and per-database settings (ALTER ROLE / ALTER DATABASE ... SET) of the
-- timeouts and of track_activities. setrole or setdatabase 0 means all roles / all databases
-- (role and database NULL here). The value is the text as written: '5min', '5 min', '300000'.
SELECT r.rolname AS role,
       d.datname AS database,
       pg_catalog.split_part(c.item, '=', 1) AS name,
       pg_catalog.substr(c.item, pg_catalog.strpos(c.item, '=') + 1) AS value
FROM pg_catalog.pg_db_role_setting s
CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS c(item)
LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
WHERE pg_catalog.split_part(c.item, '=', 1) IN ('idle_session_timeout', 'idle_in_transaction_session_timeout',
                                     'transaction_timeout', 'statement_timeout',
                                     'track_activities')
ORDER BY r.rolname NULLS FIRST, d.datname NULLS FIRST, 3
