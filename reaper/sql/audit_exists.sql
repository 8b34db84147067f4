-- Whether the audit table exists (the name quoted and qualified as in the config): a table made
-- beforehand by an administrator is used as it is, and the reaper's role then needs no CREATE
-- privilege on the schema, only INSERT on the table.
SELECT to_regclass(%(table)s) IS NOT NULL AS present
