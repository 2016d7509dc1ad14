"""Pretrained weights as a versioned input: named by ``train.pretrained``, fetched once, read safely.

The ``pretrained`` stage resolves ``train.pretrained`` (:func:`resolve`) and :func:`fetch` es the
weights into ``models/pretrained/``: ``weights.safetensors`` and ``pretrained.json`` (where they
came from, the hash of what was fetched, the backbone's data config). DVC caches that folder, so
its hash is in ``dvc.lock`` and a grader's ``dvc pull`` gets the same bytes; training reads them
with :func:`load_fetched` and never downloads.

What ``train.pretrained`` may name (``train.model`` must be a ``timm/<architecture>``):

==============================  =============================================================
``null``                        from scratch: no weights, nothing fetched
``imagenet``                    the architecture's default pretrained tag in timm (for resnet18:
                                ``resnet18.a1_in1k``), from the Hugging Face hub
a tag (``a1_in1k``)             ``<architecture>.<tag>`` as timm knows it, from the hub
a hub id                        ``hf-hub:<org>/<repo>`` (or ``<org>/<repo>``): that repository's
                                ``model.safetensors`` (else ``pytorch_model.bin``)
a file (``.safetensors``,       a local file under ``pipeline/pretrained/`` (a dependency of the
``.pth``, ``.pt``, ``.bin``)    stage, so a changed file re-runs it; nothing is read elsewhere)
==============================  =============================================================

The hub is reached through ``huggingface_hub`` (``HF_ENDPOINT`` names another hub: the tests
serve one on 127.0.0.1). Nothing is unpickled: ``.safetensors`` files are parsed as such, the
others read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers. A file that is missing, damaged, a pickle of code, or made for another architecture
stops the stage with one line naming it. Fetched weights are stored as safetensors whatever
they came as, so training only ever reads safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from photoprep.core.errors import UserError
from photoprep.core.io import read_json, write_bytes, write_json
from photoprep.core.layout import PATHS, Layout
from photoprep.core.learn_params import WEIGHT_SUFFIXES, TrainParams
from photoprep.learn import backbones
from photoprep.learn.models import Architecture

__all__ = [
    "FORMAT",
    "HUB_FILES",
    "Pretrained",
    "WeightsSource",
    "check_fits",
    "fetch",
    "load_fetched",
    "own_data_config",
    "read_weights",
    "resolve",
    "save_weights",
]

FORMAT = "photoprep.pretrained/1"
_CONFIG_KEY = "photoprep.data_config"  # safetensors metadata of weights photoprep saved
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first
_PICKLE_STARTS = (b"\x80", b"PK\x03\x04")  # a pickle protocol 2+ opcode, or torch.save's zip archive


@dataclass(frozen=True)
class WeightsSource:
    """Where ``train.pretrained`` says the weights are: ``kind`` none, hub or file."""

    model: str  # train.model, e.g. timm/resnet18
    spec: str | None  # train.pretrained as written
    kind: str  # none | hub | file
    hub_id: str | None = None  # e.g. timm/resnet18.a1_in1k
    path: Path | None = None  # a local file under pipeline/pretrained/
    config: str | None = None  # timm's pretrained config that describes them: resnet18.a1_in1k

    @property
    def architecture(self) -> str:
        return backbones.timm_name(self.model)


def resolve(p: TrainParams, paths: Layout = PATHS) -> WeightsSource:
    """``train.pretrained`` as a source; a tag timm does not know, or a file outside
    ``pipeline/pretrained/``, is a UserError."""
    spec = p.pretrained
    if spec is None:
        return WeightsSource(p.model, None, "none")
    arch = backbones.timm_name(p.model)
    if spec.lower().endswith(WEIGHT_SUFFIXES):
        return WeightsSource(p.model, spec, "file", path=_local_file(spec, paths))
    if spec.startswith("hf-hub:") or "/" in spec:
        return WeightsSource(p.model, spec, "hub", hub_id=spec.removeprefix("hf-hub:"))
    name = arch if spec == "imagenet" else f"{arch}.{spec}"
    cfg = backbones.pretrained_cfg(name)
    if cfg is None or not cfg.get("hf_hub_id"):
        known = backbones.timm_module().list_pretrained(f"{arch}.*")
        tags = ", ".join(sorted(k.split(".", 1)[1] for k in known)[:8]) or "none"
        raise UserError(
            f"train.pretrained: timm has no pretrained weights {name!r} on the hub (tags of {arch}: {tags}; "
            "or name a hub id hf-hub:<org>/<repo>, or a local file under "
            f"{PATHS.local_weights_dir}/)"
        )
    return WeightsSource(p.model, spec, "hub", hub_id=str(cfg["hf_hub_id"]), config=name)


def _local_file(spec: str, paths: Layout) -> Path:
    folder = paths.local_weights_dir.resolve()
    given = Path(spec)
    path = (given if given.is_absolute() else paths.root / given).resolve()
    if not path.is_relative_to(folder):
        raise UserError(
            f"train.pretrained: {spec} is outside {PATHS.local_weights_dir}/: put local weights there "
            "(the pretrained stage depends on that folder, so DVC sees when they change)"
        )
    if not path.is_file():
        raise UserError(
            f"train.pretrained: {spec} not found (a local weights file under {PATHS.local_weights_dir}/)"
        )
    return path


# --------------------------------------------------------------------------- reading


def read_weights(path: Path, shown: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, without unpickling code: ``.safetensors`` parsed as such,
    anything else with ``torch.load(weights_only=True)``; a checkpoint's ``state_dict`` or
    ``model`` entry is taken. Damage, a pickle where safetensors is expected and a pickle of
    anything but tensors are UserErrors naming ``shown`` (default: the path)."""
    name = shown or str(path)
    if not path.is_file():
        raise UserError(f"{name}: not found")
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        raise UserError(f"{name}: empty file")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path, name, head)
    else:
        state = _read_torch(path, name)
    if not state:
        raise UserError(f"{name}: holds no tensors")
    return state


