"""`pg-reaper demo` and the throwaway PostgreSQL servers it runs on (`embedded`), which the test
suite and the benchmarks start too: never on the reaping path."""
