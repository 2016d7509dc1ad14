"""photoprep: photo manifests to clean, versioned image datasets and classifiers."""

__version__ = "0.1.0"
