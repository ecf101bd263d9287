"""Pipeline stages. Each module exposes `run(params) -> Manifest` and is runnable as `python -m stages.<name>`."""
