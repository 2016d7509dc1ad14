"""evaluate: score the trained model on the test split; metrics, confusion rows, sample grids."""

from pathlib import Path

from photoprep import evaluate, params, report, train


def main() -> None:
    p = params.load().evaluate
    model, meta = train.load_model("models/model.pt")
    test = evaluate.load_test(meta, "data", "reports/splits.json")
    result = evaluate.evaluate(model, meta, test, p)
    report.write_json(result.metrics, "metrics/eval.json")
    perf_path = Path("reports/train_perf.json")
    train_perf = report.read_json(perf_path) if perf_path.exists() else None
    report.write_json(evaluate.perf_report(result, train_perf, p.batch_size), "metrics/perf.json")
    report.write_table(result.confusion, "plots/confusion.csv")
    shown = (evaluate.split_pixels(test, "data"), test.labels, result.predicted, meta["classes"])
    evaluate.draw_predictions(*shown, p.samples, "reports/predictions.png")
    evaluate.draw_misclassified(*shown, p.misclassified, "reports/misclassified.png")


if __name__ == "__main__":
    params.run_stage(main)
