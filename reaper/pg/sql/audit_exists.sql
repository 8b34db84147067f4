-- Whether the audit table exists (looked up in the catalogs, which needs no privilege on the
-- schema, unlike to_regclass): a table made
-- beforehand by an administrator is used as it is, and the reaper's role then needs no CREATE
-- privilege on the schema, only INSERT on the table.
-- has_instance: whether it has the instance column (tables made by an earlier pg-reaper do not).
-- schema_usage, schema_create, table_insert: what the reaper's role may do, so that a missing
-- privilege is said at start (docs/audit.md), not found out by dropped rows.
-- An INSERT runs the table's triggers, rules, row-security policies, column defaults, check
-- constraints and index expressions with the privileges of the role that inserts: whoever owns
-- the table (or the schema, who can drop and remake it) can make the reaper run code. Both must
-- be the reaper's own role or a superuser (pg_database_owner, the owner of schema public from
-- PostgreSQL 15 on, stands for the database's owner).
WITH me AS (
    SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
), owners AS (
    SELECT n.oid AS namespace,
           c.oid AS relation,
           c.relowner AS table_owner,
           CASE WHEN n.nspowner = (SELECT o.oid FROM pg_catalog.pg_roles o
                                   WHERE o.rolname = 'pg_database_owner')
                THEN (SELECT d.datdba FROM pg_catalog.pg_database d
                      WHERE d.datname = pg_catalog.current_database())
                ELSE n.nspowner
           END AS schema_owner
    FROM pg_catalog.pg_namespace n
    LEFT JOIN pg_catalog.pg_class c
           ON c.relnamespace = n.oid AND c.relname = %(name)s
    WHERE n.nspname = %(schema)s
)
SELECT o.relation IS NOT NULL AS present,
       EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
               WHERE a.attrelid = o.relation AND a.attname = 'instance'
                 AND NOT a.attisdropped) AS has_instance,
       pg_catalog.pg_get_userbyid(o.table_owner) AS table_owner,
       o.table_owner IS NULL
           OR o.table_owner = (SELECT oid FROM me)
           OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = o.table_owner)
           AS table_trusted,
       pg_catalog.has_schema_privilege(o.namespace, 'USAGE') AS schema_usage,
       pg_catalog.has_schema_privilege(o.namespace, 'CREATE') AS schema_create,
       o.relation IS NOT NULL
           AND pg_catalog.has_table_privilege(o.relation, 'INSERT') AS table_insert,
       pg_catalog.pg_get_userbyid(o.schema_owner) AS schema_owner,
       o.schema_owner = (SELECT oid FROM me)
           OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r
                        WHERE r.oid = o.schema_owner), false) AS schema_trusted
FROM owners o
