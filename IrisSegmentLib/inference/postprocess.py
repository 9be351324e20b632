"""Stage 5, post-process a label map, on arrays (the command line, the batch runner and Slicer share it):
each structure's largest connected component where the reference structure is one piece, and holes filled
(scipy.ndimage)."""
from __future__ import annotations

import numpy as np


CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy.ndimage import label

    return label(mask, structure=CONNECTIVITY_26)


def pieces(mask: np.ndarray, min_fraction: float = 0.05) -> int:
    """Connected parts (26-connected) of a binary mask holding at least `min_fraction` of its voxels."""
    comps, n = _components(np.asarray(mask, bool))
    if n == 0:
        return 0
    sizes = np.bincount(comps.ravel())[1:]
    return int((sizes >= min_fraction * sizes.sum()).sum())


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    axes = [np.flatnonzero(mask.any(tuple(j for j in range(3) if j != i))) for i in range(3)]
    if any(len(a) == 0 for a in axes):
        return None
    return tuple(slice(int(a[0]), int(a[-1]) + 1) for a in axes)


def postprocess(label_map: np.ndarray, labels: list[int], one_piece: list[bool], fill_holes: bool = True) -> np.ndarray:
    """In place, per label (in its bounding box): keep the largest 26-connected component where `one_piece`,
    then fill enclosed holes (only voxels that no other label holds). Returns `label_map`."""
    from scipy.ndimage import binary_fill_holes

    for v, single in zip(labels, one_piece):
        box = _box(label_map == v)
        if box is None:
            continue
        sub = label_map[box]
        mask = sub == v
        if single:
            comps, n = _components(mask)
            keep = comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:])) if n > 1 else mask
            sub[mask & ~keep] = 0
            mask = keep
        if fill_holes:
            sub[binary_fill_holes(mask) & (sub == 0)] = v
    return label_map
