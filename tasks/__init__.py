"""Prefect tasks: thin wrappers around the library that write content-addressed artifacts
and return small references (paths + hashes), never tensors."""
