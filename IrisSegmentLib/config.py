"""Configuration: one dataclass per concern, saved as YAML beside the weights (PyYAML)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .atomic import write_atomic


# ModelConfig ablation switches: the allowed values, the design's first (issue 11).
ABLATION_CHOICES: dict[str, tuple[str, ...]] = {
    "task_attention": ("self-cross-self", "joint"),
    "foreground_pooling": ("adjoint", "upsample-then-pool", "downsample", "none"),
    "context_tokens": ("pixel-shuffle", "pool"),
    "decoder_attention": ("two-way", "one-way"),
    "class_interaction": ("joint", "independent"),
}

# ModelConfig fields added after weights were shipped (the ablation switches of issue 11, the prior input of issue 17),
# with the value that means "the network of before": a field at that value is left out of the fingerprint.
ADDED_LATER: dict[str, object] = {**{name: choices[0] for name, choices in ABLATION_CHOICES.items()}, "prior_channels": 0}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one IRIS network; every size the network has comes from here."""

    name: str = "iris-small"
    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64, 128, 128)  # encoder stages; len-1 downsamplings
    blocks_per_stage: int = 1  # residual blocks after each (down)sampling
    num_queries: int = 10  # m learnable context queries per class
    heads: int = 4
    mlp_ratio: int = 4
    task_attention_depth: int = 2  # task-encoding blocks [self, cross, self]
    bottleneck_fusion_depth: int = 2  # two-way blocks at the coarsest scale
    second_fusion: bool = True  # one more image<-token fusion at the next finer scale
    shuffle_channels: int = 1  # channels of the pixel-shuffled full-resolution map
    head_channels: int = 32  # width of the final per-voxel embedding
    window: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # working spacing, mm
    # Ablation switches (issue 11, benchmarks/ablations.py); the first choice is the design, and a
    # switch at its default is left out of the fingerprint, so existing weights keep theirs.
    task_attention: str = "self-cross-self"  # or "joint": seed-style self-attention over [tokens; features]
    foreground_pooling: str = "adjoint"  # or "upsample-then-pool" (same numbers, full-res cost), "downsample", "none"
    context_tokens: str = "pixel-shuffle"  # or "pool": mask area-pooled to the coarse grid, 1x1x1 merge
    decoder_attention: str = "two-way"  # or "one-way": image <- tokens only; tokens not updated by the query
    class_interaction: str = "joint"  # or "independent": one decoder pass per class, no attention between classes
    # Prior input (issue 17): width of the per-class fusion of [appearance, mask logit, localisation prior]
    # after the mask head; 0 = no prior input (the network of before; left out of the fingerprint at 0).
    prior_channels: int = 0

    @property
    def token_dim(self) -> int:
        return self.widths[-1]

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def validate(self) -> None:
        f = self.downsampling
        if any(w % f for w in self.window):
            raise ValueError(f"window {self.window} must be divisible by {f} (2**downsamplings)")
        if self.prior_channels < 0:
            raise ValueError(f"prior_channels must be >= 0, not {self.prior_channels}")
        if self.token_dim % self.heads:
            raise ValueError(f"token width {self.token_dim} must be divisible by heads {self.heads}")
        for name, choices in ABLATION_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")

    def fingerprint(self) -> str:
        """Short stable hash of the architecture, stored in weights and task embeddings; a field added later
        (`ADDED_LATER`) counts only when it differs from the value of before, so a network keeps the hash it had
        before the field existed."""
        arch = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "window")
                and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class InferenceConfig:
    """How the engine prepares images and tiles the target."""

    overlap: float = 0.5
    gaussian_sigma_scale: float = 0.125  # sigma = window * scale
    batch_size: int = 2  # windows per forward pass
    ct_clip: tuple[float, float] = (-125.0, 275.0)  # HU; the soft-tissue window of the CT we train on
    mr_clip_percentiles: tuple[float, float] = (0.5, 99.5)
    threshold: float = 0.5
    max_reference_crops: int = 8  # crops averaged when a structure exceeds one window
    strategy: str = "coarse-to-fine"  # or "full": every overlapping window everywhere
    coarse_threshold: float = 0.1  # coarse probability that marks a region for the overlapping windows
    coarse_margin: int = 8  # working voxels around that region also refined
    cpu_precision: str = "auto"  # "bf16", "fp32", or "auto": bf16 where the CPU computes it natively
    polarity: str = "auto"  # MR: "auto" inverts reference and target alike where that lets the network segment the
    # reference (self-Dice) and as is it cannot (encoding.choose_polarity); "keep": never

    def validate(self) -> None:
        if self.polarity not in ("auto", "keep"):
            raise ValueError(f"inference polarity must be auto or keep, not {self.polarity!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """Episodic training recipe."""

    seed: int = 0
    batch_size: int = 2
    max_classes: int = 4  # K class slots per episode (padded slots masked out)
    crop: tuple[int, int, int] = (48, 48, 48)
    lr: float = 1e-3  # AdamW; the paper used Lamb at 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 200
    decay_per_1k: float = 0.7  # exponential decay factor per 1000 steps after warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # weight EMA
    bank_momentum: float = 0.99  # memory-bank EMA of class embeddings
    empty_query_prob: float = 0.15  # query crops that miss the structure
    dataset_weights: dict[str, float] = field(default_factory=dict)
    # label values per collection set to background in every training label map: structures kept
    # unseen for the generalisation benchmark (a collection left out whole: dataset_weights 0)
    holdout: dict[str, list[int]] = field(default_factory=dict)
    merge_prob: float = 0.2  # an episode's class is the union of 2-3 labels ("a class is what the reference says")
    lut_prob: float = 0.25  # one random piecewise-linear intensity curve applied to both images of an episode
    thick_slice_prob: float = 0.15  # the query crop gets thick slices along a random axis (2-5x)
    # Episodes that look like inference (issue 17): query crops centred where the engine runs windows, with a
    # simulated registration prior (training/priors.py); voxels are working voxels (1.5 mm).
    query_margin: int = 10  # query crops centred within this of the structure's box (the engine's 15 mm margin)
    prior_sigma: float = 2.0  # blur of the simulated prior (the engine's localise.prior_sigma_mm, 3 mm)
    prior_dropout: float = 0.25  # batches trained without their priors: segmenting from the task alone stays learnt
    whole_volume_prob: float = 0.1  # episodes showing both whole cases shrunk to the crop: global context
    prior_errors: tuple[str, ...] = ("affine", "elastic", "morph", "missing", "spurious")  # simulated (priors.py)
    real_prior_prob: float = 0.3  # episodes whose query has packed registrations take a real one (registrations.py)


LOCALISE_MODES = ("auto", "registration", "none")


@dataclass(frozen=True)
class LocaliseConfig:
    """Localisation: register the reference onto the target, carry its masks across as a per-class prior,
    and run windows only where that prior can be (docs/DESIGN.md section 2.10)."""

    mode: str = "auto"  # "registration", or "none": the whole field of view, no prior
    max_voxels: int = 1_000_000  # registration grid: the working grid block-averaged until at most this many voxels
    metric: str = "auto"  # "ncc" (one modality), "nmi" (two modalities), "auto": by the detected modalities
    ncc_radius: int = 4  # NCC patch radius of the rigid and affine stages, registration voxels
    deformable_ncc_radius: int = 2  # of the deformable stage: a smaller patch follows small structures (DESIGN 2.10)
    rigid_iterations: str = "100x50x0"  # per pyramid level, coarsest first (Greedy -n)
    affine_iterations: str = "100x50x0"
    deformable_iterations: str = "100x50x20"  # "" leaves the deformable stage out
    deformable_smoothing: str = "2.0vox 0.5vox"  # Greedy -s: gradient and warp smoothing
    body_margin_mm: float = 20.0  # kept around the body (non-background) box of each image
    margin_mm: float = 15.0  # windows run where some class's prior, dilated by this, is
    prior_sigma_mm: float = 3.0  # Gaussian blur of the warped masks: registration's uncertainty
    prior_weight: float = 0.5  # p = w * prior + (1 - w) * network inside the dilated prior; 0 outside
    merge_sigma_depth: float = 1.0  # in that mix, the warped masks blurred by this x each one's mean depth; 0: prior_sigma_mm
    merge_sigma_max_mm: float = 6.0  # at most this (and at least one working voxel)
    min_self_dice: float = 0.5  # a class whose reference crop the network segments worse gets the warped masks (refined)
    appearance_iterations: int = 3  # EM rounds refining those warped masks by the target's intensities; 0: off
    appearance_bins: int = 32  # intensity histogram bins of that EM (appearance.py)
    appearance_sigma_mm: float = 1.5  # Gaussian blur of the warped masks as that EM's prior
    min_similarity: float = 0.2  # after registration: image similarity below this is a failed registration
    min_inside: float = 0.5  # a prior with less of the reference structures' volume inside the target failed
    max_scale: float = 5.0  # an affine changing volumes by more than this factor (or mirroring) failed
    search_fov_ratio: float = 0.25  # fields of view this unequal (smaller / larger volume): start from a translation search
    min_inside_whole: float = 0.9  # from that search, also passes when one structure has this much of it inside
    timeout_s: float = 600.0  # a registration taking longer is a failed registration

    def validate(self) -> None:
        if self.mode not in LOCALISE_MODES:
            raise ValueError(f"localise mode must be one of {LOCALISE_MODES}, not {self.mode!r}")
        if self.metric not in ("auto", "ncc", "nmi"):
            raise ValueError(f"localise metric must be auto, ncc or nmi, not {self.metric!r}")
        if self.ncc_radius < 1 or self.deformable_ncc_radius < 1:
            raise ValueError(f"localise ncc_radius and deformable_ncc_radius must be >= 1, not {self.ncc_radius}, "
                             f"{self.deformable_ncc_radius}")
        if not 0.0 <= self.prior_weight <= 1.0:
            raise ValueError(f"localise prior_weight must be in [0, 1], not {self.prior_weight}")
        if self.merge_sigma_depth < 0 or self.merge_sigma_max_mm <= 0:
            raise ValueError(f"localise merge_sigma_depth must be >= 0 and merge_sigma_max_mm > 0, not "
                             f"{self.merge_sigma_depth}, {self.merge_sigma_max_mm}")
        if not (0.0 <= self.search_fov_ratio <= 1.0 and 0.0 < self.min_inside_whole <= 1.0):
            raise ValueError(f"localise search_fov_ratio must be in [0, 1] and min_inside_whole in (0, 1], not "
                             f"{self.search_fov_ratio}, {self.min_inside_whole}")
        if self.appearance_iterations < 0 or self.appearance_bins < 2 or self.appearance_sigma_mm < 0:
            raise ValueError("localise appearance_iterations must be >= 0, appearance_bins >= 2 and appearance_sigma_mm "
                             f">= 0, not {self.appearance_iterations}, {self.appearance_bins}, {self.appearance_sigma_mm}")


def _tuple_fields(cls, data: dict) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} section must be a mapping, not {type(data).__name__}")
    out = {}
    names = {f.name: f for f in fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise ValueError(f"unknown {cls.__name__} key {k!r}")
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


@dataclass(frozen=True)
class BundleConfig:
    """Everything saved beside a set of weights."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    training: TrainingConfig = TrainingConfig()
    localise: LocaliseConfig = LocaliseConfig()

    def to_dict(self) -> dict:
        def plain(obj):
            d = dataclasses.asdict(obj)
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        return {"model": plain(self.model), "inference": plain(self.inference), "training": plain(self.training),
                "localise": plain(self.localise)}

    @classmethod
    def from_dict(cls, data: dict) -> "BundleConfig":
        unknown = sorted(set(data) - {"model", "inference", "training", "localise"})
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected model, inference, training and localise")
        model = ModelConfig(**_tuple_fields(ModelConfig, data.get("model", {})))
        model.validate()
        localise = LocaliseConfig(**_tuple_fields(LocaliseConfig, data.get("localise", {})))
        localise.validate()
        inference = InferenceConfig(**_tuple_fields(InferenceConfig, data.get("inference", {})))
        inference.validate()
        return cls(
            model=model,
            inference=inference,
            training=TrainingConfig(**_tuple_fields(TrainingConfig, data.get("training", {}))),
            localise=localise,
        )

    def save(self, path: str | Path) -> None:
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "BundleConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a YAML mapping")
        return cls.from_dict(data)
