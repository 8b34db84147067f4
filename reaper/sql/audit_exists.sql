-- Whether the audit table exists (the name quoted and qualified as in the config): a table made
-- beforehand by an administrator is used as it is, and the reaper's role then needs no CREATE
-- privilege on the schema, only INSERT on the table.
-- has_instance: whether it has the instance column (tables made by an earlier pg-reaper do not).
SELECT to_regclass(%(table)s) IS NOT NULL AS present,
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(%(table)s) AND attname = 'instance'
                 AND NOT attisdropped) AS has_instance
