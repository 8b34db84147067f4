-- Race-safe signalling of many victims in one statement. Each victim is re-read with
-- pg_stat_get_activity and signalled only if backend_start, state_change and state are still
-- what the poll saw: a session that became active since, or a pid now used by another backend,
-- is left alone. Every victim gets its own result row. Sessions the reaper's role may not signal
-- are left out before this runs, since one permission ERROR would abort the whole statement.
SELECT v.pid,
       CASE
           WHEN s.pid IS NULL THEN 'gone'
           WHEN s.backend_start IS DISTINCT FROM v.backend_start
             OR s.state_change IS DISTINCT FROM v.state_change
             OR s.state IS DISTINCT FROM v.state THEN 'changed'
           WHEN {signal}(v.pid) THEN 'signalled'
           ELSE 'gone'
       END AS result
FROM unnest(%(pids)s::int4[], %(backend_starts)s::timestamptz[],
            %(state_changes)s::timestamptz[], %(states)s::text[])
     WITH ORDINALITY AS v(pid, backend_start, state_change, state, ord)
LEFT JOIN LATERAL pg_stat_get_activity(v.pid) s ON true
ORDER BY v.ord
