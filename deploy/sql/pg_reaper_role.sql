-- The least-privileged role pg-reaper connects as: no superuser, no object privileges.
--
-- Its name is "pg-reaper", like the command and the service's OS user: PostgreSQL reserves
-- every role name that starts with pg_ ("role name "pg_reaper" is reserved"), and with the same
-- name as the OS user, peer authentication on the Unix socket needs no pg_ident.conf map.
-- In SQL the hyphen needs double quotes: "pg-reaper". In a DSN it does not: user=pg-reaper.
--
-- Runs on PostgreSQL 14 to 18, as a superuser, and as often as you like (it changes nothing the
-- second time):
--   psql -v ON_ERROR_STOP=1 -d postgres -f deploy/sql/pg_reaper_role.sql
--
-- The password is set separately, so that it lives in no file under version control:
--   psql -d postgres -c '\password "pg-reaper"'
-- With peer authentication on the Unix socket it needs none.
--
-- Every database's CONNECT privilege goes to PUBLIC by default. Where it was revoked, also:
--   GRANT CONNECT ON DATABASE postgres TO "pg-reaper";

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pg-reaper') THEN
        -- One persistent connection per server, plus a pg-reaper preview or doctor run beside it.
        CREATE ROLE "pg-reaper" LOGIN CONNECTION LIMIT 3;
    END IF;
END
$$;

-- An existing role gets the same attributes. INHERIT: the privileges of the roles granted below
-- are used without SET ROLE.
ALTER ROLE "pg-reaper" LOGIN INHERIT CONNECTION LIMIT 3;

-- pg_signal_backend: pg_terminate_backend()/pg_cancel_backend() on other roles' sessions (never a
-- superuser's). pg_read_all_stats: the state, ages and query of other roles' sessions in
-- pg_stat_activity; without it they show up with a NULL state and can never match a policy.
GRANT pg_signal_backend, pg_read_all_stats TO "pg-reaper";

-- PostgreSQL 16+: pg_use_reserved_connections lets pg-reaper connect into the slots set aside by
-- reserved_connections (postgresql.conf; default 0, so set it, e.g. reserved_connections = 3, and
-- restart). Those slots are kept free of ordinary roles, so pg-reaper can still connect when
-- max_connections is exhausted by exactly the sessions it is there to clean up. (It keeps its
-- connection open between polls; this matters when it has to reconnect.)
-- The membership options are set explicitly because, since 16, a grant's INHERIT comes from the
-- option rather than from the role, and an older grant may have been made WITH INHERIT FALSE.
-- EXECUTE: the 16+ syntax must not even be parsed on 14 and 15.
DO $$
BEGIN
    IF current_setting('server_version_num')::integer >= 160000 THEN
        EXECUTE 'GRANT pg_signal_backend, pg_read_all_stats, pg_use_reserved_connections'
             || ' TO "pg-reaper" WITH INHERIT TRUE';
    END IF;
END
$$;
