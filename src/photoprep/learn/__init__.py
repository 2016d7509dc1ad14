"""learn: models on the dataset: data loading, training, evaluation, prediction, clustering.

Importing it pins the CPU math libraries' per-CPU choices (:mod:`photoprep.portable`) unless
something pinned them already: stage scripts pin from ``compute.cpu_math`` / ``compute.threads``
before they import this room, so torch loads with those settings.
"""

from photoprep import portable

portable.pin_default()
