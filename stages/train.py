"""train: fit the model on the train split; val picks the best epoch and stops training early."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import errors, io, params, portable
from photoprep.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.portable, every.compute.threads)  # before torch loads
    from photoprep.learn import checkpoint, data, live, train

    p = every.train
    splits = data.load_data(p, PATHS)
    log = live.LiveLog(PATHS.live_dir)
    result = train.fit(splits, p, checkpoint_dir=PATHS.checkpoints_dir, on_epoch=log)
    log.close(result)
    checkpoint.save_model(result.state_dict, result.meta, PATHS.model)
    io.write_json(result.perf, PATHS.train_perf)
    perf = result.perf
    return f"{p.model}: {perf.get('epochs_this_run')} epochs on {perf.get('device')}"


if __name__ == "__main__":
    errors.run_stage(main)
