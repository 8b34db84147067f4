"""`pg-reaper run`: the long-running process, its scheduler, leadership, HTTP endpoints and
systemd notifications."""
