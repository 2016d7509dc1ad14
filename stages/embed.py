"""embed: a CNN's pooled features of every kept image, for cluster.input: embeddings.

With cluster.input: features it writes only a note (the same bytes every time), so a new model
re-runs this stage but not the clustering.
"""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load
    from photoprep.core import io
    from photoprep.learn import embed

    c = every.cluster
    if c.input != "embeddings":
        for stale in (PATHS.embeddings_array, PATHS.embeddings_table):
            stale.unlink(missing_ok=True)
        io.write_json({"input": "features", "embeddings": None}, PATHS.embeddings_info)
        return "cluster.input: features: nothing to embed"
    result = embed.embed_stage(every.train, c.embeddings, PATHS)
    io.write_array(result.vectors, PATHS.embeddings_array)
    io.write_table(result.keys, PATHS.embeddings_table)
    io.write_json(result.info, PATHS.embeddings_info)
    dim = result.info["dim"]
    return f"{len(result.keys)} images: {dim}-dim embeddings of the {c.embeddings} {every.train.model}"


if __name__ == "__main__":
    errors.run_stage(main)
