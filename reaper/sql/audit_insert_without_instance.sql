-- audit_insert.sql for a table made by an earlier pg-reaper, without the instance column,
-- when the reaper's role may not add it (docs/audit.md): the rows go in without it.
INSERT INTO {table} (logged_at, event, server, policy, action, dry_run, result, pid,
                     backend_start, database, "user", application, client_addr, state,
                     idle_seconds, transaction_seconds, connection_seconds, reason, detail, query)
SELECT *
FROM unnest(%(logged_at)s::timestamptz[], %(event)s::text[], %(server)s::text[],
            %(policy)s::text[], %(action)s::text[], %(dry_run)s::boolean[], %(result)s::text[],
            %(pid)s::integer[], %(backend_start)s::timestamptz[], %(database)s::text[],
            %(user)s::text[], %(application)s::text[], %(client_addr)s::text[],
            %(state)s::text[], %(idle_seconds)s::double precision[],
            %(transaction_seconds)s::double precision[], %(connection_seconds)s::double precision[],
            %(reason)s::text[], %(detail)s::text[], %(query)s::text[])
