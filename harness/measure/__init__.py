"""Measurements outside training: the controlled speed runs of a matrix, inference timing, trained-model
loading for generate / bench-infer, the GPU bench suite (bench/) and the paper-scale sizing script."""
