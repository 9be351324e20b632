"""One-shot accuracy on the validation split, against atlas registration on the same pairs.

Every validation case is a query; its references are the next cases (cyclically) from OTHER
subjects of the same validation set, so nothing here was trained on. Prints a Markdown table.

    python benchmarks/accuracy.py [--model iris-small] [--data ../shared/data] [--datasets la2018,acdc,...]
        [--max-queries N] [--methods ensemble,tuned,bank,registration]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from IrisSegmentLib import Segmenter, TaskEmbedding  # noqa: E402
from IrisSegmentLib.io import read_image  # noqa: E402
from IrisSegmentLib.training.data import BRAIN_VAL, BTCV_VAL, HIPPO_VAL_SUBJECTS  # noqa: E402
from IrisSegmentLib.training import synth  # noqa: E402

BRAIN_STRUCTURES = {2: "L cerebral WM", 3: "L cortex", 4: "L lateral ventricle", 10: "L thalamus",
                    16: "brain-stem", 17: "L hippocampus", 41: "R cerebral WM", 49: "R thalamus"}
LABELS = {
    "la2018": {1: "left atrium"},
    "acdc": {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"},
    "btcv": {1: "spleen", 2: "R kidney", 3: "L kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "aorta", 9: "IVC", 10: "portal/splenic vein"},
    "hippocampus": {1: "anterior", 2: "posterior"},
    "brain": BRAIN_STRUCTURES,
}


def cases(root: Path, dataset: str) -> list[tuple[str, str, Path | None, Path]]:
    """(id, subject, image path or None, label path) of a validation set."""
    if dataset in ("la2018", "acdc"):
        out = []
        for p in sorted((root / dataset / "val").glob("*_label.nii.gz")):
            cid = p.name[: -len("_label.nii.gz")]
            out.append((cid, cid.split("_")[0], p.with_name(cid + "_image.nii.gz"), p))
        return out
    if dataset == "btcv":
        return [(c, c, root / "btcv" / f"{c}_image.nii.gz", root / "btcv" / f"{c}_label.nii.gz") for c in BTCV_VAL]
    if dataset == "hippocampus":
        out = []
        for n in range(1, 2 * HIPPO_VAL_SUBJECTS + 1):
            cid = f"hippocampus_{n:03d}"
            img = root / "msd_hippocampus" / f"{cid}_image.nii.gz"
            if img.exists():
                out.append((cid, str((n + 1) // 2), img, img.with_name(cid + "_label.nii.gz")))
        return out
    if dataset == "brain":
        return [(c, c, None, root / "synthseg_brain_labels" / f"{c}.nii.gz") for c in BRAIN_VAL]
    raise ValueError(dataset)


def load_case(image_path, label_path, modality_seed: int):
    lab, aff, _ = read_image(label_path)
    lab = np.rint(np.asarray(lab, dtype=np.float32)).astype(np.int32)
    if image_path is None:  # label-only: one synthetic contrast shared by every brain of the run
        g = torch.Generator().manual_seed(modality_seed)
        means, stds = synth.random_modality(int(lab.max()) + 1, g)
        img = synth.render(torch.from_numpy(lab), means, stds, torch.Generator().manual_seed(hash(str(label_path)) % 2**31)).numpy()
    else:
        img, aff_i, _ = read_image(image_path)
        img = np.asarray(img, dtype=np.float32)
    return img, aff, lab


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if int(b.sum()) == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def evaluate(seg: Segmenter, root: Path, dataset: str, n_refs: int, methods: set[str], max_queries: int | None, log) -> dict:
    items = cases(root, dataset)
    if max_queries:
        items = items[:max_queries]
    labels = list(LABELS[dataset])
    cache = {}

    def get(i):
        if i not in cache:
            cid, _, ip, lp = items[i]
            cache[i] = load_case(ip, lp, modality_seed=7)
        return cache[i]

    ensemble, tuned = f"ensemble of {n_refs}", f"tuned on {n_refs}"
    rows = {m: {} for m in ("one-shot", ensemble, tuned, "memory bank", "registration")}
    times = {"one-shot": [], "registration": []}
    for qi, (cid, subject, _, _) in enumerate(items):
        order = [(qi + d) % len(items) for d in range(1, len(items))]
        refs = [i for i in order if items[i][1] != subject][:n_refs]
        q_img, q_aff, q_lab = get(qi)
        tasks = []
        for ri in refs:
            r_img, r_aff, r_lab = get(ri)
            have = [v for v in labels if (r_lab == v).any()]
            tasks.append(seg.encode(r_img, r_aff, r_lab, labels=have))
        runs = [("one-shot", tasks[0])]
        if "ensemble" in methods:
            runs.append((ensemble, TaskEmbedding.ensemble(tasks)))
        if "tuned" in methods:
            runs.append((tuned, seg.tune(TaskEmbedding.ensemble(tasks), [get(ri) for ri in refs])))
        if "bank" in methods:
            known = [v for v in labels if f"{dataset}:{v}" in seg.bank.embeddings]
            if known:
                runs.append(("memory bank", seg.bank.task([f"{dataset}:{v}" for v in known], known)))
        for name, task in runs:
            t0 = time.perf_counter()
            res = seg.segment(q_img, q_aff, task)
            if name == "one-shot":
                times["one-shot"].append(time.perf_counter() - t0)
            for v in task.labels:
                d = dice(res.label_map == v, q_lab == v)
                if not np.isnan(d):
                    rows[name].setdefault(v, []).append(d)
        if "registration" in methods:
            r_img, r_aff, r_lab = get(refs[0])
            warped, secs = register_and_warp(r_img, r_aff, r_lab, q_img, q_aff)
            times["registration"].append(secs)
            for v in labels:
                if (r_lab == v).any():
                    d = dice(warped == v, q_lab == v)
                    if not np.isnan(d):
                        rows["registration"].setdefault(v, []).append(d)
        log(f"{dataset} {cid}: " + ", ".join(f"{k} {np.mean([x[-1] for x in r.values()]):.3f}" for k, r in rows.items() if r))
    return {"rows": rows, "times": {k: float(np.mean(v)) for k, v in times.items() if v}, "queries": len(items)}


def table(results: dict) -> str:
    first = next(iter(results.values()))["rows"]
    methods = [m for m in first if any(r["rows"][m] for r in results.values())]
    lines = ["| dataset | structure | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ds, r in results.items():
        for v, name in LABELS[ds].items():
            cells = []
            for m in methods:
                x = r["rows"].get(m, {}).get(v)
                cells.append(f"{np.mean(x):.3f} ± {np.std(x):.3f}" if x else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {ds} | {name} | " + " | ".join(cells) + " |")
        means = []
        for m in methods:
            per = [np.mean(x) for x in r["rows"].get(m, {}).values()]
            means.append(f"**{np.mean(per):.3f}**" if per else "–")
        lines.append(f"| {ds} | **mean** ({r['queries']} queries) | " + " | ".join(means) + " |")
    lines.append("")
    lines.append("Seconds per query: " + "; ".join(
        f"{ds}: IrisSegment {r['times'].get('one-shot', float('nan')):.1f} s" +
        (f", registration {r['times']['registration']:.1f} s" if "registration" in r["times"] else "") for ds, r in results.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--datasets", default="la2018,acdc,hippocampus,btcv,brain")
    ap.add_argument("--references", type=int, default=3)
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--methods", default="ensemble,registration",
                    help="besides one-shot, any of: ensemble, tuned (in-context tuning), bank (memory bank, no reference), "
                         "registration (SimpleITK baseline)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    a = ap.parse_args()
    seg = Segmenter.load(a.model, a.device)
    print(f"model {seg.model_id} on {seg.device}", file=sys.stderr)
    results = {}
    for ds in a.datasets.split(","):
        results[ds] = evaluate(seg, Path(a.data), ds, a.references, set(a.methods.split(",")), a.max_queries,
                               lambda m: print(m, file=sys.stderr))
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    from registration import register_and_warp  # noqa: E402  (same folder)

    main()
