"""images: per-image work on stored bytes: decode once, probe, dedup, validate, bucket, features."""
