"""Why an image is broken: every reason, in one place.

The decode's reasons are the dedup stage's verdict on the bytes (its probe must decode every
payload to hash it); ``too_small`` is the validate stage's own, which needs no pixels. A broken
image is a row with its reason, never an exception.
"""

DECODE_REASONS = (
    "zero_bytes",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_many_pixels",
    "over_budget",
    "unsupported",
)
"""What the decode (`photoprep.images.decode`, `photoprep.images.formats`) finds wrong with bytes."""

BROKEN_REASONS = (*DECODE_REASONS, "too_small")
"""Every reason the validate stage gives: the decode's, then its own."""
