"""configs/, scripts/reproduce.py and scripts/table1.py: every config is the paper's recipe and
becomes flags main.py accepts; the batch is split over GPUs and accumulation steps; one config
per detector family runs end to end on the synthetic dataset, continues from its checkpoint when
run again, and lands in the results table."""
import argparse
import glob
import json
import os

import pytest

import main as detr_main
from scripts import reproduce, table1
from util.errors import UserInputError

from conftest import REPO, TINY_DETR_FLAGS

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.toml")))
NAMES = [os.path.basename(p)[:-len(".toml")] for p in CONFIGS]
# The paper's total batch (the paper's experiments section) and the baseline learning rates (upstream).
TOTAL_BATCH = {("detr", "resnet50"): 56, ("detr", "resnet101"): 40, ("deformable_detr", "resnet50"): 24,
               ("rtdetr", "presnet50vd"): 56}
BASELINE_LR = {"detr": (1e-4, 1e-5), "deformable_detr": (2e-4, 2e-5), "rtdetr": (1e-4, 1e-5)}
# Flags a smoke run adds to a config (after it, so they win): a model small enough for a CPU.
SMOKE_FLAGS = {
    "detr": TINY_DETR_FLAGS,
    "deformable_detr": TINY_DETR_FLAGS + ["--enc_n_points", "2", "--dec_n_points", "2"],
    "rtdetr": TINY_DETR_FLAGS + ["--backbone", "presnet18vd", "--num_queries", "16", "--num_denoising", "8"],
}


def main_parser():
    return argparse.ArgumentParser(parents=[detr_main.get_args_parser()])


def missing_in_main(argv):
    """Flags (and --model values) of argv that main.py's parser does not know yet."""
    parser = main_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    missing = [a for a in argv if a.startswith("--") and a not in known]
    model_choices = next(a.choices for a in parser._actions if "--model" in a.option_strings)
    if "--model" in argv and argv[argv.index("--model") + 1] not in model_choices:
        missing.append(f"--model {argv[argv.index('--model') + 1]}")
    return missing


def skip_unless_main_accepts(argv):
    missing = missing_in_main(argv)
    if missing:
        pytest.skip(f"main.py does not accept {', '.join(missing)} yet (flags of the launcher contract)")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Stand-ins for the checkpoints that configs name by file only (Deformable DETR's are on
    Google Drive, so they are looked up in --checkpoint_dir)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    for path in CONFIGS:
        flags = reproduce.load_config(path)["flags"]
        for value in (flags.get("finetune"), flags.get("resume")):
            if value and "/" not in value:
                (folder / value).write_bytes(b"")
    return str(folder)


