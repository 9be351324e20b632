"""Atlas-registration baseline: register the reference onto the query and warp the reference label map.

SimpleITK (a benchmark-only dependency): large images are block-averaged to about `spacing_mm`, then
a moments-initialised affine and a B-spline (mesh `mesh` per axis) are fitted by Mattes mutual
information on `samples` random voxels per iteration (fixed seed), each over a coarse-to-fine pyramid
with a bounded number of iterations. B-spline coefficients are bounded to 0.4 node spacings, which
rules out folding (unbounded, one LA pair in six runs diverged to Dice 0). The reference label map is
warped onto the query's own full-resolution grid (nearest neighbour).

    python -m benchmarks.registration [--datasets la2018,hippocampus,acdc,btcv] [--pairs 2]

prints this baseline against the engine's own registration (Greedy, `inference/localise.py`) on the same pairs:
the measurement behind the engine's choice of registration (docs/DESIGN.md section 2.10)."""
from __future__ import annotations

import time

import numpy as np

from IrisSegmentLib.inference.body import crop_affine
from benchmarks import wholescan
from benchmarks.common import DATA, command
from benchmarks.common.cases import LABELS, cases, load_case, query_order, reference_indices, scores

SEED = 1  # metric sampling seed; SimpleITK's 0 would mean the wall clock, a different sample every run