def _read_safetensors(path: Path, name: str, head: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if head.startswith(_PICKLE_STARTS):
        raise UserError(
            f"{name}: not a safetensors file but a pickle (torch.save); safetensors files are never "
            "unpickled: convert it, or name it .pth to have it read with torch.load(weights_only=True)"
        )
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{name}: damaged or truncated safetensors file ({first})") from None


def _read_torch(path: Path, name: str) -> dict[str, torch.Tensor]:
    import pickle

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).splitlines()[0][:160]
        raise UserError(
            f"{name}: refused: it pickles more than tensors (torch.load weights_only: {detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{name}: damaged or truncated ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise UserError(f"{name}: holds no state dict (a mapping of tensor names to tensors)")
    return dict(blob)


def _classifier_names(arch: str) -> tuple[str, ...]:
    cfg = backbones.pretrained_cfg(arch) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def check_fits(model: str, state: dict[str, torch.Tensor], shown: str) -> None:
    """A UserError unless ``state`` holds every tensor of ``model`` but its classifier, each of the
    shape the model has (weights of another architecture would load nothing, silently)."""
    arch = backbones.timm_name(model)
    fresh = backbones.create(Architecture.of(model, num_classes=0)).state_dict()
    heads = _classifier_names(arch)
    wanted = {k: v for k, v in fresh.items() if not k.startswith(tuple(f"{h}." for h in heads))}
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or wrong:
        found = next(iter(state))
        detail = (
            f"{len(missing)} of {len(wanted)} tensors of {model} missing (e.g. {missing[0]!r}; it holds "
            f"e.g. {found!r})"
            if missing
            else f"{wrong[0]!r} is {tuple(state[wrong[0]].shape)}, "
            f"{model} wants {tuple(wanted[wrong[0]].shape)}"
        )
        raise UserError(f"{shown}: weights of another architecture than {model}: {detail}")


# --------------------------------------------------------------------------- fetching


def fetch(source: WeightsSource, paths: Layout = PATHS) -> dict[str, Any]:
    """Fetch the weights of ``source`` into ``models/pretrained/`` (nothing but the record when the
    source is none); check them against the architecture; return the record written."""
    record: dict[str, Any] = {"format": FORMAT, "model": source.model, "pretrained": source.spec}
    if source.kind == "none":
        paths.pretrained_weights.unlink(missing_ok=True)
        write_json(record, paths.pretrained_info)
        return record
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=_parent(paths)) as tmp:
        if source.kind == "file":
            assert source.path is not None
            local, origin = source.path, {"kind": "file", "path": _relative(source.path, paths)}
        else:
            local, origin = _download(source, Path(tmp))
        shown = origin.get("path") or f"{origin['repo']}/{origin['file']}"
        state = read_weights(local, shown)
        check_fits(source.model, state, shown)
        digest = _sha256(local)
        cfg = own_data_config(local, shown) or backbones.data_config(source.config or source.architecture)
    blob = _safetensors_bytes(state)
    write_bytes(blob, paths.pretrained_weights)
    record |= {
        "source": origin,
        "sha256": digest,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors": len(state),
        "parameters": int(sum(t.numel() for t in state.values())),
        "data_config": cfg,
    }
    write_json(record, paths.pretrained_info)
    return record


