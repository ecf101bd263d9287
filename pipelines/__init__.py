"""Orchestration: the Prefect flow over the stages, and the `qlora` CLI."""
