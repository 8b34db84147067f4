-- The leak report (docs/report.md): per group (the group column of the audit table, both
-- identifiers filled in by reaper/pg/report.py), the sessions reaped in the window
-- (start <= logged_at < end) and the idle time they held, most first, the first `top` groups;
-- each row also carries the totals over every group (window functions run before LIMIT).
-- A session is (server, pid, backend_start): its rows are counted once (a cancel, then the
-- terminate of escalate_after, is one session). Reaped: a row of a real signal (not a dry run)
-- whose result is terminated or cancelled. Would reap: a dry-run row of a session not reaped in
-- the window. Failures (gone, changed, denied, error) and the `logged` of action = "log" are
-- decisions, not reaps: left out.
-- logged_at >= start: the index on logged_at that pg-reaper makes with the table bounds the scan.
WITH decided AS (
    SELECT {group} AS name,
           NOT a.dry_run AND a.result IN ('terminated', 'cancelled') AS reaped,
           a.server, a.pid, a.backend_start, a.idle_seconds, a.logged_at
    FROM {table} AS a
    WHERE a.logged_at >= %(start)s
      AND a.logged_at < %(end)s
      AND a.event = 'session_reaped'
      AND (a.result IN ('terminated', 'cancelled') AND NOT a.dry_run
           OR a.result = 'dry_run' AND a.dry_run)
      AND (%(server)s::pg_catalog.text IS NULL OR a.server = %(server)s::pg_catalog.text)
), sessions AS (
    SELECT name,
           pg_catalog.bool_or(reaped) AS reaped,
           pg_catalog.max(idle_seconds) FILTER (WHERE reaped) AS idle_seconds,
           pg_catalog.min(logged_at) FILTER (WHERE reaped) AS first_reaped,
           pg_catalog.max(logged_at) FILTER (WHERE reaped) AS last_reaped
    FROM decided
    GROUP BY name, server, pid, backend_start
), groups AS (
    SELECT name,
           pg_catalog.count(*) FILTER (WHERE reaped) AS sessions,
           coalesce(pg_catalog.sum(idle_seconds), 0) AS idle_seconds,
           pg_catalog.max(idle_seconds) AS longest_idle_seconds,
           pg_catalog.count(*) FILTER (WHERE NOT reaped) AS dry_run_sessions,
           pg_catalog.min(first_reaped) AS first_reaped,
           pg_catalog.max(last_reaped) AS last_reaped
    FROM sessions
    GROUP BY name
)
SELECT name, sessions, idle_seconds, longest_idle_seconds, dry_run_sessions,
       first_reaped, last_reaped,
       pg_catalog.count(*) OVER () AS total_groups,
       (pg_catalog.sum(sessions) OVER ())::pg_catalog.int8 AS total_sessions,
       pg_catalog.sum(idle_seconds) OVER () AS total_idle_seconds,
       (pg_catalog.sum(dry_run_sessions) OVER ())::pg_catalog.int8 AS total_dry_run_sessions
FROM groups
ORDER BY sessions DESC, dry_run_sessions DESC, idle_seconds DESC,
         name COLLATE pg_catalog."C" NULLS LAST
LIMIT %(top)s
