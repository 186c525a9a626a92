"""The driver side: spec, CLI, orchestration on Ray Tune, MLflow tracking."""
