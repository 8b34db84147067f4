-- Which PostgreSQL cluster, and which run of it, the reaper's session is on: two [[servers]]
-- entries on one cluster are refused (reaper/clusters.py, docs/configuration.md).
-- system_identifier is chosen by initdb, so every copy restored from one base backup and every
-- streaming standby shares it with its origin; the postmaster's start time tells those running
-- copies apart (it changes at a restart too, which ends every session: the identity is read
-- again on the next one). Both functions are executable by PUBLIC.
SELECT c.system_identifier AS system_identifier,
       pg_catalog.pg_postmaster_start_time() AS started
FROM pg_catalog.pg_control_system() c
