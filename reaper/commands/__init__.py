"""The one-shot commands beside the daemon: `sessions`, `kill`/`unblock` and `doctor`."""
