"""benchmarks/wholescan.py on a tiny synthetic la2018/val with the seeded tiny model (untrained: these tests check
the pairs, the columns from the public stages, the embedding, the table and the verdict, not accuracy)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_la2018_val
from IrisSegmentLib import Segmenter
from benchmarks import wholescan


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("data")
    write_la2018_val(root, ("A", "B", "C"))
    seg = Segmenter.load(str(tiny_model_dir), "cpu")
    return wholescan.evaluate(seg, root, ["la2018"], 2, {}, embedded=False)


def test_every_column_on_the_same_pairs(records):
    assert [(r["query"], r["reference"]) for r in records] == [("A", "B"), ("B", "C")]
    for r in records:
        assert set(r["dice"]) == set(wholescan.COLUMNS) == set(r["seconds"])
        assert r["dice"]["registration alone"][1] > 0.5  # shifted ellipsoids on one grid: registration finds them
        assert all(0.0 <= d <= 1.0 for col in r["dice"].values() for d in col.values())


def test_table_and_verdict(records):
    embedded = {"dataset": "la2018 in 512x512x300", "query": "A", "reference": "B",
                "dice": {"registration alone": {1: 0.7}, "localise + segment": {1: 0.8}},
                "seconds": {"registration alone": 5.0, "localise + segment": 20.0}, "warnings": []}
    text = wholescan.table([*records, embedded])
    assert text.count("\n") == 3 and "| la2018 |" in text and "| – |" in text and "– / 5.0 / 20.0" in text
    verdict = wholescan.verdict([*records, embedded])
    assert "la2018 in 512x512x300 Dice 0.800 in 20.0 s (target >= 0.75 in <= 30 s: met)" in verdict
    best = max(np.mean([np.mean(list(r["dice"][c].values())) for r in records]) for c in ("IRIS alone", "registration alone"))
    ours = np.mean([np.mean(list(r["dice"]["localise + segment"].values())) for r in records])
    assert f"la2018 {ours - best:+.3f}" in verdict


def test_embed_keeps_world_positions():
    img = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 10
    lab = (img > 20).astype(np.uint8)
    aff = np.diag([1.25, 1.25, 1.25, 1.0])
    aff[:3, 3] = [5.0, -3.0, 2.0]
    big, big_aff, big_lab = wholescan.embed((img, aff, lab), (10, 12, 9), (4, 5, 3))
    assert big.shape == (10, 12, 9) and np.array_equal(big[4:6, 5:8, 3:7], img) and big_lab.sum() == lab.sum()
    assert np.allclose(big_aff @ [4, 5, 3, 1], aff @ [0, 0, 0, 1])  # the same voxel, the same world point
    outside = np.ones(big.shape, bool)
    outside[4:6, 5:8, 3:7] = False
    assert (big[outside] >= np.percentile(img, 1)).all() and big[outside].max() < img.min() + 3 * img.std()


def test_baseline_column_and_keep_rule(tmp_path, tiny_model_dir):
    """A baseline model adds its own localise + segment column on the same pairs; the keep rule needs a better mean
    and no dataset more than 2 points worse."""
    root = tmp_path / "data"
    write_la2018_val(root, ("A", "B"))
    seg = Segmenter.load(str(tiny_model_dir), "cpu")
    recs = wholescan.evaluate(seg, root, ["la2018"], 1, {}, embedded=False, baseline=seg)
    assert set(recs[0]["dice"]) == {*wholescan.COLUMNS, wholescan.BASELINE}
    assert recs[0]["dice"][wholescan.BASELINE] == recs[0]["dice"]["localise + segment"]  # same model, deterministic
    assert wholescan.BASELINE in wholescan.table(recs)

    def rec(ds, new, old):
        return {"dataset": ds, "dice": {"localise + segment": {1: new}, wholescan.BASELINE: {1: old}}}

    assert "keep the model" in wholescan.keep_verdict([rec("a", 0.80, 0.70), rec("b", 0.69, 0.70)])
    assert "keep the baseline" in wholescan.keep_verdict([rec("a", 0.90, 0.70), rec("b", 0.67, 0.70)])  # b 3 points worse
    assert "keep the baseline" in wholescan.keep_verdict([rec("a", 0.70, 0.70)])  # not better
    assert "no keep verdict" in wholescan.keep_verdict(recs[:0] + [{"dataset": "a", "dice": {"localise + segment": {1: 0.5}}}])
