"""train: fit the model on the train split; val picks the best epoch and stops training early.

With ``train.nproc`` > 1 this script starts itself as that many DDP ranks (torchrun) and waits;
under torchrun it is one rank, and rank 0 alone writes (photoprep.learn.distributed).
"""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.layout import PATHS


def main() -> str | None:
    every = params.load()
    p = every.train
    ranks_here = portable.processes_here(p.nproc)  # each rank gets its share of compute.threads
    portable.pin_cpu_math(every.compute.cpu_math, max(1, every.compute.threads // ranks_here))  # first
    from photoprep.learn import launch

    if launch.must_launch(p.nproc):  # train.nproc > 1: this script again, as that many ranks
        launch.launch(p.nproc, __file__)
        return None  # rank 0 printed the summary
    from photoprep.core import io
    from photoprep.learn import checkpoint, data, distributed, live, pretrained, train

    world = distributed.join(p.device)  # None: one process, as without DDP
    main_rank = world is None or world.is_main
    splits = data.load_data(p, PATHS)
    start = pretrained.load_fetched(p, PATHS)
    log = live.LiveLog(PATHS.live_dir) if main_rank else None
    result = train.fit(
        splits, p, checkpoint_dir=PATHS.checkpoints_dir, on_epoch=log, world=world, pretrained=start
    )
    distributed.leave(world)
    if log is None:
        return None  # not rank 0: rank 0 alone writes
    log.close(result)
    checkpoint.save_model(result.state_dict, result.meta, PATHS.model)
    io.write_json(result.perf, PATHS.train_perf)
    perf = result.perf
    ranks = f"{world.size} ranks x " if world is not None else ""
    weights = f" from {p.pretrained}" if p.pretrained else ""
    return f"{p.model}{weights}: {perf.get('epochs_this_run')} epochs on {ranks}{perf.get('device')}"


if __name__ == "__main__":
    errors.run_stage(main)
