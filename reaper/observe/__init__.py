"""What pg-reaper tells the world: Prometheus metrics, the audit sink and structured logs."""
