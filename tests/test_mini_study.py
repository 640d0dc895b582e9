"""scripts/mini_study.py (python -m scripts.mini_study): the plan of runs (every arm for every model
and seed pair, each fine-tuning from its own pretraining seed's checkpoint, one data order per seed
pair), the statistics against hand-computed values, raw's best learning rate, the skip of an arm
main.py does not accept, and the --smoke path end to end (every arm evaluated, the tables written
from the runs' numbers, every plot a PNG; reruns with the same seed are identical), and a study
stopped or run twice at once: one study per folder, workers that die with it, writes that a full
disk cannot leave half done, a stopped run resumed from its checkpoint."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from scripts import mini_study
from util.errors import UserInputError

from conftest import REPO

MODELS = ("detr", "deformable_detr")
# the flags an arm may change: its loss, matcher and learning rate (and the run's folder)
ARM_FLAGS = {"loss", "matcher", "dap_cost_mode", "lr", "output_dir"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke study (both models, every arm, 2 pretraining x 1 fine-tuning seeds); returns its
    output folder."""
    out = tmp_path_factory.mktemp("mini_study")
    argv = sys.argv
    sys.argv = ["mini_study.py", "--smoke", "--out", str(out), "--jobs", "1", "--threads", "1"]
    try:
        mini_study.main()
    finally:
        sys.argv = argv
    return out


def smoke_study(out):
    info = json.loads((out / "data" / "annotations" / "instances_val2017.json").read_text())
    num_classes = max(c["id"] for c in info["categories"]) + 1
    return mini_study.plan(mini_study.PRESETS["smoke"], out, str(out / "data"), num_classes)


def changed(a, b):
    """The main.py options in which two runs' flags differ."""
    a, b = vars(mini_study.parse_flags(a.flags)), vars(mini_study.parse_flags(b.flags))
    return {k for k in a if a[k] != b[k]}


# ----------------------------------------------------------------------------- the plan

def test_full_plan_runs_every_arm_for_every_model_and_seed_pair(tmp_path):
    study = mini_study.plan(mini_study.PRESETS["full"], tmp_path, str(tmp_path / "data"), 6)
    pairs = [(p, f) for p in (0, 1, 2) for f in (0, 1)]
    assert study.pairs == pairs
    assert study.arm_names == tuple(mini_study.ARMS)  # main.py accepts every loss of the arena
    assert "alrp" in study.arm_names and "ap" in study.arm_names and "rs" in study.arm_names
    assert set(study.arms) == {(m, a, p, f) for m in MODELS for a in mini_study.ARMS for p, f in pairs}
    assert len(study.arms) == 120 and len({r.dir for r in study.arms.values()}) == 120
    assert set(study.pretrain) == {(m, p) for m in MODELS for p in (0, 1, 2)}
    # the pretraining seed is passed to the pretraining run: another checkpoint per seed
    for (m, p), run in study.pretrain.items():
        assert mini_study.parse_flags(run.flags).seed == p
        assert changed(run, study.pretrain[(m, 0)]) <= {"seed", "output_dir"}
    assert len({r.dir for r in study.pretrain.values()}) == 6
    for (m, a, p, f), run in study.arms.items():
        args = mini_study.parse_flags(run.flags)
        # fine-tuning starts from its own pretraining seed's checkpoint ...
        assert args.finetune == str(study.pretrain[(m, p)].dir / "checkpoint.pth")
        # ... with the seed pair's data order: the same for every arm of the pair
        assert args.seed == 100 * p + f
        assert changed(run, study.arms[(m, "raw", p, f)]) <= ARM_FLAGS
        assert args.loss == mini_study.arm_loss(a)
    assert len({mini_study.parse_flags(study.arms[("detr", "raw", p, f)].flags).seed for p, f in pairs}) == 6
    # ablations: the DAP constant arm of the first model and seed pair, one flag changed at a time
    extra = set(study.ablations.values()) - set(study.arms.values())
    assert len(extra) == 5 + 5 + 4 - 3
    base = study.arms[("detr", "dap_constant", 0, 0)]
    assert study.ablations[("sigma", 0.05)] is base
    assert changed(study.ablations[("bins", 4)], base) == {"dap_bins", "output_dir"}


