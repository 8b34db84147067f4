-- The leak report (docs/report.md): can the audit table be read, and safely? Looked up in the
-- catalogs, which needs no privilege on the schema (unlike to_regclass). No row: no such
-- schema; present false: no such table.
-- A SELECT runs code of the table's owner as the reader in two ways: a view (its functions run
-- as whoever reads it) and row-level security (its policies' expressions run as the reader).
-- So the report reads only a plain or partitioned table whose row security is off, does not
-- apply to the reader (a superuser or a BYPASSRLS role), or is owned by the reader or a
-- superuser. And the columns it reads must have the types pg-reaper writes (the parameters
-- columns and types): a column of another type could bring its owner's operators into the
-- GROUP BY.
SELECT current_user AS reader,
       c.oid IS NOT NULL AS present,
       c.relkind IN ('r', 'p') AS is_table,
       pg_catalog.pg_get_userbyid(c.relowner) AS table_owner,
       NOT coalesce(c.relrowsecurity, false)
           OR c.relowner = (SELECT r.oid FROM pg_catalog.pg_roles r
                            WHERE r.rolname = current_user)
           OR (SELECT r.rolsuper OR r.rolbypassrls FROM pg_catalog.pg_roles r
               WHERE r.rolname = current_user)
           OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r
                        WHERE r.oid = c.relowner), false) AS table_trusted,
       pg_catalog.has_schema_privilege(n.oid, 'USAGE') AS schema_usage,
       c.oid IS NOT NULL
           AND pg_catalog.has_table_privilege(c.oid, 'SELECT') AS table_select,
       ARRAY(SELECT expected.name
             FROM ROWS FROM (pg_catalog.unnest(%(columns)s::pg_catalog.text[]),
                             pg_catalog.unnest(%(types)s::pg_catalog.regtype[]))
                  WITH ORDINALITY AS expected(name, type, n)
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid = c.oid AND a.attname = expected.name
                                 AND a.atttypid = expected.type AND NOT a.attisdropped)
             ORDER BY expected.n) AS mistyped
FROM pg_catalog.pg_namespace n
LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = %(name)s
WHERE n.nspname = %(schema)s
