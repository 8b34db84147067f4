-- High availability (docs/ha.md): whether this session holds the server's advisory lock, taking
-- it when it is free and %(acquire)s. Session-level and re-entrant: a session that holds it
-- already does not take it again (each pg_try_advisory_lock would add one to its count).
-- pg_locks shows a bigint key as its high half in classid, its low half in objid, objsubid 1;
-- advisory locks are per database, hence the database column.
-- holder: the backend that holds it (this one, another instance's, or NULL when nobody does).
-- MATERIALIZED: pg_try_advisory_lock runs exactly once.
WITH lock AS (
    SELECT l.pid
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((%(lock_key)s::int8 >> 32) & 4294967295)::oid
      AND l.objid = (%(lock_key)s::int8 & 4294967295)::oid
      AND l.objsubid = 1
), attempt AS MATERIALIZED (
    SELECT CASE
               WHEN EXISTS (SELECT 1 FROM lock WHERE pid = pg_backend_pid()) THEN true
               WHEN %(acquire)s THEN pg_try_advisory_lock(%(lock_key)s::int8)
               ELSE false
           END AS leader
)
SELECT leader,
       CASE WHEN leader THEN pg_backend_pid() ELSE (SELECT min(pid) FROM lock) END AS holder
FROM attempt