def test_arms_flags_and_learning_rates(tmp_path):
    study = mini_study.plan(mini_study.PRESETS["full"], tmp_path, str(tmp_path / "data"), 6)
    lr = {a: mini_study.parse_flags(study.arms[("detr", a, 1, 1)].flags).lr for a in mini_study.ARMS}
    assert lr["raw"] == 2e-5 and lr["raw_lr3"] == 6e-5 and lr["raw_lr10"] == 2e-4
    assert {lr[a] for a in mini_study.ARMS if not a.startswith("raw_lr")} == {2e-5}
    assert [a for a in mini_study.ARMS if mini_study.is_raw(a)] == ["raw", "raw_lr3", "raw_lr10"]
    # the raw sweep changes the learning rate only
    for arm in ("raw_lr3", "raw_lr10"):
        assert changed(study.arms[("deformable_detr", arm, 2, 0)], study.arms[("deformable_detr", "raw", 2, 0)]) \
            == {"lr", "output_dir"}
    matcher = {a: mini_study.parse_flags(study.arms[("detr", a, 0, 0)].flags) for a in mini_study.ARMS}
    assert (matcher["dap_hungarian"].loss, matcher["dap_hungarian"].matcher) == ("dap", "hungarian")
    assert (matcher["dap_momentum"].matcher, matcher["dap_momentum"].dap_cost_mode) == ("dap", "momentum")
    assert {matcher[a].matcher for a in ("ap", "rs", "alrp", "raw+dap", "raw")} == {"hungarian"}
    with pytest.raises(UserInputError):
        mini_study.finetune_seed(0, 100)


def test_presets():
    full, quick, smoke = (mini_study.PRESETS[k] for k in ("full", "quick", "smoke"))
    assert (full["pretrain_seeds"], full["finetune_seeds"], full["models"]) == ((0, 1, 2), (0, 1), MODELS)
    assert full["arms"] == tuple(mini_study.ARMS) and full["ablations"]
    assert (quick["pretrain_seeds"], quick["finetune_seeds"], quick["models"]) == ((0,), (0,), ("detr",))
    assert set(quick["arms"]) == {"raw", "dap_constant", "dap_momentum", "raw+dap", "ap", "rs", "raw_lr10"}
    assert not quick["ablations"] and not smoke["ablations"]
    # the smoke study has 2 pretraining seeds, so its tables carry intervals
    assert len(smoke["pretrain_seeds"]) == 2 and smoke["arms"] == tuple(mini_study.ARMS)
    assert smoke["data"]["num_train"] <= 8


def test_an_arm_whose_loss_main_py_does_not_accept_is_skipped_with_a_note(monkeypatch, capsys, tmp_path):
    assert {"raw", "dap", "raw+dap", "ap", "rs", "alrp"} <= mini_study.accepted_losses()
    monkeypatch.setitem(mini_study.ARMS, "future", ("a future loss", ["--loss", "future"], 1))
    preset = dict(mini_study.PRESETS["smoke"], arms=(*mini_study.PRESETS["smoke"]["arms"], "future"))
    study = mini_study.plan(preset, tmp_path, str(tmp_path / "data"), 6)
    assert study.arm_names == mini_study.PRESETS["smoke"]["arms"]
    assert not any(arm == "future" for _, arm, _, _ in study.arms)
    assert "note: arm 'future' (a future loss) skipped: main.py does not accept --loss future yet" \
        in capsys.readouterr().out
    # as aLRP was before main.py had it: the study runs without it
    monkeypatch.setattr(mini_study, "accepted_losses", lambda: {"raw", "dap", "raw+dap", "ap", "rs"})
    study = mini_study.plan(mini_study.PRESETS["full"], tmp_path, str(tmp_path / "data"), 6)
    assert study.arm_names == tuple(a for a in mini_study.ARMS if a not in ("alrp", "future"))
    assert "arm 'alrp' (aLRP Loss) skipped" in capsys.readouterr().out
    monkeypatch.setattr(mini_study, "accepted_losses", lambda: {"dap"})
    with pytest.raises(UserInputError, match="raw arm"):
        mini_study.plan(mini_study.PRESETS["quick"], tmp_path, str(tmp_path / "data"), 6)


# ----------------------------------------------------------------------------- statistics

