"""Benchmark: training throughput (images/s) through photoprep's own batch path.

    python bench/train.py [--models smallcnn convnet timm/resnet18] [--sizes 32 64] [--steps 20] [--json]
    python bench/train.py --cpu-math=all --models convnet --sizes 32   # every CPU-math mode, same run

``--cpu-math`` picks how the CPU math is pinned (before torch loads, so each mode is its own
process):

    portable        ``compute.cpu_math: portable`` (the default): vendor-neutral (MKL's COMPATIBLE
                    branch, oneDNN at AVX2, OpenBLAS and numpy pinned, fused AdamW)
    no-onednn       the same with oneDNN switched off (convolutions by ATen and MKL)
    vendor          ``compute.cpu_math: vendor``: MKL's AVX2 branch, the rest as portable
    legacy          the pinning of earlier versions (MKL's AVX2 branch, unfused AdamW, numpy and
                    OpenBLAS free): per machine at best
    native          ``compute.cpu_math: native``: every choice left to the libraries

``--cpu-math=all`` runs each in a fresh process, the modes taking turns for ``--rounds=N`` rounds
(default 3), and prints each mode's median throughput and its ratio to ``portable``'s, per model
and size. Two threads on two busy cores wait on each other: measure on a quiet machine.

Synthetic uint8 images (N x H x W x 3, random, fixed seed) go through the same path as the
train stage: ``data.Batches`` (index a uint8 tensor per batch, move to the device, translate
by up to 4 px and normalise there) and ``train.train_step`` (forward, backward, AdamW step;
bf16 autocast and channels_last on CUDA), with the default params.

On the CPU, for each model and size: images/s of whole training steps.
On CUDA, as well: the real path with the split resident on the GPU and with batches gathered
into pinned host memory (as for a split too big for the GPU), and a synthetic batch already on
the GPU in normalised float (the ceiling). ``ratio`` = real / synthetic (target >= 0.9).

Figures are the median of ``--repeats`` timed runs of ``--steps`` steps after ``--warmup``
steps. ``--json`` prints one JSON object of figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from photoprep import portable

MODES = ("portable", "no-onednn", "vendor", "legacy", "native")
# The pinning of photoprep before the vendor-neutral mode (measured against it here).
LEGACY_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
# Before torch loads (see photoprep.portable); "all" pins in the child processes instead.
_EARLY = argparse.ArgumentParser(add_help=False)
_EARLY.add_argument("--cpu-math", default="portable")
CPU_MATH = _EARLY.parse_known_args()[0].cpu_math  # before numpy and torch load; "--cpu-math X" too
if CPU_MATH == "legacy":
    os.environ.update(LEGACY_ENV | {"MKL_DYNAMIC": "FALSE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    portable.pin_cpu_math("native", threads=2)
elif CPU_MATH in MODES:
    portable.pin_cpu_math("portable" if CPU_MATH == "no-onednn" else CPU_MATH, threads=2)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from photoprep.core.params import TrainParams  # noqa: E402
from photoprep.learn import data, devices, models, optim, train  # noqa: E402

if CPU_MATH == "no-onednn":
    torch.backends.mkldnn.enabled = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(model_name: str, size: int, device: torch.device, p: TrainParams):
    torch.manual_seed(0)
    model = models.build_model(models.Architecture.of(model_name, 10, (size, size))).to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if CPU_MATH == "legacy":  # the unfused AdamW of earlier versions
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=optim.peak_lr(p))
    else:
        optimizer = optim.make_optimizer(model, p, device)
    amp = train.amp_dtype(device, p.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return model, optimizer, scaler, nn.CrossEntropyLoss(), amp


def _time_steps(step, device: torch.device, steps: int, warmup: int, repeats: int, batch: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(steps * batch / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def bench_one(
    model_name: str,
    size: int,
    device: torch.device,
    n: int,
    steps: int,
    warmup: int,
    repeats: int,
    resident: bool | None = True,
    batch_size: int = 64,
) -> float:
    """Images/s of training steps through the real batch path (uint8 split -> device -> steps)."""
    p = TrainParams(model=model_name, device=device.type, batch_size=batch_size)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    mean, std = data.input_stats(pixels[:512])
    prep = data.Prep(mean, std, per_image=True, channels_last=p.channels_last)
    batches = data.Batches(pixels, labels, device, prep, resident)
    model, optimizer, scaler, criterion, amp = _setup(model_name, size, device, p)
    model.train()
    generator = torch.Generator().manual_seed(0)

    def epochs():
        while True:
            yield from batches.epoch(p.batch_size, generator, tuple(p.augment), p.shift_px)

    stream = epochs()

    def step() -> None:
        x, y = next(stream)
        train.train_step(model, x, y, optimizer, scaler, criterion, amp)

    return _time_steps(step, device, steps, warmup, repeats, p.batch_size)


def bench_synthetic(
    model_name: str,
    size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    batch_size: int = 64,
) -> float:
    """Images/s of the same steps on one normalised float batch already on the device."""
    p = TrainParams(model=model_name, device=device.type, batch_size=batch_size)
    model, optimizer, scaler, criterion, amp = _setup(model_name, size, device, p)
    model.train()
    x = torch.randn(p.batch_size, 3, size, size, device=device)
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (p.batch_size,), device=device)

    def step() -> None:
        train.train_step(model, x, y, optimizer, scaler, criterion, amp)

    return _time_steps(step, device, steps, warmup, repeats, p.batch_size)


def compare_cpu_math(argv: list[str]) -> int:
    """Run this benchmark in every CPU-math mode, each in its own process, the modes taking turns
    for ``--rounds`` rounds (a busy machine slows them alike); print each mode's median images/s and
    its ratio to portable's."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--cpu-math")
    own.add_argument("--rounds", type=int, default=3)
    own.add_argument("--json", action="store_true")
    mine, rest = own.parse_known_args(argv)
    rounds = mine.rounds
    seen: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, __file__, f"--cpu-math={mode}", "--json", *rest],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(done.stdout.strip().splitlines()[-1])["cpu"]["images_per_s"]
            for key, rate in figures.items():
                seen[mode].setdefault(key, []).append(rate)
    runs = {m: {k: statistics.median(v) for k, v in seen[m].items()} for m in MODES}
    keys = list(runs["portable"])
    ratios = {m: {k: round(runs[m][k] / runs["portable"][k], 3) for k in keys} for m in MODES}
    if "--json" in argv:
        out = {"images_per_s": runs, "vs_portable": ratios, "rounds": rounds, "cpu": portable.cpu_model()}
        print(json.dumps(out))
    else:
        for key in keys:
            cells = ", ".join(f"{m} {runs[m][key]:.0f} (x{ratios[m][key]:.2f})" for m in MODES)
            print(f"{key}: median images/s of {rounds} rounds: {cells} ({portable.cpu_model()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if CPU_MATH == "all":
        return compare_cpu_math(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smallcnn", "convnet", "timm/resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--n", type=int, default=2048, help="synthetic images in the split")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainParams().batch_size, help="CPU batch size")
    parser.add_argument("--cuda-n", type=int, default=50_000, help="synthetic images in the split on CUDA")
    parser.add_argument("--cuda-batch-size", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures only")
    parser.add_argument("--cpu-math", default="portable", choices=[*MODES, "all"], help="see above")
    parser.add_argument("--rounds", type=int, default=3, help="with --cpu-math=all")
    args = parser.parse_args(argv)

    cpu = torch.device("cpu")
    figures: dict[str, object] = {
        "cpu": {"device": devices.device_name(cpu), "batch_size": args.batch_size, "images_per_s": {}}
    }
    for name in args.models:
        for size in args.sizes:
            rate = bench_one(
                name, size, cpu, args.n, args.steps, args.warmup, args.repeats, True, args.batch_size
            )
            figures["cpu"]["images_per_s"][f"{name}@{size}"] = rate
            if not args.json:
                print(f"{devices.device_name(cpu)}: {name} {size}x{size}: {rate:.0f} images/s", flush=True)

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        steps, warmup = args.steps * 5, args.warmup * 3
        bs = args.cuda_batch_size
        cuda: dict[str, object] = {"device": devices.device_name(gpu), "batch_size": bs}
        for name in args.models:
            for size in args.sizes:
                resident = bench_one(name, size, gpu, args.cuda_n, steps, warmup, args.repeats, True, bs)
                pinned = bench_one(name, size, gpu, args.cuda_n, steps, warmup, args.repeats, False, bs)
                synthetic = bench_synthetic(name, size, gpu, steps, warmup, args.repeats, bs)
                cuda[f"{name}@{size}"] = {
                    "resident_images_per_s": resident,
                    "pinned_images_per_s": pinned,
                    "synthetic_images_per_s": synthetic,
                    "ratio_resident": round(resident / synthetic, 3),
                    "ratio_pinned": round(pinned / synthetic, 3),
                }
                if not args.json:
                    print(
                        f"{devices.device_name(gpu)}: {name} {size}x{size}: real {resident:.0f} images/s "
                        f"(split on the GPU), {pinned:.0f} (pinned host batches), synthetic {synthetic:.0f}; "
                        f"ratio {resident / synthetic:.2f} / {pinned / synthetic:.2f}",
                        flush=True,
                    )
        figures["cuda"] = cuda
    elif not args.json:
        print("no CUDA device: CUDA figures skipped")

    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
