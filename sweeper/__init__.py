"""The driver side: spec, CLI, orchestration on Ray Tune, MLflow tracking; and a sweep's results as data
(``from sweeper import load_histories, load_trials``)."""

__all__ = ["load_histories", "load_trials"]


def __getattr__(name: str):
    # Lazily, so that the CLI does not import pandas to print --help.
    if name in __all__:
        from sweeper import results

        return getattr(results, name)
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")
