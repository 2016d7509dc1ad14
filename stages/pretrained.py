"""pretrained: fetch the weights train.pretrained names into models/pretrained/, once (DVC caches them)."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load
    from photoprep.learn import pretrained

    p = every.train
    record = pretrained.fetch(pretrained.resolve(p, PATHS), PATHS)
    if p.pretrained is None:
        return f"{p.model}: from scratch (train.pretrained: null), nothing fetched"
    source = record["source"]
    where = source.get("path") or f"{source['repo']}/{source['file']}"
    return f"{p.model}: {record['tensors']} tensors from {where}, sha256 {record['sha256'][:12]}"


if __name__ == "__main__":
    errors.run_stage(main)
