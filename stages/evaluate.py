"""evaluate: score the trained model on the test split; metrics, confusion rows, sample grids."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load
    from photoprep.core import io
    from photoprep.learn import checkpoint, evaluate

    p = every.evaluate
    model, meta = checkpoint.load_model(PATHS.model)
    test = evaluate.load_test(meta, PATHS)
    result = evaluate.evaluate(model, meta, test, p)
    io.write_json(result.metrics, PATHS.eval_metrics)
    perf_path = PATHS.train_perf
    train_perf = io.read_json(perf_path) if perf_path.exists() else None
    io.write_json(evaluate.perf_report(result, train_perf, p.batch_size), PATHS.perf_metrics)
    io.write_table(result.confusion, PATHS.confusion_csv)
    shown = (evaluate.split_pixels(test, PATHS), test.labels, result.predicted, meta["classes"])
    evaluate.draw_predictions(*shown, p.samples, PATHS.predictions_png)
    evaluate.draw_misclassified(*shown, p.misclassified, PATHS.misclassified_png)
    return f"{result.metrics.get('n_test')} test images: accuracy {result.metrics.get('accuracy')}"


if __name__ == "__main__":
    errors.run_stage(main)
