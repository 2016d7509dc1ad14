"""Portable CPU math: pinned, torch computes the same bytes whatever the CPU would have picked.

One machine cannot be two CPUs, so the tests make the libraries' per-CPU choices differ the
way another machine would: ATen's kernels without AVX2 (``ATEN_CPU_CAPABILITY=default``), MKL
on its compatible branch and oneDNN limited to SSE4.1. Unpinned, a short training then ends on
other weights (so the knobs matter); pinned, it ends on the same bytes as with no such setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from photoprep import portable

TRAIN = r"""
import hashlib, json, sys
from photoprep import portable
portable.pin_cpu_math(sys.argv[1], threads=2)
import torch
portable.apply_threads()
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 30 * 30, 10)
)
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
x = torch.randn(64, 3, 32, 32)
y = torch.randint(0, 10, (64,))
for _ in range(20):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
print(json.dumps({"digest": digest, "describe": portable.describe()}))
"""

OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def _train(mode: str, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {*portable.PORTABLE_ENV, *portable.THREAD_ENV}}
    env.update(extra_env)
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, mode], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {
        "portable": _train("portable", {}),
        "portable_other_cpu": _train("portable", OTHER_CPU),
        "native_other_cpu": _train("native", OTHER_CPU),
    }


def test_pinned_training_ignores_what_another_cpu_would_pick(runs):
    assert runs["portable"]["digest"] == runs["portable_other_cpu"]["digest"]


def test_the_pinned_choices_matter_unpinned_training_differs(runs):
    assert runs["native_other_cpu"]["digest"] != runs["portable"]["digest"]


def test_what_was_pinned_is_recorded_with_the_cpu(runs):
    described = runs["portable_other_cpu"]["describe"]
    assert described["mode"] == "portable"
    assert described["aten_cpu_capability"] == "AVX2"
    assert described["threads"] == 2
    assert described["env"]["MKL_CBWR"] == "COMPATIBLE,STRICT"  # MKL's one branch that holds on AMD
    assert described["env"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert described["loaded_before_pinning"] == []  # numpy and torch read the settings when they load
    assert described["cpu"]


def test_pinning_twice_differently_is_refused():
    script = (
        "from photoprep import portable\n"
        "portable.pin_cpu_math('portable', threads=2)\n"
        "assert portable.pin_cpu_math('portable', threads=2)['threads'] == 2\n"
        "portable.pin_cpu_math('portable', threads=3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "already pinned" in done.stderr


def test_the_download_stage_loads_openblas_without_a_thread_pool():
    """The download does no matrix maths: importing its script, with all it imports, leaves
    numpy's OpenBLAS at one thread (its pool cost the start 80 ms), unless the environment says
    otherwise."""
    code = (
        "import importlib.util, sys\n"
        "sys.path.insert(0, 'stages')\n"
        "spec = importlib.util.spec_from_file_location('stage', 'stages/download.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import threadpoolctl\n"
        "pools = threadpoolctl.threadpool_info()\n"
        "print([p['num_threads'] for p in pools if p['internal_api'] == 'openblas'])\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in portable.THREAD_ENV}
    for given, expected in ((None, "[1]"), ("2", "[2]")):
        run_env = env if given is None else env | {"OPENBLAS_NUM_THREADS": given}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=repo, env=run_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == expected
