"""Training with DistributedDataParallel (``train.nproc``): two gloo ranks on the CPU.

- two ranks, launched by the train stage itself, reach the one-process accuracy target on the
  demo (>= 97 % test accuracy) with the same effective batch; rank 0 alone writes;
- every rank draws the same order and augmentation and trains on its strided slice of it;
- a rank that dies makes the stage stop with one line and a non-zero exit, and no process stays.

The demo's arrays come from the real data stages (download, dedup, validate, bucket, split),
run as DVC would run them, in a temporary project.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from test_evaluate import shared_pipeline
from test_train import make_workspace

from photoprep import portable
from photoprep.core.layout import Layout
from photoprep.core.params import EvaluateParams, TrainParams
from photoprep.learn import evaluate, train
from photoprep.learn.checkpoint import load_model, model_from, read_model_file, save_model
from photoprep.learn.data import Batches, Prep, load_data
from photoprep.learn.verify import verify

REPO = Path(__file__).resolve().parents[1]
# Fast enough for CI, still >= 97 % on the demo: convnet at width 16 for 10 epochs. The two ranks
# take 16 images each per step, so the effective batch (2 x 16) equals the one process's 32.
DEMO_TRAIN = {"model": "convnet", "width": 16, "epochs": 10, "device": "cpu"}
TARGET = 0.97


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    env.pop("PHOTOPREP_CACHE", None)
    return env


def run_stage(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{args[0]}.py"), *args[1:]],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_params(root: Path, train_changes: dict, threads: int) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train_changes)
    raw["compute"]["threads"] = threads
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A project with the demo source after the data stages: the images, the splits, splits.json."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "pipeline/sources/demo", root / "pipeline/sources/demo")
    write_params(root, {}, threads=2)
    for stage in (("download", "demo"), ("dedup",), ("validate",), ("bucket",), ("split",)):
        run_stage(root, *stage)
    return root


@pytest.mark.slow
def test_two_gloo_ranks_reach_the_one_process_accuracy_on_the_demo(demo):
    # One process, in this process, on one thread.
    paths = Layout(demo)
    p1 = TrainParams.model_validate(DEMO_TRAIN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train.fit(load_data(p1, paths), p1)
    finally:
        torch.set_num_threads(threads)
    test = evaluate.load_test(one.meta, paths)
    net = model_from(one.state_dict, one.meta)
    one_acc = evaluate.evaluate(net, one.meta, test, EvaluateParams()).metrics["accuracy"]
    assert one_acc >= TARGET

    # Two ranks: the train stage launches them itself (compute.threads 2: one thread each).
    write_params(demo, DEMO_TRAIN | {"nproc": 2, "batch_size": 16}, threads=2)
    done = run_stage(demo, "train")
    assert done.stdout.count("train: convnet: 10 epochs on 2 ranks x cpu (1 threads)") == 1, done.stdout
    model, meta = load_model(paths.model)
    two_acc = evaluate.evaluate(model, meta, test, EvaluateParams()).metrics["accuracy"]
    assert two_acc >= TARGET, (one_acc, two_acc)
    assert meta["params"]["nproc"] == 2 and meta["cpu_threads"] == 1
    perf = yaml.safe_load(paths.train_perf.read_text())
    assert perf["ranks"] == 2 and perf["backend"] == "gloo"
    # rank 0 alone logged: one line per epoch in each learning curve
    curve = (demo / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(curve) == 1 + 10
    assert sorted(p.name for p in paths.checkpoints_dir.iterdir()) == ["best.pt", "last.pt"]
    # one process's model files carry no nproc (their bytes are those of before the param)
    assert "nproc" not in one.meta["params"]


def test_each_rank_trains_on_its_strided_slice_of_one_shared_order():
    n, size = 23, 3
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 4, 4, 3).contiguous().numpy()
    y = torch.arange(n).numpy()
    batches = Batches(x, y, torch.device("cpu"), Prep([0.0] * 3, [1.0] * 3))

    def labels(shard, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([b for _, b in batches.epoch(2, gen, ("colour",), 0, shard)]).tolist()

    whole = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    shards = [labels((rank, size)) for rank in range(size)]
    assert [len(s) for s in shards] == [6, 6, 6]  # 7 positions each, cut to 3 full batches of 2
    for rank, got in enumerate(shards):
        assert got == whole[rank : n - n % size : size][:6]
    assert labels((1, size)) == shards[1]  # the same every time for one seed
    assert labels(None) == whole[:22]  # no shard: the one-process epoch, unchanged


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_stage_with_one_line_and_leaves_no_process(tmp_path):
    make_workspace(tmp_path, n=300, size=32)
    tiny = {"model": "smallcnn", "width": 8, "epochs": 1000, "batch_size": 8, "device": "cpu"}
    write_params(tmp_path, tiny | {"nproc": 2, "early_stopping": 0}, threads=2)
    stage = subprocess.Popen(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=tmp_path,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tree = psutil.Process(stage.pid)
    everyone: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "models/checkpoints/last.pt").exists():
            time.sleep(0.5)  # the ranks are training once the first epoch's checkpoint is written
        everyone = tree.children(recursive=True)
        ranks = [p for p in everyone if "RANK" in _environ(p)]
        assert len(ranks) == 2, [p.cmdline() for p in everyone]
        victim = next(p for p in ranks if _environ(p)["RANK"] == "1")
        victim.send_signal(signal.SIGKILL)
        _, err = stage.communicate(timeout=120)
        assert stage.returncode == 1
        assert err.strip().splitlines()[-1].startswith("photoprep: train.nproc=2: a training rank failed")
        _, alive = psutil.wait_procs(everyone, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for process in [tree, *everyone]:
            if process.is_running():
                process.kill()


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def test_one_process_records_no_nproc_so_its_model_files_keep_their_bytes():
    assert "nproc" not in TrainParams().recorded()
    assert TrainParams(nproc=2).recorded()["nproc"] == 2
    assert TrainParams(nproc=2).recorded().keys() - TrainParams().recorded().keys() == {"nproc"}


def test_each_rank_pins_its_share_of_the_threads(monkeypatch):
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert portable.processes_here(1) == 1 and portable.processes_here(3) == 3  # what the stage launches
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on this node of 8 in all
    assert portable.processes_here(1) == 4


def test_verify_does_not_claim_to_retrain_a_ddp_model(tmp_path_factory, tmp_path, capsys):
    ws = Path(shutil.copytree(shared_pipeline(tmp_path_factory), tmp_path / "repo"))
    state, meta = read_model_file(ws / "models/model.pt")
    meta["params"]["nproc"] = 2
    save_model(state, meta, ws / "models/model.pt")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["train"]["nproc"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    assert verify(root=ws) == 0  # the model itself still re-evaluates exactly
    assert verify(retrain=True, root=ws) == 1
    assert "trained by 2 DDP ranks; retraining runs one process" in capsys.readouterr().out
