"""The Ray executor: one trial = one Ray task, on every GPU (or CPU slot) of a node or of a cluster.

    kimi-bench run --matrix experiments/paper.toml --executor ray                     # a local cluster
    kimi-bench run --matrix experiments/paper.toml --executor ray --ray-address auto  # a running cluster
    kimi-bench tune --matrix experiments/tune-smoke.toml --executor ray --n-workers 4

Decisions (docs/ray.md says the same for users):

- The same trial. A task runs `harness.trial.loop.run_trial` with the MLflow layout of the local executor: the
  driver makes the parent run, the task finds or makes the trial's child run by its trial key, and resumes a
  run that is not terminal from its last checkpoint, logging only steps after the last one logged.
- Resources. A trial asks for `num_gpus` = its processes on CUDA, else `num_cpus` = its processes (both
  settable in the matrix's `[ray]` table, which is not part of any trial key). A trial of several processes
  runs DDP through Ray Train's TorchTrainer (Ray sets up the process group), launched from its task.
- Faults. A lost worker process or node is a system failure: Ray retries the task (`max_retries`, default 3)
  and the new attempt resumes the same run from its checkpoint. A trial's own failure (NaN, OOM, a bug) is a
  status returned by run_trial, not an exception, so Ray never retries it (`retry_exceptions=False`).
- Two drivers. Trials are claimed before they are submitted, in two places: a named detached actor
  (`kb-claims`, namespace `kimi-bench`) that serializes claims for every driver on one Ray cluster (a lease
  the driver renews; a dead driver's claims expire), and an exclusive file lock per trial on this machine
  (released by the OS when the driver dies) for drivers that each started their own local cluster. A claimed
  trial is skipped by the other driver ("claimed by another driver").
- Nobody else gets in. The local cluster binds 127.0.0.1 only (Ray's single-machine mode), dashboard off.
  Tracking / storage URIs with credentials never travel as task arguments: tasks get the credential-free
  form and read the real URI from their environment (MLFLOW_TRACKING_URI / KB_OPTUNA_STORAGE).
- Shared stores. On a cluster that spans several machines, a sqlite or file store is refused (point at an
  MLflow server and an Optuna RDB), and the checkpoint folder must be visible from every node (checked).

One module per job: options (the [ray] table, RayOptions, importing Ray), cluster (joining or starting it,
its machines, shared stores, credential-free arguments, a trial's resources), claim_board (ClaimBoard, Claims),
progress_board (the progress actor and the driver's live view), task (one trial in a task, DDP through
TorchTrainer), driver (run_matrix_ray) and tuning (tune_ray: Optuna workers as tasks, calling harness.tune).
"""