def test_statistics_against_hand_computed_values():
    assert mini_study.mean_std([10.0, 12.0]) == "11.0 ± 1.4"  # sample std sqrt(2)
    assert mini_study.mean_std([5.0]) == "5.0" and mini_study.mean_std([-1.0, 3.0]) == "n/a"
    # Student's t, 97.5 % quantile (a printed table)
    for df, t in {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622}.items():
        assert mini_study.t_quantile(df) == pytest.approx(t, abs=1e-4)
    # 2, 3, 4: mean 3, s = 1, half-width 4.3027 / sqrt(3) = 2.4841
    mean, (lo, hi) = mini_study.t_interval([2.0, 3.0, 4.0])
    assert (mean, lo, hi) == pytest.approx((3.0, 0.5159, 5.4841), abs=1e-4)
    assert mini_study.t_interval([5.0]) == (5.0, None)

    diffs = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 4.0, (2, 0): 4.0, (2, 1): 4.0}
    assert mini_study.by_pretraining_seed(diffs) == {0: 2.0, 1: 3.0, 2: 4.0}
    s = mini_study.summarize_differences(diffs)
    # the interval is over the 3 per-pretraining-seed means (2, 3, 4), not over the 6 pairs
    assert (s["mean"], *s["ci"]) == pytest.approx((3.0, 0.5159, 5.4841), abs=1e-4)
    assert (s["n"], s["units"], s["better"], s["pairs"]) == (3, "pretraining seeds", 6, 6)
    assert mini_study.verdict(s["ci"]) == "survives (above raw's best)"
    # one pretraining seed: over its fine-tuning seeds. 1, -0.5, 2: mean 0.8333, s = 1.2583,
    # half-width 4.3027 * 1.2583 / sqrt(3) = 3.1258
    s = mini_study.summarize_differences({(0, 0): 1.0, (0, 1): -0.5, (0, 2): 2.0})
    assert (s["mean"], *s["ci"]) == pytest.approx((0.8333, -2.2925, 3.9591), abs=1e-4)
    assert (s["n"], s["units"], s["better"], s["pairs"]) == (3, "fine-tuning seeds", 2, 3)
    assert mini_study.verdict(s["ci"]) == "does not survive (CI includes 0)"
    s = mini_study.summarize_differences({(0, 0): -2.0})
    assert s["ci"] is None and mini_study.verdict(None) == "no interval (one seed pair)"
    assert mini_study.verdict((-3.0, -0.1)) == "survives (below raw's best)"


class FakeRun:
    def __init__(self, coco):
        self._coco = coco

    def coco(self):
        return self._coco


# raw's AP per seed pair; the other arms as differences to raw at 3x (raw's best here)
BASE = {(0, 0): 10.0, (0, 1): 11.0, (1, 0): 12.0, (1, 1): 12.0, (2, 0): 9.0, (2, 1): 10.0}
OVER_BEST = {
    "raw": dict.fromkeys(BASE, -1.0),
    "raw_lr3": dict.fromkeys(BASE, 0.0),
    "raw_lr10": {(0, 0): 2.0, (0, 1): -2.0, (1, 0): -1.0, (1, 1): -1.0, (2, 0): -1.0, (2, 1): -1.0},
    "dap_constant": {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 4.0, (2, 0): 4.0, (2, 1): 4.0},
    "ap": {(0, 0): 1.0, (0, 1): 0.0, (1, 0): -1.0, (1, 1): -1.0, (2, 0): 2.0, (2, 1): 1.0},
}


def fake_study(over_best=OVER_BEST):
    preset = {"models": ("detr",), "pretrain_seeds": (0, 1, 2), "finetune_seeds": (0, 1)}
    arms = {("detr", arm, p, f): FakeRun([BASE[(p, f)] + 1 + d[(p, f)], 20.0, 5.0 + p, -100, 1, 2])
            for arm, d in over_best.items() for p, f in BASE}
    pretrain = {("detr", p): FakeRun([8.0 + p, 18, 4, -100, 1, 2]) for p in (0, 1, 2)}
    return mini_study.Study(preset, pretrain, arms, {}, tuple(over_best))


