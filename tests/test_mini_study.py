"""scripts/mini_study.py (python -m scripts.mini_study): the --smoke path end to end (every arm
evaluated, every plot a PNG), reruns with the same seed are identical, and the tables' arithmetic."""
import json
import sys

import pytest
from PIL import Image

from scripts import mini_study


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke study (both models, every arm, one seed); returns its output folder."""
    out = tmp_path_factory.mktemp("mini_study")
    argv = sys.argv
    sys.argv = ["mini_study.py", "--smoke", "--out", str(out), "--jobs", "1", "--threads", "1"]
    try:
        mini_study.main()
    finally:
        sys.argv = argv
    return out


def smoke_plan(out):
    preset = mini_study.PRESETS["smoke"]
    info = json.loads((out / "data" / "annotations" / "instances_val2017.json").read_text())
    num_classes = max(c["id"] for c in info["categories"]) + 1
    return preset, mini_study.plan(preset, out, str(out / "data"), num_classes)


def test_smoke_evaluates_every_arm_and_writes_every_plot(smoke):
    preset, (pretrain, arms, ablations) = smoke_plan(smoke)
    assert set(arms) == {(m, a, s) for m in ("detr", "deformable_detr") for a in mini_study.ARMS
                         for s in preset["seeds"]}
    assert ablations == {}
    for run in [*pretrain.values(), *arms.values()]:
        assert run.finished(), run.dir
        rows = run.rows()
        assert len(rows) == 1 and len(rows[0]["test_coco_eval_bbox"]) == 12
        assert (run.dir / "eval" / "latest.pth").is_file()
    # the DAP arms really trained with the DAP loss, the raw arm without it; one logged line per
    # optimisation step (8 images, batch 4, 1 epoch)
    steps = arms[("detr", "dap_momentum", 0)].iterations()
    assert len(steps) == 2 and "loss_dap_unscaled" in steps[0] and "dap_value" in steps[0]
    assert "train_loss_dap" in arms[("detr", "dap_momentum", 0)].rows()[0]
    assert "loss_dap_unscaled" not in arms[("detr", "raw", 0)].iterations()[0]

    results = (smoke / "results.md").read_text()
    plots = [line[line.index("(") + 1:-1] for line in results.splitlines() if line.startswith("![")]
    assert plots == ["pretrain.png", "detr_finetune_curves.png", "detr_precision_recall.png",
                     "deformable_detr_finetune_curves.png", "deformable_detr_precision_recall.png"]
    for name in plots:
        with Image.open(smoke / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()
    # the main table: a row per model and arm, plus the pretrained start
    table = results.split("## Fine-tuning arms")[1].split("### Paired")[0]
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith(("| DETR", "| Deformable"))]
    labels = ["start (pretrained)"] + [label for label, *_ in mini_study.ARMS.values()]
    assert rows == [["| DETR", label] for label in labels] + [["| Deformable DETR", label] for label in labels]


def test_same_seed_same_numbers_other_seed_other_order(smoke, tmp_path):
    _, (pretrain, arms, _) = smoke_plan(smoke)
    for run in (pretrain["detr"], arms[("detr", "dap_momentum", 0)], arms[("deformable_detr", "raw+dap", 0)]):
        again = mini_study.Run(tmp_path / run.dir.name, run.flags[:-2])
        mini_study.execute(again, threads=1)
        assert again.rows() == run.rows(), run.dir  # every logged loss and COCO number
    other = mini_study.Run(tmp_path / "seed1", arms[("detr", "raw", 0)].flags[:-4] + ["--seed", "1"])
    assert arms[("detr", "raw", 0)].flags[-4:-2] == ["--seed", "0"]
    mini_study.execute(other, threads=1)
    assert other.rows()[0]["train_loss"] != arms[("detr", "raw", 0)].rows()[0]["train_loss"]


def test_finished_runs_are_reused_only_with_the_same_flags(smoke):
    _, (pretrain, _, _) = smoke_plan(smoke)
    run = pretrain["detr"]
    assert run.finished()
    assert not mini_study.Run(run.dir, run.flags[:-2] + ["--lr", "1e-3"]).finished()
    assert run.seconds() > 0


class FakeRun:
    def __init__(self, coco):
        self._coco = coco

    def coco(self):
        return self._coco


def test_tables_report_mean_std_and_difference_to_raw():
    preset = {"models": ("detr",), "seeds": (0, 1)}
    base = {"raw": 10.0, "dap_constant": 12.0, "dap_momentum": 9.0, "raw+dap": 10.0, "raw_lr10": 10.5}
    arms = {("detr", arm, s): FakeRun([ap + 2 * s, 20, 5, -100, 1, 2]) for arm, ap in base.items() for s in (0, 1)}
    pretrain = {"detr": FakeRun([8, 18, 4, -100, 1, 2])}
    table = mini_study.table_finetuning(preset, pretrain, arms).splitlines()
    assert table[2] == "| DETR | start (pretrained) | 8.0 | 18.0 | 4.0 | n/a | 1.0 | 2.0 |"
    # AP 10 and 12 over the seeds: mean 11, sample std sqrt(2)
    assert table[3] == "| DETR | raw | 11.0 ± 1.4 | 20.0 ± 0.0 | 5.0 ± 0.0 | n/a | 1.0 ± 0.0 | 2.0 ± 0.0 |"
    assert table[4].startswith("| DETR | DAP, constant matcher | 13.0 ± 1.4 (+2.0) | 20.0 ± 0.0 (+0.0) |")
    assert table[5].startswith("| DETR | DAP, momentum matcher | 10.0 ± 1.4 (-1.0) |")
    paired = mini_study.table_paired(preset, arms).splitlines()
    assert paired[2] == "| DETR | DAP, constant matcher | +2.0, +2.0 | 2.0 ± 0.0 | 2 of 2 |"
    assert paired[4] == "| DETR | raw + DAP | +0.0, +0.0 | 0.0 ± 0.0 | 0 of 2 |"
    assert paired[5] == "| DETR | raw, 10x learning rate (control) | +0.5, +0.5 | 0.5 ± 0.0 | 2 of 2 |"


def test_ablation_table_has_one_column_pair_per_parameter():
    ablations = {(name, v): FakeRun([float(i), 0, 0, 0, 0, 0])
                 for name, (_, _, values) in mini_study.ABLATIONS.items() for i, v in enumerate(values)}
    table = mini_study.table_ablations(ablations).splitlines()
    assert table[0] == "| σ | AP | N | AP | batch size | AP |"
    assert table[2] == "| 0.01 | 0.0 | 4 | 0.0 | 2 | 0.0 |"
    assert table[6] == "| 0.2 | 4.0 | 64 | 4.0 |  |  |"
    assert len(table) == 2 + 5


def test_control_arm_is_the_raw_arm_at_ten_times_the_learning_rate(tmp_path):
    _, arms, _ = mini_study.plan(mini_study.PRESETS["smoke"], tmp_path, str(tmp_path / "data"), 6)
    raw, control = (mini_study.parse_flags(arms[("detr", arm, 0)].flags) for arm in ("raw", "raw_lr10"))
    assert control.lr == pytest.approx(10 * raw.lr) and control.loss == "raw"
    assert {k for k, v in vars(raw).items() if getattr(control, k) != v} == {"lr", "output_dir"}
