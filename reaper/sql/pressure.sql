-- Roles whose connection limit applies, for when_role_connections_above; read at every poll
-- (ALTER ROLE ... CONNECTION LIMIT takes effect at once). The reaper counts their client
-- sessions in the poll's own rows, as PostgreSQL counts against the limit: client backends only
-- (not walsenders, not background or parallel workers). PostgreSQL does not apply a role's
-- limit to a superuser, so superuser roles are left out; -1 means no limit.
SELECT r.rolname AS role,
       r.rolconnlimit AS connection_limit
FROM pg_roles r
WHERE r.rolconnlimit >= 0
  AND r.rolcanlogin
  AND NOT r.rolsuper
