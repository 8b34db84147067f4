-- A table made by an older pg-reaper has no instance column: add it (as the table's owner).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS instance text
