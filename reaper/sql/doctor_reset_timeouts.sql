-- doctor: the reaper's own session runs with these timeouts set to 0 (session_settings.sql), so
-- pg_settings would show 0 from source 'session'. set_config(name, NULL, true) is a RESET LOCAL:
-- it brings back the value (and source) the session started with, until the transaction ends.
-- transaction_timeout exists from PostgreSQL 17 on, hence pg_settings.
SELECT set_config(name, NULL, true) AS setting
FROM pg_settings
WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout',
               'transaction_timeout', 'statement_timeout')
