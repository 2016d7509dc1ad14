"""Typed parameters: `params.yaml` is loaded once into pydantic models and validated.

An unknown key or a bad value stops a stage with one line naming the key path, e.g.
``params.yaml: dedup.hash_size: must be >= 4 (got 2)``.

Why one module
    params.yaml is one document: its sections are validated together (cross-section checks,
    one error format), and every stage reads its own section from the same typed model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from photoprep.core.errors import UserError, describe_validation_error
from photoprep.core.learn_params import (
    ClusterParams,
    EvaluateParams,
    IntrospectParams,
    PredictParams,
    TrainParams,
)
from photoprep.core.section import Section


def _positive_pair(v: tuple[int, int]) -> tuple[int, int]:
    if min(v) < 1:
        raise ValueError(f"both values must be >= 1 (got {list(v)})")
    return v


SCHEDULER_SCHEMES = ("tcp", "tls", "inproc", "ws", "wss")


class ComputeParams(Section):
    n_jobs: int = Field(2, description="worker processes for per-image work; -1 uses every core")
    batch_size: int = Field(256, ge=1, description="images per task (a joblib task or a Dask task)")
    backend: Literal["joblib", "dask"] = "joblib"
    scheduler: str | None = Field(
        None,
        description="with backend dask: 'local' (a LocalCluster of n_jobs processes, 1 thread each; "
        "also null) or a scheduler address tcp://host:port",
    )
    storage: str | None = Field(
        None,
        description="where workers read shards: an fsspec URL prefix (s3://bucket/raw, file:///mnt/raw) "
        "or an absolute path holding <source>/<shard> like data/raw; null: the local data/raw",
    )
    cpu_math: Literal["portable", "vendor", "native"] = Field(
        "portable",
        description="portable: the same bytes on any x86-64 CPU with AVX2, Intel or AMD; vendor: on CPUs of "
        "one vendor (MKL's faster AVX2 branch); native: on this machine only (the libraries choose)",
    )
    threads: int = Field(
        2, ge=1, le=1024, description="CPU threads of torch (part of what makes runs repeatable)"
    )
    memory_mb: int = Field(
        256,
        ge=1,
        description=(
            "heap of the table steps, which read their tables a slice at a time (dedup's, validate, "
            "bucket, split, features' ids); outputs do not depend on it"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "portable" in data:
            raise ValueError(
                "portable: renamed: write compute.cpu_math: portable (was true) | native (was false) | vendor"
            )
        return data

    @field_validator("n_jobs")
    @classmethod
    def _n_jobs_not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be a positive number of workers or -1 for all cores")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        if v is None or v == "local":
            return v
        scheme, sep, rest = v.partition("://")
        host, colon, port = rest.rpartition(":")
        if not sep or scheme not in SCHEDULER_SCHEMES or not colon or not host or not port.isdigit():
            raise ValueError(f"must be 'local' or a scheduler address like tcp://host:8786 (got {v!r})")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "://" not in v:
            if not Path(v).is_absolute():
                raise ValueError(
                    f"must be an fsspec URL (s3://..., file://...) or an absolute path (got {v!r})"
                )
            return v
        import fsspec  # only when a storage URL is set: stages without one never import it

        protocol = v.split("://", 1)[0]
        if protocol not in fsspec.available_protocols():
            raise ValueError(f"unknown fsspec protocol {protocol!r} (got {v!r})")
        return v


class DownloadParams(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    concurrency: int = Field(64, ge=1, le=1024, description="requests in flight in total")
    per_host: int = Field(64, ge=1, le=256, description="connections per host")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(
        15.0, gt=0, description="seconds without a byte; a host that never answers is cut off after this"
    )
    retries: int = Field(4, ge=0, le=20, description="retries after the first try")
    backoff_base: float = Field(0.5, ge=0, description="seconds; doubles each retry, with jitter")
    backoff_max: float = Field(60.0, ge=0)
    max_bytes: int = Field(50_000_000, ge=1, description="largest accepted file")
    max_redirects: int = Field(5, ge=0)
    allow_cross_host_redirects: bool = False
    shard_mb: int = Field(256, ge=1, description="size of a shard of image bytes")
    user_agent: str = "photoprep/0.1 (+https://github.com/photoprep)"
    seed: int = Field(0, description="seed of the retry jitter")
    request_deadline: float = Field(
        120.0, gt=0, le=86_400, description="seconds of wall clock per request, body included: deadline"
    )
    host_down_after: int = Field(
        64,
        ge=0,
        le=1_000_000,
        description="a host whose first answers are this many failures of one kind, and no success, "
        "is cut off (host_unreachable / host_all_<status>); 0 turns the breaker off",
    )
    commit_every: int = Field(
        64, ge=1, le=1_000_000, description="images fetched between commits of shards and status rows"
    )
    commit_seconds: float = Field(5.0, gt=0, le=3600, description="seconds between commits at most")
    partitions: int = Field(
        1,
        ge=1,
        le=9999,
        description="ids split by a hash of the id into this many partitions, each fetched by one task "
        "(compute.backend) into data/raw/<source>/part-NNNN/, the caps divided among them; 1: one download",
    )


class DedupParams(Section):
    hash: Literal["phash", "dhash", "whash", "ahash"] = "phash"
    hash_size: int = Field(8, ge=4, le=32, description="bits per side: the hash has hash_size^2 bits")
    near_threshold: int = Field(4, ge=-1, description="max Hamming distance; -1 turns near-dedup off")
    verify_threshold: int | None = Field(
        None,
        ge=0,
        le=256,
        description="max distance of the 256-bit fine hash for a candidate pair to count; null: off",
    )
    keep: Literal["best", "largest", "first"] = Field(
        "best", description="best: colour, pixels, least lossy, camera original, medoid; largest; first"
    )
    transforms: list[Literal["hflip", "rot90", "rot180", "rot270"]] = Field(
        default_factory=list, description="also match mirrored and rotated copies"
    )
    margin: float = Field(
        0.1, ge=0.0, le=0.2, description="share of each side the hashes leave out (caption bands, frames)"
    )
    crops: list[float] = Field(
        default_factory=lambda: [0.03, 0.06],
        description="also match copies cropped by about this share of each side; []: off",
    )
    contact_groups: int = Field(12, ge=0, description="largest near groups drawn in the contact sheet")

    @field_validator("transforms")
    @classmethod
    def _transforms_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each transform once (got {v})")
        return v

    @field_validator("crops")
    @classmethod
    def _crops_ascending(cls, v: list[float]) -> list[float]:
        if any(not 0 < c <= 0.2 for c in v) or sorted(set(v)) != v:
            raise ValueError(f"shares of each side in (0, 0.2], ascending, each once (got {v})")
        return v

    @model_validator(mode="after")
    def _hash_and_threshold_agree(self) -> DedupParams:
        if self.hash == "whash" and self.hash_size & (self.hash_size - 1):
            raise ValueError(f"hash_size: whash needs a power of 2 (got {self.hash_size})")
        bits = self.hash_size * self.hash_size
        if self.near_threshold > bits // 2:
            raise ValueError(
                f"near_threshold: must be <= {bits // 2}, half the {bits} bits of a {self.hash_size}x"
                f"{self.hash_size} hash: beyond it unrelated images match (got {self.near_threshold})"
            )
        return self


class DecodeParams(Section):
    """The limits of every decode (the dedup stage's probe, which gives the decode's verdict; the
    bucket stage's resize; the contact sheets), checked from headers before any pixel is decoded."""

    max_pixels: int = Field(
        50_000_000, ge=1, description="more pixels than this (any frame or embedded image) is too_many_pixels"
    )
    max_decode_mb: int = Field(
        256, ge=1, le=1_000_000, description="estimated peak MB of one decode; more is over_budget"
    )


class ValidateParams(Section):
    min_side: int = Field(32, ge=1, description="shorter side below this is too_small")

    @model_validator(mode="before")
    @classmethod
    def _limits_moved(cls, v: Any) -> Any:
        moved = [key for key in ("max_pixels", "max_decode_mb") if isinstance(v, dict) and key in v]
        if moved:
            raise ValueError(f"{moved[0]}: moved to decode.{moved[0]} (the limits of every decode)")
        return v


class BucketRange(Section):
    width: tuple[int, int] = (0, 1_000_000)
    height: tuple[int, int] = (0, 1_000_000)


class BucketKeep(Section):
    top_k: int | None = Field(None, ge=1, description="keep the k most populated buckets")
    ranges: list[BucketRange] | None = Field(None, description="keep buckets inside these ranges")


class BucketParams(Section):
    tolerance_px: int = Field(10, ge=0)
    keep: Literal["all"] | BucketKeep = "all"
    min_count: int = Field(1, ge=1)
    size: tuple[int, int] = Field((64, 64), description="[H, W] of every output image")
    fit: Literal["stretch", "pad", "crop"] = "stretch"
    samples_per_bucket: int = Field(16, ge=0, description="images per bucket in the contact sheet")
    chunk_kb: int = Field(
        2048, ge=1, description="about this many KiB of pixels per chunk file of data/processed/images"
    )

    @field_validator("size")
    @classmethod
    def _size_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError(f"both sides must be >= 8 (got {list(v)})")
        return v


class HogParams(Section):
    orientations: int = Field(9, ge=2)
    pixels_per_cell: tuple[int, int] = (8, 8)
    cells_per_block: tuple[int, int] = (3, 3)
    block_norm: Literal["L1", "L1-sqrt", "L2", "L2-Hys"] = "L2-Hys"
    impl: Literal["numpy", "skimage", "opencv"] = "numpy"

    _pairs = field_validator("pixels_per_cell", "cells_per_block")(_positive_pair)


class FeatureParams(Section):
    hog: HogParams = HogParams()
    color_size: tuple[int, int] = Field((6, 10), description="[H, W] of the Cr/Cb colour map")
    scaling: Literal["original", "standard", "none"] = Field(
        "original", description="original: (H - 0.2) * 10 and (CrCb - 128) / 10"
    )

    _color_size = field_validator("color_size")(_positive_pair)


class SplitParams(Section):
    seed: int = 42
    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    classes: list[str] | dict[str, str | None] | int | None = Field(
        None, description="list: keep these; mapping: rename/merge (to null drops); int: first N classes"
    )
    positive: str | None = Field(None, description="one-vs-rest: this class against all others")
    max_per_class: int | None = Field(None, ge=1)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"keys must be train, val, test (got {sorted(unknown)})")
        if any(not math.isfinite(r) or r < 0 for r in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"must be >= 0 and sum to 1 (got {v})")
        return v


class Params(Section):
    sources: list[str] = Field(default_factory=lambda: ["demo"])
    compute: ComputeParams = ComputeParams()
    download: DownloadParams = DownloadParams()
    decode: DecodeParams = DecodeParams()
    dedup: DedupParams = DedupParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    bucket: BucketParams = BucketParams()
    features: FeatureParams = FeatureParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    introspect: IntrospectParams = IntrospectParams()
    cluster: ClusterParams = ClusterParams()
    predict: PredictParams = PredictParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _sources_unique(self) -> Params:
        if not self.sources:
            raise ValueError("sources: list at least one source")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: each source once (got {self.sources})")
        return self

    @property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        return self.validate_


def parse(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    """Validate a params mapping; raise UserError naming the first bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"{origin}: {describe_validation_error(first)}") from None


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{path}: must be a mapping of sections")
    return parse(raw or {}, str(path))
