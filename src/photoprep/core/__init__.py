"""core: what every room stands on: params (typed params.yaml), errors (UserError, run_stage), io (the
one atomic write), layout (every path), parallel (joblib / Dask batches), console (progress and
summary lines), memory (freed pages back to the OS)."""
