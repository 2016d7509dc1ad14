"""dataset: the kept images as a dataset: stable splits and exports."""
