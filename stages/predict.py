"""predict: the trained model on the images without a label (and on test, to calibrate its confidence)."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.chunked import ChunkedArray
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load

    from photoprep.core import io
    from photoprep.learn import checkpoint, predict

    p = every.predict
    model, meta = checkpoint.load_model(PATHS.model)
    result = predict.predict_splits(model, meta, p, PATHS)
    io.write_table(result.table, PATHS.predictions_table)
    io.write_json(result.metrics, PATHS.predict_metrics)
    io.write_table(result.curve, PATHS.confidence_csv)
    images = ChunkedArray(PATHS.images_array)
    predict.draw_by_class(result.table, images, list(meta["classes"]), p.per_class, PATHS.predicted_png)
    return f"{len(result.table)} images of {', '.join(p.splits)}"


if __name__ == "__main__":
    errors.run_stage(main)
