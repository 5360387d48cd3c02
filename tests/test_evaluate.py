import json

from histo.evaluate import match_objects, slide_specs


def test_match_objects_one_to_one():
    import numpy as np

    t = np.zeros((20, 20), int)
    p = np.zeros((20, 20), int)
    t[2:8, 2:8] = 1
    t[10:16, 10:16] = 2
    p[2:8, 3:8] = 5  # IoU 30/36
    p[0:2, 0:2] = 6  # false positive
    assert match_objects(t, p) == (1, 1, 1)


def test_slides_cover_the_factorial():
    specs = slide_specs()
    assert len(specs) == 36
    assert {s.pixel_size_um for s in specs} == {0.25, 0.5, 1.0, 2.0}
    assert {s.counterstain for s in specs} == {"hematoxylin", "fast-green", "methyl-green"}
    assert min(s.seed for s in specs) >= 900_000


def test_evaluate_two_small_slides(tmp_path, capsys):
    from histo.cli import main

    rc = main(["evaluate", "--out", str(tmp_path), "--slides", "2", "--field-um", "300", "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| osteoclast F1 |" in table and "classical" in table
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(report["summary"]) == {"default", "classical", "truth map"}
    assert 0 <= report["summary"]["default"]["bone Dice"] <= 1
    assert (tmp_path / "evaluation.md").read_text().startswith("# Segmentation evaluation")


def test_evaluate_scores_a_model_and_the_truth_map_on_held_out_slides():
    """A small run of the evaluation: the truth class map measured by the same engine lands
    within the resampling floor of the generator's truth; the model's scores are filled."""
    from histo.evaluate import evaluate

    report = evaluate(models=("classical",), n_slides=2, field_um=400)
    assert len(report["per_slide"]["classical"]) == 2
    for row in report["per_slide"]["truth map"]:
        assert abs(row["indices"]["BV/TV"] - row["truth"]["BV/TV"]) < 2.0
    scores = report["summary"]["classical"]
    assert scores["MP/s"] > 0
    assert 0.0 <= scores["BV/TV abs. error"] < 50.0
