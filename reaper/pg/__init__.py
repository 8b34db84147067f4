"""Everything that talks to PostgreSQL, and the only package that imports psycopg.

`connection` opens pg-reaper's pinned session and turns every driver failure into one
`PostgresError`; each feature's queries live beside their SQL (`sql/*.sql`): `activity` (poll and
race-safe signal), `ha` (the advisory lock), `audit` (the audit table), `doctor`, `kill` and
`report` (the leak report's reads of the audit table).
"""
