-- The reaper's own session: what its startup packet could not pin (reaper/pg/activity.py). libpq
-- sends $PGDATESTYLE and $PGTZ as startup parameters that outrank `options`, and a session opened
-- before the server was upgraded to 17 did not know transaction_timeout. Session-level SETs.
SELECT pg_catalog.set_config(s.name, s.value, false)
FROM ROWS FROM (pg_catalog.unnest(%(names)s::text[]), pg_catalog.unnest(%(values)s::text[]))
     AS s(name, value)