def _image(array: np.ndarray, affine: np.ndarray):
    """SimpleITK image (LPS physical space) of an (i, j, k) array with a RAS voxel-to-world affine."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0])
    m = lps @ affine[:3, :3]
    sp = np.linalg.norm(m, axis=0)
    img.SetSpacing(tuple(float(s) for s in sp))
    img.SetDirection(tuple(float(v) for v in (m / sp).ravel()))
    img.SetOrigin(tuple(float(v) for v in lps @ affine[:3, 3]))
    return img


def _coarse(image, spacing_mm: float, min_size: int = 64):
    """`image` block-averaged to about `spacing_mm` per axis, keeping at least `min_size` voxels along
    it (axes already coarser or smaller stay), intensities rescaled to [0, 1]."""
    import SimpleITK as sitk

    factors = [max(1, min(int(round(spacing_mm / s)), n // min_size)) for s, n in zip(image.GetSpacing(), image.GetSize())]
    small = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    return sitk.RescaleIntensity(small, 0.0, 1.0)


def _method(samples: int, size, shrink: list[int], sigmas: list[float]):
    """A registration method on a fixed image of `size` voxels: Mattes MI on about `samples` random voxels
    at every level of the given pyramid (sigmas in voxels)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    voxels = [float(np.prod([-(-n // f) for n in size])) for f in shrink]
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, samples / v) for v in voxels], SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def fit(fixed, moving, mesh: int = 5, affine_iterations: int = 100, bspline_iterations: int = 30, samples: int = 5_000):
    """Affine then B-spline transform taking `fixed` points to `moving` points; a stage that fails is skipped."""
    import SimpleITK as sitk

    size = fixed.GetSize()
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _method(samples, size, [4, 2, 1], [2.0, 1.0, 0.0])
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, affine_iterations)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    try:
        affine = reg.Execute(fixed, moving)
    except RuntimeError:  # diverged: keep the moment-matching initialisation
        affine = init
    breg = _method(samples, size, [2, 1], [1.0, 0.0])
    bound = 0.4 * min(n * s for n, s in zip(size, fixed.GetSpacing())) / mesh  # no folding below 0.4 node spacings
    breg.SetOptimizerAsLBFGSB(numberOfIterations=bspline_iterations, maximumNumberOfFunctionEvaluations=4 * bspline_iterations,
                              lowerBound=-bound, upperBound=bound)
    bspline = sitk.BSplineTransformInitializer(fixed, [mesh] * 3)
    breg.SetMovingInitialTransform(affine)
    breg.SetInitialTransform(bspline, inPlace=True)
    try:
        breg.Execute(fixed, moving)
    except RuntimeError:  # diverged: affine only
        return affine
    return sitk.CompositeTransform([affine, bspline])


def register_and_warp(ref_image, ref_affine, ref_label, qry_image, qry_affine, spacing_mm: float = 2.0, mesh: int = 5,
                      affine_iterations: int = 100, bspline_iterations: int = 30, samples: int = 5_000) -> tuple[np.ndarray, float]:
    """Reference label map warped onto the query grid, and the seconds taken (registration and warp)."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    query = _image(qry_image, qry_affine)
    tx = fit(_coarse(query, spacing_mm), _coarse(_image(ref_image, ref_affine), spacing_mm), mesh, affine_iterations,
             bspline_iterations, samples)
    label = sitk.Cast(_image(ref_label, ref_affine), sitk.sitkUInt16)
    warped = sitk.Resample(label, query, tx, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped).transpose(2, 1, 0), time.perf_counter() - t0


def set_threads(n: int) -> None:
    """Threads of every SimpleITK filter and registration."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


CHECK_PAIRS = [("la2018", "la2018"), ("hippocampus", "hippocampus"), ("acdc", "acdc"), ("btcv", "btcv"), ("brain", "brain"),
               ("hippocampus", "la2018"), ("la2018", "hippocampus"), ("la2018", "btcv"), ("brain", "btcv"), ("acdc", "la2018"),
               ("btcv", "la2018"), ("brain", "la2018"), ("acdc", "btcv")]


def checks(seg, root, log=lambda m: None) -> list[dict]:
    """The engine's failure checks on right pairs (reference and target of one dataset) and wrong ones (another
    body region): per pair the image similarity near the structures, the share of the reference structures in the
    target's field of view, and whether the engine took the registration (else the warning it gave)."""
    rows = []
    for ref_ds, target_ds in CHECK_PAIRS:
        targets, refs = cases(root, target_ds), cases(root, ref_ds)
        qi = query_order(targets)[0]
        ri = reference_indices(refs, qi, 1)[0] if ref_ds == target_ds else query_order(refs)[0]
        ref, qry = load_case(refs[ri]), load_case(targets[qi])
        task = seg.encode(*ref, labels=[v for v in LABELS[ref_ds] if (ref[2] == v).any()], confidence=False)
        box = seg.body(qry[0], qry[1])
        loc = seg.localise(seg.prepare(qry[0][box], crop_affine(qry[1], box), polarity=task.polarity), task, "registration")
        rows.append({"pair": f"{ref_ds} -> {target_ds}", "similarity": loc.similarity[0] if loc.similarity else float("nan"),
                     "inside": loc.inside[0] if loc.inside else float("nan"), "taken": loc.method == "registration",
                     "warning": next((w for w in loc.warnings if w.startswith("reference")), "")})
        log(f"checks {rows[-1]}")
    return rows


def compare(seg, root, datasets: list[str], pairs: int, log=lambda m: None) -> list[dict]:
    """The engine's Greedy registration (`wholescan.registration_alone`) and this SimpleITK baseline on the same
    (query, first reference) pairs: Dice per pair (mean over the query's structures) and seconds."""
    rows = []
    for ds in datasets:
        items = cases(root, ds)
        for qi in query_order(items)[:pairs]:
            ri = reference_indices(items, qi, 1)[0]
            ref, qry = load_case(items[ri]), load_case(items[qi])
            labels = [v for v in LABELS[ds] if (ref[2] == v).any()]
            task = seg.encode(*ref, labels=labels, confidence=False)
            t0 = time.perf_counter()
            greedy = wholescan.registration_alone(seg, task, qry)
            t_greedy = time.perf_counter() - t0
            warped, t_sitk = register_and_warp(ref[0], ref[1], ref[2], qry[0], qry[1])
            row = {"dataset": ds, "query": items[qi].id,
                   "Greedy (engine)": (float(np.mean(list(scores(greedy, qry[2], labels).values()))), t_greedy),
                   "SimpleITK B-spline": (float(np.mean(list(scores(warped, qry[2], labels).values()))), t_sitk)}
            rows.append(row)
            log(f"{ds} {items[qi].id}: " + ", ".join(f"{k} {v[0]:.3f} ({v[1]:.1f} s)" for k, v in row.items() if isinstance(v, tuple)))
    return rows


def main() -> None:
    """Table: the engine's registration against the SimpleITK baseline, Dice and seconds per pair."""
    import argparse
    import sys
    from pathlib import Path

    import torch

    from IrisSegmentLib import Segmenter

    ap = argparse.ArgumentParser(description=compare.__doc__)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--datasets", default="la2018,hippocampus,acdc,btcv")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checks", action="store_true", help="the failure-check table on right and wrong (other body region) pairs "
                                                          "instead of the comparison with SimpleITK")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_threads(a.threads)
    if a.checks:
        rows = checks(Segmenter.load(device="cpu"), Path(a.data), lambda m: print(m, file=sys.stderr))
        print("| reference -> target | similarity near the structures | inside the target's field of view | taken |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['pair']} | {r['similarity']:.2f} | {r['inside']:.2f} | {'yes' if r['taken'] else 'no: ' + r['warning'].split(': ', 1)[-1]} |")
        print(f"\nCommand: `{command('benchmarks.registration')}`.")
        return
    from IrisSegmentLib.training.pause import paused_training

    with paused_training(lambda m: print(m, file=sys.stderr)):
        rows = compare(Segmenter.load(device="cpu"), Path(a.data), a.datasets.split(","), a.pairs, lambda m: print(m, file=sys.stderr))
    engines = ("Greedy (engine)", "SimpleITK B-spline")
    print("| dataset | " + " | ".join(f"{e} Dice | {e} s/pair" for e in engines) + " | pairs |")
    print("|---|" + "---|" * (2 * len(engines) + 1))
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        cells = [f"{np.mean([r[e][i] for r in rs]):.3f}" if i == 0 else f"{np.mean([r[e][i] for r in rs]):.1f}" for e in engines for i in (0, 1)]
        print(f"| {ds} | " + " | ".join(cells) + f" | {len(rs)} |")
    print(f"\nCommand: `{command('benchmarks.registration')}` (threads {a.threads}).")


if __name__ == "__main__":
    main()
