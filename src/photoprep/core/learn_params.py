"""The learn room's sections of ``params.yaml``: train, evaluate, introspect, predict, cluster.

Part of the one typed document :mod:`photoprep.core.params` loads (``Params`` holds these beside
the data stages' sections); apart only to keep each module short.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from photoprep.core.section import Section

__all__ = [
    "SMALL_MODELS",
    "WEIGHT_SUFFIXES",
    "ClusterParams",
    "EvaluateParams",
    "IntrospectParams",
    "PredictParams",
    "TrainParams",
]


SMALL_MODELS = ("smallcnn", "convnet", "mlp")
# Hand-written networks of earlier versions, now taken from timm: what to write instead.
_FROM_TIMM = {"alexnet": "timm/resnet18", "googlenet": "timm/inception_v3", "resnet": "timm/resnet18"}
_TIMM_NAME = re.compile(r"^timm/[a-z0-9_]+(\.[a-z0-9_]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class TrainParams(Section):
    model: str = Field(
        "convnet",
        description="smallcnn | convnet (small networks for 32-64 px) | mlp (on the HOG + Cr/Cb features) | "
        "timm/<architecture>: any timm model, e.g. timm/resnet18, timm/mobilenetv3_small_100",
    )
    pretrained: str | None = Field(
        None,
        description="weights to start a timm model from, fetched by the pretrained stage: null (from "
        "scratch) | imagenet (the architecture's default pretrained tag) | another tag (a1_in1k) | a hub id "
        "(hf-hub:timm/resnet18.a1_in1k) | a local .safetensors or .pth file under pipeline/pretrained/",
    )
    input: Literal["images", "features"] | None = Field(
        None,
        description="what the model reads: images (pixels) or features (HOG + Cr/Cb); "
        "null: features for the mlp, images for the others; only the mlp can read either",
    )
    width: int | None = Field(
        None,
        ge=4,
        le=1024,
        description="base channels (smallcnn, convnet) or hidden units (mlp); null: the model's default",
    )
    depth: int | None = Field(
        None, ge=1, le=12, description="conv blocks (convnet), hidden layers (mlp); null: default"
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="before the classifier")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of timm models that have it")
    activation: Literal["relu", "sigmoid"] = Field("relu", description="convnet and mlp only")
    init_from: str | None = Field(
        None, description="a local photoprep checkpoint (a model.pt or a state dict) to start from"
    )
    freeze: int = Field(
        0,
        ge=0,
        description="freeze the first N blocks (small models) or stages (timm: stem, stages, ...) for the "
        "whole run; needs init_from or pretrained",
    )
    head_epochs: int = Field(
        0,
        ge=0,
        description="train the classifier alone for this many epochs (the rest frozen, batch norm "
        "statistics kept), then every layer",
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=10, description="the learning rate of every layer but the classifier, as a share of lr"
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay (timm's): each layer group from the classifier "
        "down gets this share of the next one's rate; null: off",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float | None = Field(
        None,
        gt=0,
        le=10,
        description="peak learning rate; null: the model's (smallcnn and convnet 0.01, mlp and timm "
        "models 0.001, timm models from pretrained weights 0.0003)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(True, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0, description="not applied to biases and batch norm")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, le=10, description="mixup's alpha (timm's Mixup); 0: off")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix's alpha (timm's Mixup); 0: off")
    schedule: Literal["none", "step", "cosine", "onecycle"] = Field(
        "onecycle",
        description="timm's schedulers, per step: step (x gamma every step_size epochs), cosine (to 0), "
        "onecycle (warm-up from lr/25 over 30 % of the steps, then cosine to lr/25e4)",
    )
    step_size: int = Field(10, ge=1, description="epochs between decays (schedule: step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (schedule: step)")
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=2, le=65_536)
    augment: list[Literal["flip", "crop", "translate", "colour"]] = Field(
        default=["translate", "colour"],
        description="flip: mirror left-right (not for digits or text); crop: zero-padded random crop; "
        "translate: random shift with edge pixels repeated; colour: shuffle RGB channels and invert",
    )
    image_size: tuple[int, int] | Literal["auto"] | None = Field(
        (32, 32),
        description="[H, W] the model sees (resized on the device); null keeps bucket.size; auto: the "
        "pretrained backbone's input size (224 for most ImageNet weights), else bucket.size",
    )
    normalize: Literal["auto", "dataset", "image", "pretrained"] = Field(
        "auto",
        description="dataset: the train split's mean and std per channel; image: each image's own; "
        "pretrained: the backbone's (from its pretrained config); auto: pretrained with train.pretrained, "
        "else image",
    )
    shift_px: int = Field(6, ge=0, le=64, description="largest shift of crop and translate, in stored pixels")
    early_stopping: int = Field(
        5, ge=0, description="stop after this many epochs without a better val score; 0: off"
    )
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_accuracy", description="picks the best model and drives early stopping (ties: lower val loss)"
    )
    resume: bool = Field(
        False, description="continue from the last checkpoint when it matches params and data"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    amp: Literal["bf16", "fp16", "off"] = Field(
        "bf16", description="mixed precision on CUDA (never on the CPU)"
    )
    channels_last: bool = Field(True, description="NHWC memory format for image models")
    deterministic: bool = Field(False, description="deterministic algorithms on CUDA (CPU runs always are)")
    seed: int = 0
    nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "training processes on this machine (DistributedDataParallel; gloo on the CPU, NCCL on CUDA); "
            "1: one process. Effective batch = nproc x batch_size; lr is not scaled"
        ),
    )

    @property
    def is_timm(self) -> bool:
        return self.model.startswith("timm/")

    def recorded(self) -> dict[str, Any]:
        """The params as a model file and a checkpoint's key record them: ``nproc`` only when it is
        not 1 and ``input`` only when it is set."""
        settings = self.model_dump(mode="json")
        if settings["nproc"] == 1:
            del settings["nproc"]
        if settings.get("input") is None:
            settings.pop("input", None)
        return settings

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v in SMALL_MODELS or _TIMM_NAME.match(v):
            return v
        if v in _FROM_TIMM:
            raise ValueError(f"{v} is taken from timm now: write {_FROM_TIMM[v]} (or another timm/<name>)")
        raise ValueError(f"one of {', '.join(SMALL_MODELS)} or timm/<architecture> (got {v!r})")

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("null, a tag, a hub id or a file (got an empty string)")
        return v

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: tuple[int, int] | str | None) -> tuple[int, int] | str | None:
        if isinstance(v, tuple) and not (min(v) >= 16 and max(v) <= 512):
            raise ValueError(f"both sides must be between 16 and 512 (got {list(v)})")
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: list[str]) -> list[str]:
        if "crop" in v and "translate" in v:
            raise ValueError("crop and translate both shift the image: choose one")
        if len(set(v)) != len(v):
            raise ValueError(f"each augmentation once (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.input == "features" and self.model != "mlp":
            raise ValueError(f"input: features needs train.model: mlp (got {self.model})")
        if self.pretrained is not None and not self.is_timm:
            raise ValueError(
                f"pretrained: {self.model} has no pretrained weights (a timm/<architecture> has); "
                "start it from a photoprep checkpoint with train.init_from"
            )
        if self.pretrained is not None and self.init_from is not None:
            raise ValueError(
                "pretrained: train.pretrained and train.init_from both give starting weights: choose one"
            )
        if self.freeze and not (self.init_from or self.pretrained):
            raise ValueError(
                f"freeze: freezing layers needs starting weights (train.init_from or train.pretrained; "
                f"got freeze {self.freeze})"
            )
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ValueError(f"batch_size: mixup and cutmix need an even batch (got {self.batch_size})")
        if self.head_epochs >= self.epochs and self.head_epochs:
            raise ValueError(
                f"head_epochs: {self.head_epochs} of {self.epochs} epochs would never train the backbone"
            )
        return self


class EvaluateParams(Section):
    batch_size: int = Field(256, ge=1, le=65_536)
    device: Literal["auto", "cuda", "cpu"] = Field(
        "cpu", description="cpu makes metrics bit-reproducible (verify compares with tolerance 0)"
    )
    samples: int = Field(40, ge=0, le=1000, description="test images in reports/predictions.png")
    misclassified: int = Field(40, ge=0, le=1000, description="most images in reports/misclassified.png")
    top_k: int = Field(5, ge=2, le=100, description="top-k accuracy, reported when there are >= 2k classes")


class IntrospectParams(Section):
    perplexity: float = Field(
        30.0, gt=1, le=100, description="t-SNE perplexity (lowered to what a small test split allows)"
    )
    seed: int = Field(0, description="t-SNE's random state (with init pca: the same map every run)")
    thumbnails: int = Field(
        40, ge=0, le=500, description="test images drawn as thumbnails on reports/tsne.png"
    )
    per_class: int = Field(
        4, ge=0, le=50, description="test images per true class in reports/top5.png and reports/top5.csv"
    )
    top_k: int = Field(5, ge=1, le=20, description="predictions (with probabilities) per image shown")
    filters: int = Field(
        64, ge=1, le=1024, description="most filters of the first layer in reports/filters.png"
    )
    batch_size: int = Field(256, ge=1, le=65_536)


class PredictParams(Section):
    splits: list[Literal["unlabeled", "train", "val", "test"]] = Field(
        default=["unlabeled", "test"],
        description=(
            "splits the model labels; a labelled one (test) shows how right its confident predictions are"
        ),
    )
    top_k: int = Field(3, ge=1, le=100, description="classes kept per image, most probable first")
    min_confidence: float = Field(
        0.9, ge=0, le=1, description="the threshold metrics/predict.json reports coverage and accuracy at"
    )
    batch_size: int = Field(256, ge=1, le=65_536)
    device: Literal["auto", "cuda", "cpu"] = Field(
        "cpu", description="cpu makes predictions bit-reproducible"
    )
    per_class: int = Field(
        10, ge=0, le=100, description="most confident images per class in reports/predicted.png"
    )

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"name one or more splits, each once (got {v})")
        return v


class ClusterParams(Section):
    input: Literal["features", "embeddings"] = Field(
        "features",
        description="what is clustered: features (HOG + Cr/Cb, cluster.blocks) or embeddings (a CNN's pooled "
        "features, written by the embed stage); metrics/cluster.json then compares them with k-means on "
        "the features",
    )
    embeddings: Literal["model", "pretrained"] = Field(
        "model",
        description="whose pooled features the embed stage writes: model (the trained classifier's) or "
        "pretrained (the backbone as fetched by the pretrained stage, not fine-tuned)",
    )
    n_clusters: int = Field(10, ge=2, le=10_000, description="clusters of DEC and of both k-means baselines")
    blocks: list[Literal["hog", "color"]] = Field(
        default=["hog", "color"],
        description="feature blocks clustered (data/features/features.json says where each lies)",
    )
    center: bool = Field(True, description="subtract each column's mean before the paper's scaling")
    dims: list[int] = Field(
        default_factory=lambda: [500, 500, 2000, 10],
        description="encoder widths after the input; the last is the embedding (the decoder mirrors them)",
    )
    pretrain: Literal["end_to_end", "layerwise"] = Field(
        "end_to_end",
        description="layerwise: each layer pair as a denoising autoencoder first, then end to end",
    )
    pretrain_epochs: int = Field(100, ge=0, le=100_000, description="end-to-end epochs of the autoencoder")
    layer_epochs: int = Field(10, ge=1, le=100_000, description="epochs per layer pair (pretrain: layerwise)")
    dropout: float = Field(
        0.2, ge=0, lt=1, description="input dropout while pretraining: a denoising autoencoder"
    )
    pretrain_lr: float = Field(3e-4, gt=0, le=10, description="Adam(W) learning rate of the pretraining")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay of the pretraining")
    batch_size: int = Field(256, ge=2, le=65_536)
    alpha: float = Field(1.0, gt=0, le=1000, description="degrees of freedom of the Student's t kernel")
    lr: float = Field(0.01, gt=0, le=10, description="SGD learning rate of the KL refinement")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the KL refinement")
    update_interval: int | None = Field(
        None,
        ge=1,
        description="refinement batches between target updates; null: one pass over the data, "
        "at least 20 batches",
    )
    tol: float = Field(0.001, ge=0, le=1, description="stop when fewer than this share of assignments change")
    max_iter: int = Field(2000, ge=0, le=10_000_000, description="most refinement batches")
    kmeans_n_init: int = Field(
        10, ge=10, le=1000, description="k-means restarts (both baselines and DEC's start)"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads of torch; null: its default (CPU runs match bit for bit at the same count)",
    )
    seed: int = 0
    sheet_images: int = Field(8, ge=1, le=100, description="images nearest to and farthest from each centre")

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if not v or len(v) > 8 or min(v) < 1:
            raise ValueError(f"1 to 8 layer widths, each >= 1 (got {v})")
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"name hog and/or color, each once (got {v})")
        return v
