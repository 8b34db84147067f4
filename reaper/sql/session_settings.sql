-- The reaper's own session: never killed by the server's idle/transaction timeouts (a persistent
-- connection must survive to reap when the server is full), and bounded by its own
-- statement_timeout. transaction_timeout exists from PostgreSQL 17 on, hence pg_settings.
SELECT set_config(name,
                  CASE name WHEN 'statement_timeout' THEN %(statement_timeout)s::text ELSE '0' END,
                  false)
FROM pg_settings
WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_session_timeout',
               'idle_in_transaction_session_timeout', 'transaction_timeout')
