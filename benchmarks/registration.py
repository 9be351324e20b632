"""Atlas-registration baseline: register the reference onto the query and warp the reference label map.

SimpleITK (a benchmark-only dependency): large images are block-averaged to about `spacing_mm`, then
a moments-initialised affine and a B-spline (mesh `mesh` per axis) are fitted by Mattes mutual
information on `samples` random voxels per iteration (fixed seed), each over a coarse-to-fine pyramid
with a bounded number of iterations. B-spline coefficients are bounded to 0.4 node spacings, which
rules out folding (unbounded, one LA pair in six runs diverged to Dice 0). The reference label map is
warped onto the query's own full-resolution grid (nearest neighbour)."""
from __future__ import annotations

import time

import numpy as np

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
