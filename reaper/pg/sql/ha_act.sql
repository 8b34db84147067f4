-- Balanced leadership (docs/ha.md): what an instance does after looking (ha_lead.sql), each
-- only when asked. %(release)s: hand the server's lock over, leaving it free for the instance
-- that should lead (only ever asked of the session that holds it). %(want)s: true to hold the
-- shared mark (%(want_class)s, %(member)s) that asks the leader to hand this server over, false
-- to let it go, NULL to leave it as it is.
SELECT CASE
           WHEN %(release)s THEN pg_catalog.pg_advisory_unlock(%(lock_key)s::pg_catalog.int8)
           ELSE false
       END AS released,
       CASE
           WHEN %(want)s IS TRUE
               THEN pg_catalog.pg_try_advisory_lock_shared(%(want_class)s::pg_catalog.int4,
                                                           %(member)s::pg_catalog.int4)
           WHEN %(want)s IS FALSE
               THEN NOT pg_catalog.pg_advisory_unlock_shared(%(want_class)s::pg_catalog.int4,
                                                             %(member)s::pg_catalog.int4)
       END AS wanting
