"""Scripts that start processes (local multi-worker jobs, Slurm, Kubernetes); no model code."""
