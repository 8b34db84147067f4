-- Race-safe signalling of many victims in one statement. Each victim is re-read with
-- pg_stat_get_activity and signalled only if backend_start, state_change and state are still
-- what the poll saw: a session that became active since, or a pid now used by another backend,
-- is left alone. Every victim gets its own result row.
-- A victim chosen for blocking (when_blocking: its threshold in %(blocking)s, NULL for the
-- others) is signalled only if it still blocks a backend whose lock wait began at least that
-- long before this statement: one that committed or rolled back since (when its state did not
-- change either), or whose waiters gave up or got their lock, is 'unblocked' (reported as
-- changed). pg_locks and pg_blocking_pids read the lock manager live, at each victim's turn.
-- The permission rule of pg_signal_backend() (signalfuncs.c) is checked before the call: a
-- permission ERROR would abort the statement after earlier victims were already signalled
-- (signals are not transactional), leaving their results unknown. Only a superuser signals a
-- superuser's backend or one that advertises no role; a backend whose role was dropped while it
-- was connected still has that role's oid, is no superuser's, and pg_signal_backend may signal it.
-- High availability (docs/ha.md): with %(lock_key)s set, nothing is signalled unless this very
-- backend holds that advisory lock (see ha_lead.sql): a leader whose session was lost and
-- reopened reports 'not_leader' for every victim. NULL: no [ha], no check. Checked once per
-- statement: a session-level lock stays with its session until the session ends.
-- Victim by victim, re-read then signal: the check must be as fresh as the signal it guards.
--  * The whole per-victim work is one LATERAL subquery, kept apart by OFFSET 0, so that the
--    planner cannot hoist the CASE (and the signal in it) above a Sort or a Hash: otherwise every
--    victim would be re-read first and signalled only after all the others were.
--  * A backend reads the shared status array once per transaction and serves every later
--    pg_stat_get_activity() from that copy; pg_stat_clear_snapshot(), evaluated in the
--    function's argument expression (so right before each call; a void result IS NOT NULL),
--    makes each victim's re-read current. In a FROM clause of its own it would run only once:
--    a function scan without changed arguments replays its first result on a rescan.
-- A victim can still run a statement between its own re-read and its signal: microseconds, the
-- window pg_terminate_backend() has for any single session.
-- Age (armed signals, docs/semantics.md): a victim with a time in %(due)s, the server time at
-- which it crosses its threshold (the column the threshold keys on plus the threshold), is
-- signalled only once clock_timestamp() has passed it (eligibility is "age > threshold",
-- strictly), checked at its turn like the rest; before, it is 'not_due' and left alone, so a
-- timer that fires early, or a reaper clock that disagrees with the server's, signals nobody.
-- NULL: no age check (a poll's victims were past their threshold at the poll's now(); pressure
-- and `kill` victims have no age to wait for).
SELECT v.pid, x.result
-- ROWS FROM: only the bare name unnest takes several arrays.
FROM ROWS FROM (pg_catalog.unnest(%(pids)s::int4[]),
                pg_catalog.unnest(%(backend_starts)s::timestamptz[]),
                pg_catalog.unnest(%(state_changes)s::timestamptz[]),
                pg_catalog.unnest(%(states)s::text[]),
                pg_catalog.unnest(%(blocking)s::interval[]),
                pg_catalog.unnest(%(due)s::timestamptz[]))
     WITH ORDINALITY AS v(pid, backend_start, state_change, state, blocking, due, ord)
CROSS JOIN (SELECT %(lock_key)s::int8 IS NULL
                   OR EXISTS (SELECT 1
                              FROM pg_catalog.pg_locks l
                              WHERE l.locktype = 'advisory'
                                AND l.granted
                                AND l.pid = pg_catalog.pg_backend_pid()
                                AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                                  WHERE datname = pg_catalog.current_database())
                                AND l.classid = ((%(lock_key)s::int8 >> 32) & 4294967295)::oid
                                AND l.objid = (%(lock_key)s::int8 & 4294967295)::oid
                                AND l.objsubid = 1) AS leader) AS ha
CROSS JOIN LATERAL (
    SELECT CASE
               WHEN NOT ha.leader THEN 'not_leader'
               WHEN s.pid IS NULL THEN 'gone'
               WHEN s.backend_start IS DISTINCT FROM v.backend_start
                 OR s.state_change IS DISTINCT FROM v.state_change
                 OR s.state IS DISTINCT FROM v.state THEN 'changed'
               WHEN v.due IS NOT NULL AND pg_catalog.clock_timestamp() <= v.due THEN 'not_due'
               WHEN v.blocking IS NOT NULL
                AND NOT EXISTS (SELECT 1
                                FROM pg_catalog.pg_locks AS w
                                WHERE NOT w.granted
                                  AND w.waitstart <= pg_catalog.now() - v.blocking
                                  AND v.pid = ANY (pg_catalog.pg_blocking_pids(w.pid)))
                    THEN 'unblocked'
               WHEN NOT (me.rolsuper
                         OR (coalesce(s.usesysid, 0::oid) <> 0::oid
                             AND NOT coalesce(r.rolsuper, false)
                             AND (pg_catalog.pg_has_role('pg_signal_backend', 'USAGE')
                                  OR coalesce(pg_catalog.pg_has_role(r.oid, 'USAGE'), false))))
                    THEN 'denied'
               WHEN {signal}(v.pid) THEN 'signalled'
               ELSE 'gone'
           END AS result
    FROM (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) AS me
    LEFT JOIN pg_catalog.pg_stat_get_activity(
        CASE WHEN pg_catalog.pg_stat_clear_snapshot() IS NOT NULL THEN v.pid END) AS s
           ON s.pid = v.pid
    LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = s.usesysid
    OFFSET 0
) AS x
ORDER BY v.ord
