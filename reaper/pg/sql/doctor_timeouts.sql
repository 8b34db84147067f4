-- doctor: the server-side timeouts in force for a session without overrides of its own, and
-- where each comes from (default, configuration file, command line, ...). Runs after
-- doctor_reset_timeouts.sql in the same transaction. transaction_timeout: 17+ only.
SELECT name, setting, unit, source
FROM pg_catalog.pg_settings
WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout',
               'transaction_timeout', 'statement_timeout')
ORDER BY name