def flags_for(name, checkpoint_dir, world_size=8):
    """The config's flags for its first run on world_size GPUs, as scripts/reproduce.py builds them."""
    config = reproduce.load_config(os.path.join(REPO, "configs", f"{name}.toml"))
    _, flags = reproduce.sweep_points(config)[0]
    return config, reproduce.run_flags(flags, config["launch"], world_size=world_size, coco_path="/data/coco",
                                       output_dir=f"/nonexistent/{name}", checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_the_papers_recipe(name, checkpoint_dir):
    config, flags = flags_for(name, checkpoint_dir)
    model = flags["model"]
    if flags.get("eval"):  # a released checkpoint, evaluated as it is
        assert flags["resume"] and "finetune" not in flags and "total_batch_size" not in flags
        return
    swept = set(config["sweep"])
    expected = dict(total_batch_size=64 if "scratch" in name else TOTAL_BATCH[model, flags["backbone"]],
                    accum_iter=1)  # the paper's batch fits 8 GPUs at max_batch_per_gpu
    lr, lr_backbone = BASELINE_LR[model]
    if "scratch" in name:  # Table 3: the baseline recipe, from ImageNet weights
        assert "finetune" not in flags
        expected.update(lr=lr, lr_backbone=lr_backbone, epochs=150, lr_drop=100)
    elif name.endswith("_lr10"):  # the arena's control: fine-tuning at the baseline's learning rates
        assert flags["finetune"] and flags["loss"] == "raw"
        expected.update(lr=lr, lr_backbone=lr_backbone, epochs=12, lr_drop=7)
    else:
        assert flags["finetune"]
        expected.update(lr=lr / 10, lr_backbone=lr_backbone / 10, epochs=12, lr_drop=7)
    if flags["loss"] in ("dap", "raw+dap"):
        expected.update(dap_sigma=0.05, dap_num_gt=256, dap_bins=32)
    if flags["loss"] in ("ap", "alrp", "rs"):  # the arena: the upstream matcher, the loss's own delta
        expected.update(matcher="hungarian")
        assert "rank_delta" not in flags
    if flags["loss"] in ("dap", "ap", "alrp", "rs") and model == "rtdetr":
        expected.update(no_iou_aware_query_selection=True)
    for key, value in expected.items():
        if key not in swept:
            assert flags[key] == pytest.approx(value), key
    argv = reproduce.to_argv(flags)
    assert argv[argv.index("--output_dir") + 1] == f"/nonexistent/{name}"


@pytest.mark.parametrize("name", NAMES)
def test_config_flags_parse_with_main(name, checkpoint_dir):
    _, flags = flags_for(name, checkpoint_dir, world_size=4)
    argv = reproduce.to_argv(flags)
    skip_unless_main_accepts(argv)
    args = main_parser().parse_args(argv)
    negated = {"no_aux_loss": "aux_loss", "no_iou_aware_query_selection": "iou_aware_query_selection"}
    for key, value in flags.items():
        if key in negated:
            assert getattr(args, negated[key]) is (not value), key
        else:
            assert getattr(args, key) == pytest.approx(value), key


def test_batch_split_over_gpus_and_accumulation(checkpoint_dir):
    assert reproduce.split_batch(56, 8, 7) == (7, 1)
    assert reproduce.split_batch(56, 4, 7) == (7, 2)
    assert reproduce.split_batch(56, 1, 7) == (7, 8)
    assert reproduce.split_batch(56, 2, 4) == (4, 7)   # 28 per GPU: the largest divisor <= 4
    assert reproduce.split_batch(40, 8, 5) == (5, 1)
    assert reproduce.split_batch(24, 4, 3) == (3, 2)
    with pytest.raises(UserInputError, match=r"does not split evenly over 16.*\[1, 2, 4, 7, 8, 14, 28, 56\]"):
        reproduce.split_batch(56, 16, 7)
    _, flags = flags_for("detr_r50_dap", checkpoint_dir, world_size=4)
    assert (flags["total_batch_size"], flags["accum_iter"]) == (56, 2)


def test_sweeps_and_overrides():
    config = reproduce.load_config(os.path.join(REPO, "configs", "ablation_sigma.toml"))
    points = reproduce.sweep_points(config)
    assert [p for p, _ in points] == ["dap_sigma=0.01", "dap_sigma=0.025", "dap_sigma=0.05", "dap_sigma=0.1",
                                      "dap_sigma=0.2"]
    assert [f["dap_sigma"] for _, f in points] == [0.01, 0.025, 0.05, 0.1, 0.2]
    reproduce.apply_overrides(config, ["dap_sigma=0.1", "epochs=3", "max_batch_per_gpu=2", 'model="detr"'])
    assert reproduce.sweep_points(config) == [("dap_sigma=0.1", {**config["flags"], "dap_sigma": 0.1})]
    assert config["flags"]["epochs"] == 3 and config["launch"]["max_batch_per_gpu"] == 2
    assert reproduce.parse_value("1e-5") == 1e-5 and reproduce.parse_value("/a/b.pth") == "/a/b.pth"
    with pytest.raises(UserInputError, match="set by the launcher"):
        reproduce.apply_overrides(config, ["output_dir=/x"])
    assert reproduce.to_argv({"eval": True, "sgd": False, "finetune": "", "lr_backbone_names": ["a", "b"],
                              "lr": 1e-5}) == ["--eval", "--lr_backbone_names", "a", "b", "--lr", "1e-05"]


def test_false_turns_a_flag_off():
    """`KEY = false` for a flag that is on by default becomes its off form: RT-DETR's EMA, the
    auxiliary losses, TensorBoard (they were dropped, and stayed on); `true` of an off form or of
    the setting it stores turns the flag on; a false that leaving the flag out gives is left out."""
    flags = {"model": "rtdetr", "ema": False, "aux_loss": False, "tensorboard": False, "sgd": False,
             "no_iou_aware_query_selection": True, "multi_scale": True, "no_aux_loss": False}
    argv = reproduce.to_argv(flags)
    assert argv == ["--model", "rtdetr", "--no_ema", "--no_aux_loss", "--no_tensorboard",
                    "--no_iou_aware_query_selection"]
    args = main_parser().parse_args(argv)
    assert (args.ema, args.aux_loss, args.tensorboard, args.sgd, args.iou_aware_query_selection,
            args.multi_scale) == (False, False, False, False, False, True)
    assert main_parser().parse_args(["--model", "rtdetr"]).ema is True  # what the dropped entry left on
    assert reproduce.to_argv({"model": "detr", "ema": True, "eval": True}) == ["--model", "detr", "--ema", "--eval"]


def test_false_that_no_flag_expresses_is_refused():
    """A switch that is on by default with no off form: `KEY = false` cannot be honoured, and
    leaving it out would keep it on. main.py has none today; a parser with one shows the rule."""
    parser = reproduce.RefusingParser(add_help=False)
    parser.add_argument("--model", default="detr")
    parser.add_argument("--flip", action="store_true", default=True)
    parser.add_argument("--no_flop", dest="flop", action="store_false", default=False)
    assert reproduce.to_argv({"flip": True}, parser) == ["--flip"]
    with pytest.raises(UserInputError, match=r"^no main.py flag sets flip to False \(its default for --model detr "
                                             r"is True\); remove the entry$"):
        reproduce.to_argv({"flip": False}, parser)
    with pytest.raises(UserInputError, match="no main.py flag sets flop to True"):
        reproduce.to_argv({"flop": True}, parser)
    with pytest.raises(UserInputError, match="x.toml, entry flip: no main.py flag sets flip to False"):
        reproduce.check_entries({"flip": False}, lambda key: f"x.toml, entry {key}", parser)


def refusal(argv, capsys):
    """reproduce.main(argv)'s exit status 2 and its one line, nothing on stdout."""
    assert reproduce.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_bad_entries_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    """An unknown key, a value out of range, a false for a flag that takes a value, an upstream
    flag dap-detr does not implement, max_batch_per_gpu 0, bad flags after --: one line naming the
    config file (or the --set) and the key, where argparse printed its usage, or split_batch
    raised StopIteration; no run starts, not even the sweep's first, valid point."""
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd: pytest.fail(f"ran {cmd}"))
    typo = tmp_path / "typo.toml"
    typo.write_text('[flags]\nmodel = "detr"\ndap_sigmaa = 0.1\n')
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[flags]\nmodel = "detr"\nloss = "dap"\n[sweep]\ndap_sigma = [0.1, 0]\n')
    base = ["--coco_path", str(tmp_path), "--output_root", str(tmp_path / "out"), "--gpus", "1"]
    dap = [os.path.join(REPO, "configs", "detr_r50_dap.toml"), *base]
    cases = [
        ([str(typo), *base], f"{typo}, entry dap_sigmaa: main.py has no flag --dap_sigmaa (did you mean dap_sigma?)"),
        ([str(sweep), *base], f"{sweep}, entry dap_sigma: argument --dap_sigma: must be greater than 0, got '0'"),
        ([*dap, "--set", "dap_sigma=0"], "--set dap_sigma=0: argument --dap_sigma: must be greater than 0, got '0'"),
        ([*dap, "--set", "dap_sigmaa=0.1"], "--set dap_sigmaa=0.1: main.py has no flag --dap_sigmaa"),
        ([*dap, "--set", "dap_sig=0.1"], "--set dap_sig=0.1: main.py has no flag --dap_sig"),  # no abbreviations
        ([*dap, "--set", "lr=false"], "--set lr=false: --lr is not an on/off flag"),
        ([*dap, "--set", "masks=true"], "--set masks=true: --masks is not supported by dap-detr"),
        ([*dap, "--set", "max_batch_per_gpu=0"], "--set max_batch_per_gpu=0: must be a positive integer"),
        ([*dap, "--", "--dap_bins", "0"], f"{dap[0]} with the flags after --: argument --dap_bins: must be"),
        ([*dap, "--slurm", "--", "--ngpus", "0"], f"{dap[0]} with the flags after --: argument --ngpus:"),
    ]
    for argv, expected in cases:
        try:
            err = refusal(argv, capsys)
        except SystemExit:  # argparse's usage and exit (the defect)
            pytest.fail(f"{argv}: argparse's usage instead of one line: {capsys.readouterr().err[-300:]}")
        assert err.startswith(f"error: {expected}"), (argv, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # the script's own options: main.py's one-line parser
        reproduce.main([*dap, "--gpus", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: argument --gpus: invalid int value: 'x'; see --help\n"


def test_checkpoint_resolution(tmp_path):
    url = "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
    assert reproduce.resolve_checkpoint(url, None) == url
    assert reproduce.resolve_checkpoint(url, str(tmp_path)) == url  # not downloaded: torch.hub fetches it
    corrupt = tmp_path / "detr-r50-e632da11.pth"
    corrupt.write_bytes(b"not the checkpoint")
    with pytest.raises(UserInputError, match="corrupt"):
        reproduce.resolve_checkpoint(url, str(tmp_path))
    # A file whose name carries the right SHA-256 prefix is used in place of the URL.
    import hashlib
    data = b"weights"
    good = tmp_path / f"model-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    assert reproduce.resolve_checkpoint(f"https://x/{good.name}", str(tmp_path)) == str(good)
    assert reproduce.resolve_checkpoint(good.name, str(tmp_path)) == str(good)
    with pytest.raises(UserInputError, match="not found"):
        reproduce.resolve_checkpoint("r50_deformable_detr-checkpoint.pth", str(tmp_path))


def test_command_lines(capsys, tmp_path):
    """--dry_run prints torchrun for several local GPUs, run_with_submitit.py with --slurm."""
    skip_unless_main_accepts(["--total_batch_size", "--accum_iter"])
    base = [os.path.join(REPO, "configs", "detr_r50_dap.toml"), "--coco_path", "/data/coco",
            "--output_root", str(tmp_path), "--dry_run"]
    assert reproduce.main(base + ["--gpus", "4", "--", "--num_workers", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "--nproc_per_node=4" in out[0] and "--accum_iter 2" in out[0]
    assert out[0].endswith(f"--output_dir {tmp_path}/detr_r50_dap --num_workers 4")
    assert reproduce.main(base + ["--gpus", "2", "--nodes", "2", "--slurm", "--", "--partition", "gpu"]) == 0
    cmd = capsys.readouterr().out.strip()
    assert "run_with_submitit.py --ngpus 2 --nodes 2" in cmd and "--accum_iter 2" in cmd
    assert "--finetune https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth" in cmd
    assert cmd.endswith("--partition gpu")
    assert reproduce.main(base + ["--gpus", "3"]) == 2
    assert "does not split evenly over 3" in capsys.readouterr().err
    assert reproduce.main(base + ["--nodes", "2", "--gpus", "8"]) == 2
    assert "needs --slurm" in capsys.readouterr().err


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


def smoke(config, synthetic_coco, root, family, *sets):
    """scripts/reproduce.py CONFIG on one CPU process with a tiny model: --set overrides, and the
    model flags after `--`."""
    path, num_classes = synthetic_coco
    argv = [os.path.join(REPO, "configs", f"{config}.toml"), "--coco_path", path, "--output_root", str(root),
            "--gpus", "1", *[a for s in sets for a in ("--set", s)],
            "--", *SMOKE_FLAGS[family], "--num_classes", str(num_classes)]
    return reproduce.main(argv)


# A fine-tuning config on the CPU: 4 images per step as 2 x 2 accumulation steps, from scratch.
SMALL_BATCH = ("total_batch_size=4", "max_batch_per_gpu=2", "finetune=")


def test_detr_rows_end_to_end(synthetic_coco, tmp_path, capfd, checkpoint_dir):
    """Fine-tune config (2 images x 2 accumulation steps), continued when run again, then the
    eval config on its checkpoint; both rows show up in Table 1 with the paper's numbers."""
    _, flags = flags_for("detr_r50_dap", checkpoint_dir)
    skip_unless_main_accepts(reproduce.to_argv(flags))
    run_dir = tmp_path / "detr_r50_dap"
    assert smoke("detr_r50_dap", synthetic_coco, tmp_path, "detr", *SMALL_BATCH, "epochs=1") == 0
    assert [r["epoch"] for r in read_log(run_dir)] == [0]
    assert smoke("detr_r50_dap", synthetic_coco, tmp_path, "detr", *SMALL_BATCH, "epochs=2") == 0
    assert [r["epoch"] for r in read_log(run_dir)] == [0, 1]
    assert "continuing at epoch 1" in capfd.readouterr().out
    assert "train_loss_dap" in read_log(run_dir)[-1]

    checkpoint = run_dir / "checkpoint.pth"
    assert smoke("detr_r50_eval", synthetic_coco, tmp_path, "detr", f'resume="{checkpoint}"') == 0
    with open(tmp_path / "detr_r50_eval" / "eval_stats.json") as f:
        evaluated = json.load(f)["test_coco_eval_bbox"]
    assert evaluated == pytest.approx(read_log(run_dir)[-1]["test_coco_eval_bbox"], abs=1e-9)

    text = table1.tables(tmp_path, os.path.join(REPO, "configs"))
    ap = 100 * read_log(run_dir)[-1]["test_coco_eval_bbox"][0]
    row = next(line for line in text.splitlines() if "`detr_r50_dap`" in line and "DETR R50, DAP" in line)
    assert f"| {ap:.1f} (43.4, {ap - 43.4:+.1f}) |" in row and row.endswith("| epoch 2/12 |")
    row = next(line for line in text.splitlines() if "`detr_r50_eval`" in line)
    assert f"{100 * evaluated[0]:.1f} (42.0, " in row and row.endswith("| evaluated |")
    assert "| DETR R101, DAP (`detr_r101_dap`) | — (44.9) | — (64.3) | — (48.0) | not run |" in text


@pytest.mark.parametrize("family, config", [("deformable_detr", "deformable_r50_dap"),
                                            ("rtdetr", "rtdetr_r50_noiou_dap")])
def test_other_families_run(family, config, synthetic_coco, tmp_path, checkpoint_dir):
    _, flags = flags_for(config, checkpoint_dir)
    skip_unless_main_accepts(reproduce.to_argv(flags))
    assert smoke(config, synthetic_coco, tmp_path, family, *SMALL_BATCH, "epochs=1") == 0
    log = read_log(tmp_path / config)
    assert [r["epoch"] for r in log] == [0] and len(log[0]["test_coco_eval_bbox"]) == 12


def test_table_reads_logs_and_marks_progress(tmp_path):
    def write_log(folder, epochs, ap):
        os.makedirs(folder)
        with open(os.path.join(folder, "log.txt"), "w") as f:
            for e in range(epochs):
                f.write(json.dumps({"epoch": e, "test_coco_eval_bbox": [ap + e / 100, 0.6, 0.45] + [0] * 9}) + "\n")

    write_log(tmp_path / "detr_r50_raw", 12, 0.3100)      # last epoch: AP 0.4200
    write_log(tmp_path / "detr_r101_dap", 3, 0.4000)
    write_log(tmp_path / "ablation_bins" / "dap_bins=16", 12, 0.3000)
    os.makedirs(tmp_path / "detr_r50_dap")
    text = table1.tables(tmp_path, os.path.join(REPO, "configs"))
    lines = text.splitlines()
    assert "| DETR R50, raw (`detr_r50_raw`) | 42.0 (42.2, -0.2) | 60.0 (62.5, -2.5) | 45.0 (44.6, +0.4) | done |" \
        in lines
    assert any(line.startswith("| DETR R101, DAP (`detr_r101_dap`) | 42.0 (44.9, -2.9) |") and
               line.endswith("| epoch 3/12 |") for line in lines)
    assert any("(`detr_r50_dap`)" in line and line.endswith("| started |") for line in lines)
    assert "| dap_bins=16 | 41.0 | 60.0 | 45.0 | done |" in lines
    assert "| dap_bins=8 | — | — | — | not run |" in lines
    assert "| raw (`detr_r50_scratch_raw`) | — (39.5) | — | — | not run |" in lines
