"""Prefect flows: thin DAGs over ubt_core stages (the distributed-DAG issue adds them)."""
