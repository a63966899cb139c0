"""One training trial: the loop, its one train step, its checkpoints and MLflow run, and the metrics it logs."""
