"""What a trial is: the registry (variants, optimizers, presets, ModelDims, TrainConfig, TrialSpec), parameter
matching to one budget, and the matrix file (TOML + --set) expanded into validated trials."""
