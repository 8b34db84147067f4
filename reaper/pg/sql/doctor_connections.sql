-- doctor: connection slots in use. Walsenders, autovacuum and background workers have slots of
-- their own: only client backends count against max_connections.
-- Without pg_read_all_stats even backend_type is NULL on other roles' rows: a row with a
-- database and a role is then counted as a client (it may also be a parallel worker or a
-- logical walsender), and reported as hidden. reserved_connections exists from 16 on.
SELECT pg_catalog.count(*) FILTER (WHERE a.backend_type = 'client backend'
                           OR (a.backend_type IS NULL
                               AND a.datid IS NOT NULL
                               AND a.usesysid IS NOT NULL)) AS client_sessions,
       pg_catalog.count(*) FILTER (WHERE a.backend_type IS NULL
                          AND a.datid IS NOT NULL
                          AND a.usesysid IS NOT NULL) AS hidden_sessions,
       pg_catalog.count(*) FILTER (WHERE a.backend_type = 'client backend'
                          AND a.state = 'disabled') AS disabled_sessions,
       pg_catalog.current_setting('max_connections')::int AS max_connections,
       pg_catalog.current_setting('superuser_reserved_connections')::int AS superuser_reserved_connections,
       (SELECT s.setting::int
        FROM pg_catalog.pg_settings s
        WHERE s.name = 'reserved_connections') AS reserved_connections
FROM pg_catalog.pg_stat_activity a
