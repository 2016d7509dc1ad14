"""review: what a person looks at and changes: the cluster pages and the review export."""
