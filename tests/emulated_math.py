"""The learn room's CPU math, a few steps of each kind, hashed: run natively and under emulated CPUs.

    python tests/emulated_math.py MODE INPUTS.npz [PARTS...]

MODE is a ``compute.cpu_math`` mode (``portable``, ``vendor``, ``native``) or ``legacy``: the
pinning photoprep had before the vendor-neutral mode (MKL's AVX2 branch, numpy and OpenBLAS
left free, unfused AdamW). PARTS (default: all) are:

    convnet     the demo's convnet, 2 epochs of a few steps (train.fit: oneDNN convolutions, MKL,
                AdamW, batch norm, the onecycle schedule), then its logits on the val images
    backbone    a timm ResNet-18 at 32 px, 2 steps with mixup (its larger convolutions)
    dec         DEC: 2 epochs of autoencoder pretraining, k-means in the embedding, refinement
    kmeans      the k-means baseline (scikit-learn: OpenBLAS, OpenMP)
    tsne        t-SNE of 250 points (scikit-learn, init pca)
    softmax     predict's float64 softmax in numpy

It prints one JSON object: a sha256 per part (of the weights, assignments or coordinates).
tests/test_emulated_cpus.py compares the objects of a native run and of runs under
``qemu-x86_64 -cpu Haswell-v1`` (an Intel) and ``-cpu EPYC-Rome-v1`` (an AMD).
"""

from __future__ import annotations

import os
import sys

MODE = sys.argv[1]
if MODE == "legacy":
    os.environ.update(
        {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_CBWR": "AVX2,STRICT",
            "MKL_DYNAMIC": "FALSE",
            "OMP_NUM_THREADS": "2",
            "MKL_NUM_THREADS": "2",
        }
    )

from photoprep import portable  # noqa: E402

portable.pin_cpu_math("native" if MODE == "legacy" else MODE, threads=2)  # before numpy and torch

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

portable.apply_threads()


def digest(*arrays: object) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, dict):
            for k in sorted(a):
                h.update(k.encode())
                h.update(np.ascontiguousarray(a[k].detach().cpu().numpy()).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def split(name: str, pixels: np.ndarray, labels: np.ndarray):  # type: ignore[no-untyped-def]
    from photoprep.learn.data import Rows, SplitData

    table = pd.DataFrame({"source": "d", "id": [str(i) for i in range(len(labels))], "label": labels})
    return SplitData(name, table, Rows(pixels, np.arange(len(pixels))), labels.astype(np.int64), name)


def convnet(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.core.params import TrainParams
    from photoprep.learn import evaluate, train
    from photoprep.learn.checkpoint import model_from
    from photoprep.learn.data import TrainData

    data = TrainData(
        split("train", inputs["train_x"], inputs["train_y"]),
        split("val", inputs["val_x"], inputs["val_y"]),
        [str(c) for c in range(10)],
        "images",
    )
    p = TrainParams(model="convnet", width=16, epochs=2, batch_size=16, device="cpu", dropout=0.2)
    if MODE == "legacy":  # the unfused AdamW of earlier versions: torch.sqrt by MKL's vector maths
        from photoprep.learn import optim

        def unfused(model: torch.nn.Module, p: TrainParams, device: torch.device) -> torch.optim.Optimizer:
            return torch.optim.AdamW(model.parameters(), lr=optim.peak_lr(p), weight_decay=p.weight_decay)

        optim.make_optimizer = unfused
    result = train.fit(data, p)
    model = model_from(result.state_dict, result.meta)
    logits, _ = evaluate.logits_of(model, result.meta, inputs["val_x"], 64, torch.device("cpu"))
    return digest(result.state_dict, logits)


def backbone(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.core.params import TrainParams
    from photoprep.learn import models, optim, train
    from photoprep.learn.data import Batches, Prep

    torch.manual_seed(0)
    p = TrainParams(model="timm/resnet18", batch_size=16, device="cpu", mixup=0.4, image_size=(32, 32))
    model = models.build_model(models.Architecture.of(p.model, 10, (32, 32)))
    optimizer = optim.make_optimizer(model, p, torch.device("cpu"))
    mix = optim.make_mixup(p, 10)
    assert mix is not None
    batches = Batches(inputs["train_x"], inputs["train_y"], torch.device("cpu"), Prep([0.5] * 3, [0.25] * 3))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    schedule = optim.Schedule(p, optimizer, steps_per_epoch=2)
    models.train_mode(model)
    with schedule.mixing(0):
        for step, (x, y) in enumerate(batches.epoch(16, torch.Generator().manual_seed(0), ("translate",), 4)):
            if step == 2:
                break
            schedule.at(step)
            mixed, target = mix[0](x, y)
            train.train_step(model, mixed, target, optimizer, scaler, mix[1], None)
    return digest(model.state_dict())


def dec(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.core.params import ClusterParams
    from photoprep.learn.cluster import scale_inputs
    from photoprep.learn.dec import fit_dec

    p = ClusterParams(
        dims=[64, 64, 128, 8], pretrain_epochs=2, max_iter=30, batch_size=64, n_clusters=5, device="cpu"
    )
    x, mean, scale = scale_inputs(inputs["features"])
    fit = fit_dec(x, mean, scale, p)
    return digest(fit.state_dict, fit.clusters, fit.confidence, fit.distance)


def kmeans(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.learn.dec import run_kmeans

    km = run_kmeans(inputs["features"], 5, 10, 0)
    return digest(km.cluster_centers_, km.labels_)


def tsne(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.learn.introspect import tsne_map

    return digest(tsne_map(inputs["points"], 30.0, 0))


def softmax(inputs: dict[str, np.ndarray]) -> str:
    from photoprep.learn.predict import top_k

    index, prob = top_k(inputs["logits"], 3)
    return digest(index, prob)


PARTS = {
    "convnet": convnet,
    "backbone": backbone,
    "dec": dec,
    "kmeans": kmeans,
    "tsne": tsne,
    "softmax": softmax,
}


def main() -> None:
    inputs = dict(np.load(Path(sys.argv[2])))
    wanted = sys.argv[3:] or list(PARTS)
    out = {name: PARTS[name](inputs) for name in wanted}
    out["aten"] = torch.backends.cpu.get_cpu_capability()
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
