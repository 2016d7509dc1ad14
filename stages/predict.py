"""predict: the trained model on the images without a label (and on test, to calibrate its confidence)."""

import numpy as np

from photoprep import params, predict, report, train


def main() -> None:
    p = params.load().predict
    model, meta = train.load_model("models/model.pt")
    result = predict.predict_splits(model, meta, p, "data", "reports/splits.json")
    report.write_table(result.table, "data/predictions.parquet")
    report.write_json(result.metrics, "metrics/predict.json")
    report.write_table(result.curve, "plots/confidence.csv")
    images = np.load("data/processed/images.npy", mmap_mode="r")
    predict.draw_by_class(result.table, images, list(meta["classes"]), p.per_class, "reports/predicted.png")
    print(f"predict: {len(result.table)} images of {', '.join(p.splits)} in {result.seconds:.1f} s")


if __name__ == "__main__":
    params.run_stage(main)
