-- Race-safe signalling of many victims in one statement. Each victim is re-read with
-- pg_stat_get_activity and signalled only if backend_start, state_change and state are still
-- what the poll saw: a session that became active since, or a pid now used by another backend,
-- is left alone. Every victim gets its own result row.
-- The permission rule of pg_signal_backend() (signalfuncs.c) is checked before the call: a
-- permission ERROR would abort the statement after earlier victims were already signalled
-- (signals are not transactional), leaving their results unknown.
-- High availability (docs/ha.md): with %(lock_key)s set, nothing is signalled unless this very
-- backend holds that advisory lock (see ha_lead.sql): a leader whose session was lost and
-- reopened reports 'not_leader' for every victim. NULL: no [ha], no check.
SELECT v.pid,
       CASE
           WHEN NOT ha.leader THEN 'not_leader'
           WHEN s.pid IS NULL THEN 'gone'
           WHEN s.backend_start IS DISTINCT FROM v.backend_start
             OR s.state_change IS DISTINCT FROM v.state_change
             OR s.state IS DISTINCT FROM v.state THEN 'changed'
           WHEN NOT (me.rolsuper
                     OR (NOT coalesce(r.rolsuper, true)
                         AND (pg_has_role(r.oid, 'USAGE')
                              OR pg_has_role('pg_signal_backend', 'USAGE')))) THEN 'denied'
           WHEN {signal}(v.pid) THEN 'signalled'
           ELSE 'gone'
       END AS result
FROM unnest(%(pids)s::int4[], %(backend_starts)s::timestamptz[],
            %(state_changes)s::timestamptz[], %(states)s::text[])
     WITH ORDINALITY AS v(pid, backend_start, state_change, state, ord)
CROSS JOIN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS me
CROSS JOIN (SELECT %(lock_key)s::int8 IS NULL
                   OR EXISTS (SELECT 1
                              FROM pg_locks l
                              WHERE l.locktype = 'advisory'
                                AND l.granted
                                AND l.pid = pg_backend_pid()
                                AND l.database = (SELECT oid FROM pg_database
                                                  WHERE datname = current_database())
                                AND l.classid = ((%(lock_key)s::int8 >> 32) & 4294967295)::oid
                                AND l.objid = (%(lock_key)s::int8 & 4294967295)::oid
                                AND l.objsubid = 1) AS leader) AS ha
LEFT JOIN LATERAL pg_stat_get_activity(v.pid) AS s ON true
LEFT JOIN pg_roles AS r ON r.oid = s.usesysid
ORDER BY v.ord