def _parent(paths: Layout) -> Path:
    paths.pretrained_dir.mkdir(parents=True, exist_ok=True)
    return paths.pretrained_dir


def _relative(path: Path, paths: Layout) -> str:
    return path.relative_to(paths.root.resolve()).as_posix()


def _download(source: WeightsSource, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The first of :data:`HUB_FILES` the hub repository has, downloaded into ``folder``."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

    assert source.hub_id is not None
    # HF_ENDPOINT read now, not when huggingface_hub was imported: the hub this process is told of.
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    for filename in HUB_FILES:
        try:
            local = Path(hf_hub_download(source.hub_id, filename, cache_dir=folder, endpoint=endpoint))
        except RemoteEntryNotFoundError:  # the repository has no such file: try the next
            continue
        except RepositoryNotFoundError:
            raise UserError(
                f"train.pretrained: the hub at {endpoint} has no repository {source.hub_id}"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UserError(
                f"train.pretrained: could not fetch {source.hub_id}/{filename} from {endpoint} "
                f"({first}); check the network, or put the weights under {PATHS.local_weights_dir}/ "
                "and name that file"
            ) from None
        revision = local.parent.name  # the hub's cache keeps files under snapshots/<commit>/
        return local, {"kind": "hub", "repo": source.hub_id, "file": filename, "revision": revision}
    raise UserError(f"train.pretrained: {source.hub_id} on {endpoint} has none of {', '.join(HUB_FILES)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(
    state: dict[str, torch.Tensor], path: str | Path, data_config: dict[str, Any] | None = None
) -> str:
    """A state dict as a safetensors file, atomically (what ``train.pretrained`` can name), with the
    data config the weights were trained with in its metadata; the file's sha256."""
    blob = _safetensors_bytes(state, data_config)
    write_bytes(blob, path)
    return hashlib.sha256(blob).hexdigest()


def own_data_config(path: Path, shown: str) -> dict[str, Any] | None:
    """The data config a safetensors file carries in its metadata (weights photoprep saved: their
    input size, normalisation and interpolation), or None."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(_CONFIG_KEY)
    if text is None:
        return None
    try:
        cfg = json.loads(text)
        return {
            "input_size": [int(v) for v in cfg["input_size"]],
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "interpolation": cfg.get("interpolation"),
            "normalize": str(cfg.get("normalize", "pretrained")),
        }
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{shown}: its metadata's {_CONFIG_KEY} is not a data config") from None


def _safetensors_bytes(state: dict[str, torch.Tensor], data_config: dict[str, Any] | None = None) -> bytes:
    from safetensors.torch import save

    metadata = {_CONFIG_KEY: json.dumps(data_config, sort_keys=True)} if data_config else None
    # Own, contiguous copies: safetensors refuses tensors that share memory (tied weights).
    return bytes(save({k: v.detach().contiguous().clone() for k, v in sorted(state.items())}, metadata))


# --------------------------------------------------------------------------- reading what was fetched


@dataclass(frozen=True)
class Pretrained:
    """Weights fetched by the pretrained stage, and their record (``pretrained.json``)."""

    state_dict: dict[str, torch.Tensor]
    record: dict[str, Any]

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self.record["data_config"])

    def summary(self) -> dict[str, Any]:
        """What a model file records of its starting weights (no tensors)."""
        return {k: self.record.get(k) for k in ("pretrained", "source", "sha256", "weights_sha256")}


def load_fetched(p: TrainParams, paths: Layout = PATHS) -> Pretrained | None:
    """The weights ``train.pretrained`` names, as the pretrained stage fetched them; None without
    any. Weights fetched for other params mean the stage has not run since they changed."""
    if p.pretrained is None:
        return None
    if not paths.pretrained_info.exists():
        raise UserError(f"{PATHS.pretrained_info} not found (run the pretrained stage: dvc repro pretrained)")
    record = read_json(paths.pretrained_info)
    if record.get("model") != p.model or record.get("pretrained") != p.pretrained:
        raise UserError(
            f"{PATHS.pretrained_dir} holds weights for {record.get('model')} / {record.get('pretrained')}, "
            f"not {p.model} / {p.pretrained}: run the pretrained stage (dvc repro pretrained)"
        )
    state = read_weights(paths.pretrained_weights, str(PATHS.pretrained_weights))
    if hashlib.sha256(paths.pretrained_weights.read_bytes()).hexdigest() != record.get("weights_sha256"):
        raise UserError(
            f"{PATHS.pretrained_weights} does not match its hash in {PATHS.pretrained_info}: "
            "run the pretrained stage again (dvc repro -f pretrained)"
        )
    return Pretrained(state, record)
