"""Running a suite beyond one process: executors (local, Ray), tracking (MLflow)."""
