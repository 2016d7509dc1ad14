"""train: fit the model on the train split; val picks the best epoch and stops training early."""

from photoprep import params, report, train


def main() -> None:
    p = params.load().train
    data = train.load_data(p, "data", "reports/splits.json")
    log = train.LiveLog("dvclive")
    result = train.fit(data, p, checkpoint_dir="models/checkpoints", on_epoch=log)
    log.close(result)
    train.save_model(result.state_dict, result.meta, "models/model.pt")
    report.write_json(result.perf, "reports/train_perf.json")


if __name__ == "__main__":
    params.run_stage(main)
