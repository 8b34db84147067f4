-- High availability (docs/ha.md): whether this session holds the server's advisory lock, taking
-- it when it is free and %(acquire)s. Session-level and re-entrant: a session that holds it
-- already does not take it again (each pg_try_advisory_lock would add one to its count).
-- pg_locks shows a bigint key as its high half in classid, its low half in objid, objsubid 1;
-- advisory locks are per database, hence the database column.
-- holder: the backend that holds it (this one, another instance's, or NULL when nobody does).
-- MATERIALIZED: pg_try_advisory_lock runs exactly once.
--
-- other_*: a holder that is not a pg-reaper instance (lock squatting, docs/ha.md). A pg-reaper
-- instance is a backend whose application_name is pg-reaper's AND whose role (usesysid, the
-- role it logged in as) is this session's own: anyone may set an application_name, only the
-- reaper's credentials give its role. A lock row without a pid is held by a prepared
-- transaction, which pg-reaper never makes. A holder missing from pg_stat_activity exited
-- between the two reads (each is its own snapshot): not judged, the next cycle sees.
-- Shared holders (pg_advisory_lock_shared) block the lock as well: every granted row counts.
--
-- Membership (balanced leadership, docs/ha.md): with %(member)s set, this session also holds a
-- shared advisory lock in the two-int4 form (%(member_class)s, %(member)s): the mark of a
-- daemon taking part, which pg-reaper once/kill and the audit writer never take. members and
-- member_ages list the marks held by pg-reaper instances (the same rule as above; this
-- session's own, taken by this very statement, may be missing), each with the age of its
-- session in seconds; wanting, the marks (%(want_class)s, id) of the instances that ask to lead
-- this server. Two-int4 keys show as classid, objid and objsubid 2; they never collide with the
-- bigint key (objsubid 1). member_ages comes last: a steady follower's probe compares every
-- other column with its last answer (reaper/pg/ha.py, probe).
WITH me AS MATERIALIZED (
    SELECT a.usesysid
    FROM pg_catalog.pg_stat_activity a
    WHERE a.pid = pg_catalog.pg_backend_pid()
), lock AS (
    SELECT l.pid,
           a.application_name,
           a.usename,
           CASE
               WHEN l.pid IS NULL THEN true
               WHEN a.pid IS NULL THEN false
               ELSE NOT coalesce(a.application_name = %(application)s
                                 AND a.usesysid = (SELECT usesysid FROM me), false)
           END AS other
    FROM pg_catalog.pg_locks l
    LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
      AND l.granted
      AND l.database = (SELECT d.oid
                        FROM pg_catalog.pg_database d
                        WHERE d.datname = pg_catalog.current_database())
      AND l.classid = ((%(lock_key)s::pg_catalog.int8 >> 32) & 4294967295)::pg_catalog.oid
      AND l.objid = (%(lock_key)s::pg_catalog.int8 & 4294967295)::pg_catalog.oid
      AND l.objsubid = 1
), marks AS (
    SELECT l.classid, l.objid::pg_catalog.int8 AS id,
           pg_catalog.date_part('epoch', pg_catalog.now() - a.backend_start) AS age
    FROM pg_catalog.pg_locks l
    JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
    WHERE %(member)s::pg_catalog.int4 IS NOT NULL
      AND l.locktype = 'advisory'
      AND l.granted
      AND l.objsubid = 2
      AND l.classid IN ((%(member_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid,
                        (%(want_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid)
      AND l.database = (SELECT d.oid
                        FROM pg_catalog.pg_database d
                        WHERE d.datname = pg_catalog.current_database())
      AND a.application_name = %(application)s
      AND a.usesysid = (SELECT usesysid FROM me)
), joined AS MATERIALIZED (
    SELECT CASE
               WHEN %(member)s::pg_catalog.int4 IS NULL THEN false
               WHEN EXISTS (SELECT 1
                            FROM pg_catalog.pg_locks l
                            WHERE l.locktype = 'advisory'
                              AND l.pid = pg_catalog.pg_backend_pid()
                              AND l.objsubid = 2
                              AND l.classid = (%(member_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid
                              AND l.objid = (%(member)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid)
                   THEN true
               ELSE pg_catalog.pg_try_advisory_lock_shared(%(member_class)s::pg_catalog.int4,
                                                           %(member)s::pg_catalog.int4)
           END AS joined
), attempt AS MATERIALIZED (
    SELECT CASE
               WHEN EXISTS (SELECT 1 FROM lock WHERE pid = pg_catalog.pg_backend_pid()) THEN true
               WHEN %(acquire)s THEN pg_catalog.pg_try_advisory_lock(%(lock_key)s::pg_catalog.int8)
               ELSE false
           END AS leader
)
SELECT attempt.leader,
       CASE
           WHEN attempt.leader THEN pg_catalog.pg_backend_pid()
           ELSE (SELECT pg_catalog.min(pid) FROM lock)
       END AS holder,
       squatter.other IS NOT NULL AS held_by_other,
       squatter.pid AS other_pid,
       squatter.application_name AS other_application,
       squatter.usename AS other_role,
       (SELECT joined FROM joined) AS joined,
       (SELECT pg_catalog.array_agg(m.id ORDER BY m.id)
        FROM marks m
        WHERE m.classid = (%(member_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid) AS members,
       (SELECT pg_catalog.array_agg(m.id ORDER BY m.id)
        FROM marks m
        WHERE m.classid = (%(want_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid) AS wanting,
       (SELECT pg_catalog.array_agg(m.age ORDER BY m.id)
        FROM marks m
        WHERE m.classid = (%(member_class)s::pg_catalog.int4::pg_catalog.int8 & 4294967295)::pg_catalog.oid) AS member_ages
FROM attempt
LEFT JOIN LATERAL (
    SELECT lock.*
    FROM lock
    WHERE lock.other AND NOT attempt.leader
    ORDER BY lock.pid NULLS LAST
    LIMIT 1
) squatter ON true
