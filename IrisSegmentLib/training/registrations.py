"""Real registration priors for training (issue 17): for some pairs of training cases of one collection, the
engine's own registration (`inference/localise.py`: Greedy, the same recipe and checks) of one case onto the
other, made once by `iris-segment pack --registrations N` and kept beside the packed cases. The sampler gives
some episodes whose query is such a case that prior instead of a simulated one (`TrainingConfig.real_prior_prob`):
the network then also sees the errors real registrations make.

Each registration is kept on its coarse registration grid (blurred as the engine blurs it, uint8), with the box and
block factor that place it on the query's packed grid."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import LocaliseConfig
from ..inference.geometry import WorkingGrid
from ..inference.localise import blur, localise, make_atlas, to_working
from ..inference.prepare import Prepared
from .data import Case, load

FOLDER = "registrations"
INDEX = "registrations.json"
COLLECTIONS = ("btcv", "acdc", "la2018", "hippocampus")  # collections with images; label-only ones are rendered


@dataclass
class Registration:
    """Another case's structures registered onto one case: `prior` (V, x, y, z) uint8 on the registration grid of
    `box` (slices of the case's packed grid) and block `factor`, one channel per label value in `values`."""

    reference: str
    values: list[int]
    prior: np.ndarray
    box: tuple[slice, ...]
    factor: int

    def on_case(self, values: list[int], shape) -> torch.Tensor:
        """The union (max) of the priors of `values` on the case's whole packed grid (X, Y, Z) in [0, 1]; zero where
        none of them was registered."""
        rows = [self.values.index(v) for v in values if v in self.values]
        if not rows:
            return torch.zeros(shape)
        coarse = self.prior[rows].max(0, keepdims=True).astype(np.float32) / 255.0
        return to_working(coarse, self.box, self.factor, shape)[0]


def _prepared(case: Case, spacing: float) -> Prepared:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return Prepared(torch.from_numpy(case.image.astype(np.float32))[None], WorkingGrid.create(case.label.shape, affine, (spacing,) * 3),
                    False, "mr")


def register_pair(query: Case, ref: Case, cfg: LocaliseConfig, spacing: float) -> Registration | None:
    """The engine's registration of `ref` (all its structures that `query` has too) onto `query`; None where it fails
    the engine's checks or the two share no structure."""
    present = set(ref.values[np.unique(ref.label)].tolist()) & set(query.values[np.unique(query.label)].tolist())
    values = sorted(int(v) for v in present if v != 0)
    if not values:
        return None
    lab = torch.from_numpy(ref.label.astype(np.int64))
    masks = torch.stack([(lab == int(np.searchsorted(ref.values, v))) for v in values]).float()
    atlas = make_atlas(_prepared(ref, spacing), masks, values, cfg, spacing)
    loc = localise(_prepared(query, spacing), [atlas], values, cfg, spacing, threads=1)
    if loc.prior is None:
        return None
    coarse = blur(loc.warped, cfg.prior_sigma_mm / (spacing * loc.factor))
    return Registration(ref.case_id, values, np.rint(np.clip(coarse, 0, 1) * 255).astype(np.uint8), loc.box, loc.factor)


def save(reg: Registration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # ends in .npz like `path`, so numpy adds no suffix
        np.savez_compressed(tmp, prior=reg.prior, values=np.asarray(reg.values, np.int32),
                            box=np.asarray([[b.start, b.stop] for b in reg.box], np.int32), factor=np.int32(reg.factor),
                            reference=np.asarray(reg.reference))


def read(path: Path) -> Registration:
    z = np.load(path)
    return Registration(str(z["reference"]), [int(v) for v in z["values"]], z["prior"],
                        tuple(slice(int(a), int(b)) for a, b in z["box"]), int(z["factor"]))


def pack_registrations(packed: str | Path, per_collection: int, cfg: LocaliseConfig = LocaliseConfig(), spacing: float = 1.5,
                       seed: int = 0) -> dict[str, int]:
    """Registers `per_collection` random (query, reference) pairs of training cases of different subjects in each
    collection with images, into packed/registrations/ (pairs already there are kept); returns the pairs per
    collection that passed the checks. The index lists every registration by query case."""
    packed = Path(packed)
    rng = np.random.default_rng(seed)
    cases = load(packed, "train")
    index: dict[str, list[str]] = json.loads((packed / INDEX).read_text()) if (packed / INDEX).is_file() else {}
    done: dict[str, int] = {}
    for name in COLLECTIONS:
        pool = [c for c in cases if c.dataset == name and c.image is not None]
        if len({c.group for c in pool}) < 2:
            continue
        pairs = []
        while len(pairs) < per_collection and len(pairs) < len(pool) * (len(pool) - 1):
            q, r = (pool[i] for i in rng.choice(len(pool), 2, replace=False))
            if q.group != r.group and (q, r) not in pairs:
                pairs.append((q, r))
        done[name] = 0
        for q, r in tqdm(pairs, desc=f"register {name}"):
            rel = f"{FOLDER}/{name}/{q.case_id}__{r.case_id}.npz"
            if not (packed / rel).is_file():
                reg = register_pair(q, r, cfg, spacing)
                if reg is None:
                    continue
                save(reg, packed / rel)
            index.setdefault(f"{name}/{q.case_id}", [])
            if rel not in index[f"{name}/{q.case_id}"]:
                index[f"{name}/{q.case_id}"].append(rel)
            done[name] += 1
    (packed / INDEX).write_text(json.dumps(index, indent=1))
    return done


def load_registrations(packed: str | Path) -> dict[str, list[Registration]]:
    """Every packed registration by query ("collection/case id"); empty where none were packed."""
    packed = Path(packed)
    if not (packed / INDEX).is_file():
        return {}
    return {key: [read(packed / rel) for rel in rels] for key, rels in json.loads((packed / INDEX).read_text()).items()}


def coverage(registrations: dict[str, list[Registration]]) -> str:
    """One line: registrations and registered query cases per collection."""
    per: dict[str, list[int]] = {}
    for key, regs in registrations.items():
        per.setdefault(key.split("/")[0], []).append(len(regs))
    return ", ".join(f"{k} {sum(v)} on {len(v)} cases" for k, v in sorted(per.items())) or "none"

