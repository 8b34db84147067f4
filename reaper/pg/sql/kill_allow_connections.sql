-- pg-reaper kill --block-connections (false) and pg-reaper unblock (true). The database name is
-- composed with psycopg.sql.Identifier and the value is the keyword true or false: a utility
-- statement takes no bind parameters. PostgreSQL allows it to the database's owner (or a member
-- of the owning role) and to superusers only, CREATEDB is not enough; and it refuses to disallow
-- connections to the database the session itself is connected to.
ALTER DATABASE {database} WITH ALLOW_CONNECTIONS {allow}