def test_best_raw_learning_rate_is_chosen_on_the_mean_validation_ap():
    study = fake_study()
    # mean AP: raw 10.67, raw 3x 11.67, raw 10x 11.0 (best on one pair, not on average)
    assert mini_study.best_raw(study, "detr") == "raw_lr3"
    assert mini_study.paired_differences(study, "detr", "dap_constant", "raw_lr3") \
        == pytest.approx(OVER_BEST["dap_constant"])
    # a tie goes to the lower learning rate; an arm that is not raw is never raw's best
    tie = fake_study({**OVER_BEST, "raw": dict.fromkeys(BASE, 0.0), "dap_constant": dict.fromkeys(BASE, 9.0)})
    assert mini_study.best_raw(tie, "detr") == "raw"
    sweep = mini_study.table_raw_sweep(study).splitlines()
    assert sweep[2:] == ["| DETR | raw | 2e-05 | 10.67 |  |",
                         "| DETR | raw, 3x learning rate | 6e-05 | 11.67 | raw's best |",
                         "| DETR | raw, 10x learning rate | 0.0002 | 11.00 |  |"]


def test_tables_from_hand_computed_values():
    study = fake_study()
    table = mini_study.table_finetuning(study).splitlines()
    assert table[2] == "| DETR | start (pretrained) | 9.0 ± 1.0 | 18.0 ± 0.0 | 4.0 ± 0.0 | n/a | 1.0 ± 0.0 | " \
                       "2.0 ± 0.0 |"
    # raw's AP 10, 11, 12, 12, 9, 10: mean 10.67, sample std 1.21
    assert table[3].startswith("| DETR | raw | 10.7 ± 1.2 (-1.0) | 20.0 ± 0.0 (+0.0) | 6.0 ± 0.9 (+0.0) | n/a |")
    assert table[4].startswith("| DETR | raw, 3x learning rate (raw's best) | 11.7 ± 1.2 | 20.0 ± 0.0 | 6.0 ± 0.9 |")
    assert table[6].startswith("| DETR | DAP, constant matcher | 14.7 ± 1.6 (+3.0) |")

    paired = mini_study.table_paired(study).splitlines()
    assert len(paired) == 2 + 4  # every arm but raw's best
    assert paired[2] == "| DETR | raw | -1.0, -1.0 / -1.0, -1.0 / -1.0, -1.0 | -1.0 [-1.0, -1.0] | 0 of 6 | " \
                        "survives (below raw's best) |"
    # per pretraining seed 2, 3, 4 -> 3 [0.5, 5.5]
    assert paired[4] == "| DETR | DAP, constant matcher | +1.0, +3.0 / +2.0, +4.0 / +4.0, +4.0 | +3.0 [+0.5, +5.5] | " \
                        "6 of 6 | survives (above raw's best) |"
    # per pretraining seed 0.5, -1, 1.5: mean 0.33, s = 1.258, half-width 4.3027 * 1.258 / sqrt(3) = 3.126
    assert paired[5] == "| DETR | AP-Loss | +1.0, +0.0 / -1.0, -1.0 / +2.0, +1.0 | +0.3 [-2.8, +3.5] | 3 of 6 | " \
                        "does not survive (CI includes 0) |"
    # AP50 equal everywhere; AP75 = 5 + p in every arm
    secondary = mini_study.table_paired_ap50_ap75(study).splitlines()
    assert secondary[4] == "| DETR | DAP, constant matcher | +0.0 [+0.0, +0.0] | does not survive (CI includes 0) | " \
                           "+0.0 [+0.0, +0.0] | does not survive (CI includes 0) |"

    spread = mini_study.table_spread(study).splitlines()
    assert spread[0].startswith("| model | fine-tuning | AP per pretraining seed (0, 1, 2) |")
    assert spread[2] == "| DETR | start (pretrained) | 8.0, 9.0, 10.0 | 1.00 | 2.00 | — |"
    # raw 3x per pretraining seed: 11.5, 13, 10.5 (std 1.26, range 2.5); within: variances
    # 0.5, 0, 0.5 -> pooled std sqrt(1/3) = 0.58
    assert spread[4] == "| DETR | raw, 3x learning rate | 11.5, 13.0, 10.5 | 1.26 | 2.50 | 0.58 |"


