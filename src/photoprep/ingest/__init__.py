"""ingest: manifests and sources in, image bytes out (the fetcher and the shard store)."""
