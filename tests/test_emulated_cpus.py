"""The same bytes on an Intel and on an AMD CPU, shown under emulated CPUs of each vendor.

One machine cannot be two CPUs, but qemu-user can run this project's Python under another CPU
model: ``qemu-x86_64 -cpu Haswell-v1`` (an Intel, AVX2) and ``-cpu EPYC-Rome-v1`` (an AMD, AVX2).
The libraries then take the code paths they take on those CPUs (MKL by vendor, oneDNN and
OpenBLAS by ISA and cache sizes, numpy by ISA), and qemu computes the approximate reciprocal
instructions exactly where real CPUs of each vendor round them their own way, so a kernel
that uses them shows up as a difference too.

``tests/emulated_probe.py`` runs dedup's probe (decode, perceptual hashes of every view, the
colour test) on a few pictures: its records must be the native run's too.

``tests/emulated_math.py`` runs a few steps of each kind of CPU math the learn stages do:
training the demo's convnet and a timm ResNet-18, evaluation logits, DEC, k-means, t-SNE, the
softmax of predict. Pinned ``portable`` (the default), every hash must equal the native run's
on this machine, whatever its vendor and whether or not it has AVX-512. With the pinning of
earlier versions (``legacy``) the two emulated vendors part: the check can fail.
.ci/run installs qemu-user; without it the tests skip with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_train import render_digits

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("emulated_math.py")
PROBE = Path(__file__).with_name("emulated_probe.py")
CPUS = {"intel": "Haswell-v1", "amd": "EPYC-Rome-v1"}
QEMU = shutil.which("qemu-x86_64")


def _run(mode: str, inputs: Path, cpu: str | None = None, parts: tuple[str, ...] = ()) -> dict[str, str]:
    command = [sys.executable, str(SCRIPT), mode, str(inputs), *parts]
    if cpu is not None:
        assert QEMU is not None
        command = [QEMU, "-cpu", cpu, *command]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MKL_", "OMP_", "OPENBLAS_", "NPY_", "ATEN_"))
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if QEMU is None:
        pytest.skip("needs qemu-user (qemu-x86_64); .ci/run installs it")
    pixels, labels = render_digits(96, 32)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (5, 200))
    features = (centres[rng.integers(0, 5, 300)] + rng.normal(0, 1, (300, 200))).astype(np.float32)
    path = tmp_path_factory.mktemp("emulated") / "inputs.npz"
    np.savez(
        path,
        train_x=pixels[:64],
        train_y=labels[:64],
        val_x=pixels[64:],
        val_y=labels[64:],
        features=features,
        points=rng.normal(0, 1, (250, 16)),
        logits=rng.normal(0, 3, (100, 10)).astype(np.float32),
    )
    return path


def test_portable_math_gives_the_native_bytes_on_an_emulated_intel_and_amd(inputs: Path) -> None:
    with ThreadPoolExecutor(3) as pool:
        native = pool.submit(_run, "portable", inputs)
        emulated = {vendor: pool.submit(_run, "portable", inputs, cpu) for vendor, cpu in CPUS.items()}
        runs = {"native": native.result(), **{v: f.result() for v, f in emulated.items()}}
    assert all(r["aten"] == "AVX2" for r in runs.values()), runs
    for vendor in CPUS:
        differ = sorted(k for k in runs["native"] if runs[vendor][k] != runs["native"][k])
        assert differ == [], f"{vendor} ({CPUS[vendor]}) differs from this machine in {differ}"


def test_the_pinning_of_earlier_versions_parts_intel_from_amd(inputs: Path) -> None:
    """The check above can fail: MKL's AVX2 branch and the unfused AdamW part the vendors."""
    with ThreadPoolExecutor(2) as pool:
        runs = dict(
            zip(
                CPUS,
                pool.map(lambda cpu: _run("legacy", inputs, cpu, ("convnet",)), CPUS.values()),
                strict=True,
            )
        )
    assert runs["intel"]["convnet"] != runs["amd"]["convnet"]


def test_the_probe_gives_the_native_hashes_on_an_emulated_intel_and_amd() -> None:
    if QEMU is None:
        pytest.skip("needs qemu-user (qemu-x86_64); .ci/run installs it")

    def run(cpu: str | None) -> dict[str, str]:
        command = [sys.executable, str(PROBE)]
        done = subprocess.run(
            [QEMU, "-cpu", cpu, *command] if cpu else command, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(3) as pool:
        native, *emulated = pool.map(run, [None, *CPUS.values()])
    assert native["valid"] == 24
    assert emulated == [native, native], f"native {native}, emulated {dict(zip(CPUS, emulated, strict=True))}"