def test_head_to_head_table_from_hand_computed_values():
    """DAP against each ranking loss present, and the AP-style arms against raw at 1x."""
    study = fake_study()
    assert mini_study.head_to_head_comparisons(study) == [("dap_constant", "ap"), ("dap_constant", "raw"),
                                                          ("ap", "raw")]
    table = mini_study.table_head_to_head(study).splitlines()
    assert len(table) == 2 + 3
    # dap - ap per pair 0, 3 / 3, 5 / 2, 3: per pretraining seed 1.5, 4, 2.5, mean 2.67, s 1.258,
    # half-width 3.126
    assert table[2] == "| DETR | DAP, constant matcher | AP-Loss | +0.0, +3.0 / +3.0, +5.0 / +2.0, +3.0 | " \
                       "+2.7 [-0.5, +5.8] | 5 of 6 | does not survive (CI includes 0) |"
    # dap - raw: per pretraining seed 3, 4, 5: mean 4, s 1, half-width 4.3027 / sqrt(3) = 2.484
    assert table[3] == "| DETR | DAP, constant matcher | raw | +2.0, +4.0 / +3.0, +5.0 / +5.0, +5.0 | " \
                       "+4.0 [+1.5, +6.5] | 6 of 6 | survives (above raw) |"
    assert table[4].startswith("| DETR | AP-Loss | raw | +2.0, +1.0 / +0.0, +0.0 / +3.0, +2.0 | +1.3 [-1.8, +4.5] | "
                               "4 of 6 |")
    # without a ranking loss or DAP arm there is nothing to compare (and no section)
    assert mini_study.head_to_head_comparisons(fake_study({k: OVER_BEST[k] for k in ("raw", "raw_lr3")})) == []


def test_method_text_names_the_units_of_the_interval():
    text = mini_study.method_text(fake_study())
    assert "averaged over the 2 fine-tuning seed(s) of each pretraining seed" in text
    assert "over those 3 per-pretraining-seed means (df = 2, t = 4.30)" in text


def test_ablation_table_has_one_column_pair_per_parameter():
    ablations = {(name, v): FakeRun([float(i), 0, 0, 0, 0, 0])
                 for name, (_, _, values) in mini_study.ABLATIONS.items() for i, v in enumerate(values)}
    table = mini_study.table_ablations(ablations).splitlines()
    assert table[0] == "| σ | AP | N | AP | batch size | AP |"
    assert table[2] == "| 0.01 | 0.0 | 4 | 0.0 | 2 | 0.0 |"
    assert table[6] == "| 0.2 | 4.0 | 64 | 4.0 |  |  |"
    assert len(table) == 2 + 5


# ----------------------------------------------------------------------------- stopped, rerun, run twice

class FakeMain:
    """main.main replaced by a run that writes at once what the study reads (log.txt: a line per
    call) and a checkpoint; keeps each call's args. With stop set, it ends as a kill would, once
    the checkpoint is written."""

    def __init__(self):
        self.calls, self.stop = [], False

    def __call__(self, args):
        self.calls.append(args)
        out = Path(args.output_dir)
        (out / "eval").mkdir(exist_ok=True)
        with open(out / "log.txt", "a") as log:
            log.write(json.dumps({"call": len(self.calls)}) + "\n")
        for name in ("iterations.jsonl", "eval/latest.pth", "checkpoint.pth"):
            (out / name).write_text("{}\n")
        if self.stop:
            raise KeyboardInterrupt


@pytest.fixture
def fake_main(monkeypatch):
    fake = FakeMain()
    monkeypatch.setattr(mini_study.detr_main, "main", fake)
    return fake


def tiny_plan(out):
    """The smoke study's runs in out (nothing run)."""
    return mini_study.plan(mini_study.PRESETS["smoke"], out, str(out / "data"), 6)


