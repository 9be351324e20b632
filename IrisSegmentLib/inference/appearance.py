"""Stage 5a, appearance: the carried masks refined by the target's own intensities (atlas-guided EM).

Registration puts each structure roughly in place; its boundary is where the target's intensities change. With the
warped masks (slightly blurred: the registration's uncertainty) as the prior of each class and of the background
(1 - their sum), the intensity histogram of every class is estimated on the target itself, weighted by its posterior,
and the posterior is recomputed from prior x likelihood; a few rounds of this EM (Van Leemput et al., IEEE TMI 1999,
with histograms in place of Gaussians) move the boundaries onto the target's edges. The histograms come from the
target alone, so any contrast works, shared or not with the reference, monotonic or not; where a structure looks like
its surroundings the likelihoods are alike and the prior decides. Runs inside the localisation region only."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

EPS = 1e-3  # added to every histogram bin: an intensity a class never showed is unlikely, not impossible
SAMPLE_STRIDE = 2  # the histograms are estimated on every 2nd voxel along each axis (an eighth of the region)


def refine(work: torch.Tensor, masks: torch.Tensor, region: torch.Tensor, iterations: int, bins: int,
           sigma_vox: float, classes: list[int] | None = None) -> torch.Tensor:
    """Posterior probabilities (len(classes), X, Y, Z) of the classes (indices into `masks`, default all) on the
    working grid, 0 outside `region`. `work` (X, Y, Z): the target's working image; `masks` (K, X, Y, Z): the warped
    reference masks, mutually exclusive; `region` (X, Y, Z) bool: where the structures can be; `sigma_vox`: the
    masks' blur in working voxels; `iterations`: EM rounds (0: the blurred masks, normalised with the background)."""
    classes = list(range(masks.shape[0])) if classes is None else classes
    out = torch.zeros((len(classes), *masks.shape[1:]))
    found = torch.nonzero(region)
    if not len(found):
        return out
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(found.min(0).values, found.max(0).values))
    inside = region[box].numpy()
    values = work[box].numpy()[inside]
    lo, hi = np.percentile(values, [0.5, 99.5])
    b = np.clip(((values - lo) / max(float(hi - lo), 1e-6) * bins).astype(np.int64), 0, bins - 1)
    del values
    prior = np.empty((masks.shape[0] + 1, len(b)), np.float32)  # background first
    for k in range(masks.shape[0]):
        m = masks[k][box].numpy().astype(np.float32)
        prior[k + 1] = (ndimage.gaussian_filter(m, sigma_vox) if sigma_vox > 0 else m)[inside]
    prior[0] = np.clip(1.0 - prior[1:].sum(0), 0.0, 1.0)
    prior /= np.maximum(prior.sum(0, keepdims=True), 1e-6)
    sample = np.zeros(inside.shape, bool)
    sample[::SAMPLE_STRIDE, ::SAMPLE_STRIDE, ::SAMPLE_STRIDE] = True
    sample = sample[inside]
    likelihood = np.ones((len(prior), bins), np.float32)
    for _ in range(iterations):
        post = prior[:, sample] * likelihood[:, b[sample]]
        post /= np.maximum(post.sum(0, keepdims=True), 1e-12)
        hist = np.stack([np.bincount(b[sample], weights=p, minlength=bins) for p in post]) + EPS
        hist = ndimage.gaussian_filter1d(hist, 1.0, axis=1)
        likelihood = (hist / hist.sum(1, keepdims=True)).astype(np.float32)
    total = np.zeros(len(b), np.float32)
    for k in range(len(prior)):  # class by class: no second (K, N) array
        total += prior[k] * likelihood[k, b]
    total = np.maximum(total, 1e-12)
    for i, k in enumerate(classes):
        part = np.zeros(inside.shape, np.float32)
        part[inside] = prior[k + 1] * likelihood[k + 1, b] / total
        out[i][box] = torch.from_numpy(part)
    return out
