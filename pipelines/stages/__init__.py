"""Stage kinds: the registry the DAG runs them through."""