def full_disk(monkeypatch, prefix):
    """Path.write_text of files named prefix* fails as on a full disk: half the text written."""
    write_text = Path.write_text

    def write(path, text, *args, **kwargs):
        if not path.name.startswith(prefix):
            return write_text(path, text, *args, **kwargs)
        write_text(path, text[:len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", write)


def test_a_second_study_in_the_same_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(mini_study, "make_synthetic_coco", lambda *a, **k: pytest.fail("the second study started"))
    monkeypatch.setattr(sys, "argv", ["mini_study.py", "--smoke", "--out", str(tmp_path)])
    with mini_study.lock_study(tmp_path):
        with pytest.raises(UserInputError, match=f"^another study is running in {tmp_path} ") as refused:
            mini_study.main()
    assert "\n" not in str(refused.value) and not (tmp_path / "data.json").exists()
    with mini_study.lock_study(tmp_path):  # free again once the first study ends
        pass


def process_alive(pid):
    """Whether pid runs (a zombie, ended but not reaped yet, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_die_with_the_study():
    """A study killed with SIGKILL takes its busy workers along: none trains on into a folder a
    rerun starts over."""
    study = subprocess.Popen(
        [sys.executable, "-c", "import os, time\n"
                               "from scripts import mini_study\n"
                               "pool = mini_study.worker_pool(1)\n"
                               "print(pool.apply(os.getpid), flush=True)\n"
                               "pool.apply_async(time.sleep, (60,))\n"
                               "time.sleep(60)\n"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        line = study.stdout.readline()
        assert line, study.stderr.read()  # the study failed before its pool started
        worker = int(line)
        time.sleep(0.5)  # the worker is in time.sleep, as it would be in a training run
        study.kill()
        study.wait()
        deadline = time.time() + 10
        while process_alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_alive(worker)
    finally:
        study.kill()
        study.wait()
        if worker is not None and process_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_an_unreadable_run_json_is_rerun_not_a_crash(tmp_path, fake_main):
    run = tiny_plan(tmp_path).arms[("detr", "raw", 0, 0)]
    run.dir.mkdir(parents=True)
    for text in ("", '{"flags": ["--lr"'):  # what a full disk left before writes were atomic
        (run.dir / "run.json").write_text(text)
        assert not run.finished()
        mini_study.execute_all([run], jobs=1, threads=1)
        assert run.finished()
    assert len(fake_main.calls) == 2


def test_a_run_is_finished_only_with_the_outputs_the_study_reads(tmp_path, fake_main):
    study = tiny_plan(tmp_path)
    run, pretrain = study.arms[("detr", "raw", 0, 0)], study.pretrain[("detr", 0)]
    # what two studies writing one folder left: run.json alone
    run.dir.mkdir(parents=True)
    (run.dir / "run.json").write_text(json.dumps({"flags": run.flags, "seconds": 1.0}))
    assert not run.finished()
    mini_study.execute_all([run, pretrain], jobs=1, threads=1)
    assert run.finished() and pretrain.finished()
    assert not (run.dir / "checkpoint.pth").exists()
    (run.dir / "eval" / "latest.pth").unlink()
    assert not run.finished()
    (pretrain.dir / "checkpoint.pth").unlink()  # every fine-tuning run starts from it
    assert not pretrain.finished()


def test_data_json_and_run_json_are_never_left_half_written(tmp_path, monkeypatch, fake_main):
    data = mini_study.PRESETS["smoke"]["data"]
    with monkeypatch.context() as m:
        full_disk(m, "data.json")
        with pytest.raises((OSError, UserInputError), match="(?i)no space left"):
            mini_study.claim_data(tmp_path, data)
    assert not (tmp_path / "data.json").exists()
    mini_study.claim_data(tmp_path, data)  # not refused as "a study on other data"
    with pytest.raises(UserInputError, match="holds a study on other data"):
        mini_study.claim_data(tmp_path, dict(data, num_train=9))

    run = tiny_plan(tmp_path).arms[("detr", "raw", 0, 0)]
    with monkeypatch.context() as m:
        full_disk(m, "run.json")
        with pytest.raises((OSError, UserInputError), match="(?i)no space left"):
            mini_study.execute(run, threads=1)
    assert not (run.dir / "run.json").exists() and not run.finished()
    mini_study.execute_all([run], jobs=1, threads=1)
    assert run.finished()


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path, fake_main):
    study = tiny_plan(tmp_path)
    for run in (study.arms[("detr", "raw", 0, 0)], study.pretrain[("detr", 0)]):
        fake_main.stop = True
        with pytest.raises(KeyboardInterrupt):
            mini_study.execute(run, threads=1)
        assert not run.finished() and run.resumable()
        fake_main.stop = False
        mini_study.execute_all([run], jobs=1, threads=1)
        resumed, planned = vars(fake_main.calls[-1]), vars(mini_study.parse_flags(run.flags))
        # the checkpoint's whole training state instead of --finetune's weights; nothing else changed
        assert resumed["resume"] == str(run.dir / "checkpoint.pth") and resumed["finetune"] == ""
        assert {k for k in planned if planned[k] != resumed[k]} <= {"resume", "finetune"}
        assert run.finished() and len(run.rows()) == 2  # the stopped part's log is kept


def test_a_stopped_run_with_other_flags_starts_over(tmp_path, fake_main):
    run = tiny_plan(tmp_path).arms[("detr", "raw", 0, 0)]
    fake_main.stop = True
    with pytest.raises(KeyboardInterrupt):
        mini_study.execute(run, threads=1)
    other = mini_study.Run(run.dir, run.flags[:-2] + ["--lr", "1e-3"])
    assert not other.resumable()
    fake_main.stop = False
    mini_study.execute(other, threads=1)
    args = fake_main.calls[-1]
    assert (args.resume, args.finetune, args.lr) == ("", run.flags[run.flags.index("--finetune") + 1], 1e-3)
    assert len(other.rows()) == 1 and other.finished() and not run.finished()


def test_run_json_is_written_before_the_checkpoints_are_dropped(tmp_path, monkeypatch, fake_main):
    run = tiny_plan(tmp_path).arms[("detr", "raw", 0, 0)]
    unlink = Path.unlink

    def killed_at_checkpoints(path, *args, **kwargs):
        if path.name.startswith("checkpoint"):
            raise KeyboardInterrupt
        return unlink(path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", killed_at_checkpoints)
        with pytest.raises(KeyboardInterrupt):
            mini_study.execute(run, threads=1)
    assert run.finished()  # not trained again; the next call drops the checkpoint
    mini_study.execute_all([run], jobs=1, threads=1)
    assert len(fake_main.calls) == 1 and not (run.dir / "checkpoint.pth").exists()


# ----------------------------------------------------------------------------- the smoke study

def test_smoke_evaluates_every_arm_and_writes_the_tables_and_plots(smoke):
    study = smoke_study(smoke)
    assert set(study.arms) == {(m, a, p, 0) for m in MODELS for a in mini_study.ARMS for p in (0, 1)}
    for run in [*study.pretrain.values(), *study.arms.values()]:
        assert run.finished(), run.dir
        rows = run.rows()
        assert len(rows) == 1 and len(rows[0]["test_coco_eval_bbox"]) == 12
        assert (run.dir / "eval" / "latest.pth").is_file()
        # only the pretraining checkpoints stay (the fine-tuning ones would fill a disk)
        assert (run.dir / "checkpoint.pth").is_file() == (run in study.pretrain.values()), run.dir
    # the pretraining seed changes the checkpoint
    for m in MODELS:
        assert study.pretrain[(m, 0)].rows()[0]["train_loss"] != study.pretrain[(m, 1)].rows()[0]["train_loss"]
    # every arm trained with its own loss; one logged line per optimisation step (8 images,
    # batch 4, 1 epoch)
    own = {"dap_momentum": "loss_dap_unscaled", "dap_hungarian": "loss_dap_unscaled", "ap": "loss_ap_unscaled",
           "rs": "loss_rs_unscaled", "alrp": "loss_alrp_unscaled", "raw": "loss_ce_unscaled"}
    for arm, key in own.items():
        steps = study.arms[("deformable_detr", arm, 1, 0)].iterations()
        assert len(steps) == 2 and key in steps[0], arm
        assert (key == "loss_ce_unscaled") == ("loss_ce_unscaled" in steps[0]), arm
    assert "train_loss_dap" in study.arms[("detr", "dap_momentum", 0, 0)].rows()[0]

    results = (smoke / "results.md").read_text()
    plots = [line[line.index("(") + 1:-1] for line in results.splitlines() if line.startswith("![")]
    assert plots == ["pretrain.png", "detr_finetune_curves.png", "detr_precision_recall.png",
                     "deformable_detr_finetune_curves.png", "deformable_detr_precision_recall.png"]
    for name in plots:
        with Image.open(smoke / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()
    assert "Choosing the best of 3 on the same validation set" in results
    assert "over those 2 per-pretraining-seed means (df = 1, t = 12.71)" in results
    # the main table: a row per model and arm, plus the pretrained start
    section = results.split("## Fine-tuning arms")[1].split("## Paired")[0]
    rows = [line.split(" | ")[:2] for line in section.splitlines() if line.startswith(("| DETR", "| Deformable"))]
    labels = {m: ["start (pretrained)"] + [label + (" (raw's best)" if arm == mini_study.best_raw(study, m) else "")
                                           for arm, (label, *_) in mini_study.ARMS.items()] for m in MODELS}
    assert rows == [["| DETR", label] for label in labels["detr"]] + \
        [["| Deformable DETR", label] for label in labels["deformable_detr"]]
    # the paired table: every arm but raw's best, its numbers those of the runs
    section = results.split("## Paired differences to raw's best")[1].split("AP50 and AP75")[0]
    paired = [line for line in section.splitlines() if line.startswith(("| DETR", "| Deformable"))]
    assert len(paired) == 2 * (len(mini_study.ARMS) - 1)
    for m, title in zip(MODELS, ("DETR", "Deformable DETR")):
        best = mini_study.best_raw(study, m)
        for arm in ("dap_constant", "ap", "rs", "alrp"):
            s = mini_study.summarize_differences(mini_study.paired_differences(study, m, arm, best))
            assert s["n"] == 2 and s["ci"] is not None
            assert f"| {title} | {mini_study.ARMS[arm][0]} | " in section
            assert f" | {mini_study.interval(s)} | {s['better']} of 2 | {mini_study.verdict(s['ci'])} |" in section
    spread = results.split("## How much the absolute numbers move")[1].split("## Plots")[0]
    assert sum(line.startswith(("| DETR", "| Deformable")) for line in spread.splitlines()) == 2 * (1 + 10)
    start = study.start("detr")
    assert f"| DETR | start (pretrained) | {start[0]:.1f}, {start[1]:.1f} |" in spread


def test_same_seed_same_numbers_other_seed_other_order(smoke, tmp_path):
    study = smoke_study(smoke)
    for run in (study.pretrain[("detr", 1)], study.arms[("detr", "dap_momentum", 1, 0)],
                study.arms[("deformable_detr", "rs", 0, 0)]):
        again = mini_study.Run(tmp_path / run.dir.name, run.flags[:-2])
        mini_study.execute(again, threads=1)
        assert again.rows() == run.rows(), run.dir  # every logged loss and COCO number
    raw = study.arms[("detr", "raw", 0, 0)]
    assert raw.flags[-4:-2] == ["--seed", "0"]
    other = mini_study.Run(tmp_path / "seed1", raw.flags[:-4] + ["--seed", "1"])
    mini_study.execute(other, threads=1)
    assert other.rows()[0]["train_loss"] != raw.rows()[0]["train_loss"]


def test_finished_runs_are_reused_only_with_the_same_flags(smoke):
    run = smoke_study(smoke).pretrain[("detr", 0)]
    assert run.finished()
    assert not mini_study.Run(run.dir, run.flags[:-2] + ["--lr", "1e-3"]).finished()
    assert run.seconds() > 0
    assert math.isfinite(run.coco()[0])


def test_a_killed_fine_tuning_run_resumes_with_main_py_to_the_same_numbers(smoke, tmp_path, monkeypatch):
    flags = smoke_study(smoke).arms[("detr", "raw", 0, 0)].flags[:-2] + ["--epochs", "2"]
    whole = mini_study.Run(tmp_path / "whole", flags)
    mini_study.execute(whole, threads=1)
    stopped = mini_study.Run(tmp_path / "stopped", flags)
    save_epoch = mini_study.detr_main.save_epoch

    def killed_after_the_first_epoch(output_dir, epoch, *args):
        save_epoch(output_dir, epoch, *args)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(mini_study.detr_main, "save_epoch", killed_after_the_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            mini_study.execute(stopped, threads=1)
    assert len(stopped.rows()) == 1 and stopped.resumable()
    mini_study.execute(stopped, threads=1)
    assert "Resumed from" in (stopped.dir / "stdout.txt").read_text()
    assert stopped.finished() and stopped.rows() == whole.rows()
    assert stopped.iterations() == whole.iterations()
