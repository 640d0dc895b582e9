"""main.py: its parser under every way of using it (each family's defaults), and end to end on
the synthetic dataset: train -> checkpoint -> resume -> evaluate, fine-tuning from a checkpoint,
bad input, and 2-process gloo training against 1 process."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import main as detr_main
import run_with_submitit
from models import FAMILIES
from util.checkpoint import load_checkpoint

from conftest import REPO, data_flags, parse, run


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def test_parser_keeps_upstream_defaults():
    args = parse([])
    upstream = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=300, lr_drop=200,
                    clip_max_norm=0.1, backbone="resnet50", dilation=False, position_embedding="sine",
                    enc_layers=6, dec_layers=6, dim_feedforward=2048, hidden_dim=256, dropout=0.1, nheads=8,
                    num_queries=100, pre_norm=False, aux_loss=True, set_cost_class=1,
                    set_cost_bbox=5, set_cost_giou=2, bbox_loss_coef=5,
                    giou_loss_coef=2, eos_coef=0.1, dataset_file="coco", coco_path=None, output_dir="",
                    device="cuda", seed=42, resume="", start_epoch=0, eval=False, num_workers=2,
                    world_size=1, dist_url="env://")
    for name, value in upstream.items():
        assert getattr(args, name) == value, name
        assert type(getattr(args, name)) is type(value), name  # plain values, no placeholder left
    assert detr_main.get_args_parser().add_help is False
    # Upstream flags of features not implemented here leave no attribute behind.
    assert not {"masks", "frozen_weights", "mask_loss_coef", "remove_difficult", "cache_mode"} & set(vars(args))


def family_defaults(name):
    """Every flag's default for a family, from its recipe (the parser's own defaults elsewhere)."""
    base = vars(parse([]))
    return {**base, "model": name, **FAMILIES[name].defaults}


def launcher_parse(flags):
    return run_with_submitit.get_launcher_parser().parse_args(flags)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("parse_flags", [parse, detr_main.get_args_parser().parse_args, launcher_parse],
                         ids=["child_parser", "own_parser", "submitit_launcher"])
def test_every_idiom_gives_each_family_its_defaults(name, parse_flags):
    expected = family_defaults(name)
    args = vars(parse_flags(["--model", name]))
    assert {k: args[k] for k in expected} == expected
    if name == "rtdetr":  # the example: RT-DETR's architecture and schedule
        assert (args["enc_layers"], args["dim_feedforward"], args["num_queries"], args["dropout"], args["epochs"],
                args["ema"], args["backbone"]) == (1, 1024, 300, 0.0, 72, True, "presnet50vd")


def test_one_parser_object_reused_for_several_families():
    parser = argparse.ArgumentParser("x", parents=[detr_main.get_args_parser()])
    for name in ["rtdetr", "detr", "deformable_detr", "rtdetr", "detr"]:
        args = vars(parser.parse_args(["--model", name]))
        assert {k: args[k] for k in family_defaults(name)} == family_defaults(name), name
    assert parser.parse_args([]).backbone == "resnet50"  # not RT-DETR's, although parsed before


def test_flags_given_override_the_family_defaults_before_or_after_model():
    for flags in (["--num_queries", "100", "--no_ema", "--model", "rtdetr"],
                  ["--model", "rtdetr", "--num_queries", "100", "--no_ema"]):
        args = parse(flags)
        assert args.num_queries == 100 and args.ema is False and args.enc_layers == 1
    args = parse(["--lr_backbone_names", "body", "stem", "--model", "deformable_detr"])
    assert args.lr_backbone_names == ["body", "stem"] and args.lr == 2e-4


def test_help_shows_each_familys_default():
    text = " ".join(detr_main.get_args_parser().format_help().split())
    assert "default 300; deformable_detr: 50, rtdetr: 72" in text  # --epochs
    assert "default False; rtdetr: True" in text  # --ema
    assert "[model]" not in text


@pytest.mark.parametrize("flag", ["--masks", "--frozen_weights x.pth", "--mask_loss_coef 1", "--dice_loss_coef 1",
                                  "--coco_panoptic_path p", "--remove_difficult", "--position_embedding_scale 6",
                                  "--lr_drop_epochs 3 4", "--cache_mode"])
def test_unsupported_upstream_flags_are_one_line_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(flag.split())
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: {flag.split()[0]} is not supported by dap-detr") and "drop the flag" in err


def test_train_checkpoint_resume_eval(synthetic_coco, tmp_path):
    flags = data_flags(synthetic_coco) + ["--lr_drop", "2"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")

    run(flags + ["--output_dir", straight, "--epochs", "3"])
    log = read_log(straight)
    assert [row["epoch"] for row in log] == [0, 1, 2]
    for row in log:
        assert len(row["test_coco_eval_bbox"]) == 12 and row["n_parameters"] > 0
        assert all(key in row for key in ("train_loss", "train_loss_ce", "train_loss_bbox_unscaled",
                                          "train_class_error", "test_loss", "train_lr"))
    # checkpoint.pth every epoch; checkpoint0001.pth before the lr drop at epoch 2
    # (and the folder's lock, util/output_dir.py)
    assert sorted(os.listdir(straight)) == [".lock", "checkpoint.pth", "checkpoint0001.pth", "eval", "log.txt", "tb"]
    ckpt = load_checkpoint(os.path.join(straight, "checkpoint.pth"))
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "args", "matcher", "steps_done"}
    assert ckpt["epoch"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # dropped once

    # Interrupted after 2 epochs, then resumed: the same weights as the uninterrupted run.
    run(flags + ["--output_dir", interrupted, "--epochs", "2"])
    run(flags + ["--output_dir", interrupted, "--epochs", "3",
                 "--resume", os.path.join(interrupted, "checkpoint.pth")])
    assert [row["epoch"] for row in read_log(interrupted)] == [0, 1, 2]
    resumed = load_checkpoint(os.path.join(interrupted, "checkpoint.pth"))
    for key, value in ckpt["model"].items():
        assert torch.equal(value, resumed["model"][key]), key

    # --eval of the final checkpoint reproduces the last logged evaluation.
    eval_dir = str(tmp_path / "eval")
    stats = run(flags + ["--output_dir", eval_dir, "--eval", "--resume", os.path.join(straight, "checkpoint.pth")])
    assert stats["coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-9)
    saved = torch.load(os.path.join(eval_dir, "eval.pth"), weights_only=True)
    assert saved["precision"].shape[0] == 10  # ten IoU thresholds


def test_eval_of_an_ema_checkpoint_evaluates_what_training_evaluated(synthetic_coco, tmp_path, capsys):
    """A run trained with --ema logs the evaluations of the average: --eval --ema reproduces them;
    without --ema the raw weights are evaluated, and a note says so."""
    flags = data_flags(synthetic_coco) + ["--ema", "--ema_decay", "0.5", "--ema_warmups", "1", "--lr", "1e-3"]
    trained = str(tmp_path / "trained")
    run(flags + ["--output_dir", trained, "--epochs", "1"])
    logged = read_log(trained)[-1]["test_coco_eval_bbox"]
    checkpoint = os.path.join(trained, "checkpoint.pth")
    capsys.readouterr()
    averaged = run(flags + ["--output_dir", str(tmp_path / "a"), "--eval", "--resume", checkpoint])
    assert averaged["coco_eval_bbox"] == pytest.approx(logged, abs=1e-9)
    assert "Note: evaluating" not in capsys.readouterr().out
    raw = run(data_flags(synthetic_coco) + ["--output_dir", str(tmp_path / "b"), "--eval", "--resume", checkpoint])
    assert "Note: evaluating the weights of" in capsys.readouterr().out
    assert raw["loss"] != averaged["loss"]  # the raw weights, not the average


@pytest.mark.parametrize("dies_in", ["evaluate", "save_checkpoint"])
def test_a_job_killed_mid_epoch_logs_every_epoch_once(dies_in, synthetic_coco, tmp_path, monkeypatch):
    """Killed during epoch 1's evaluation (nothing logged yet) or between its log line and its
    checkpoint: after --resume, log.txt holds every epoch exactly once."""
    flags = data_flags(synthetic_coco) + ["--output_dir", str(tmp_path), "--epochs", "3"]
    real = getattr(detr_main, dies_in)
    calls = {"n": 0}

    def dies_on_epoch_1(*args, **kwargs):
        epoch = kwargs.get("epoch")  # save_checkpoint's, by name
        calls["n"] += 1
        if (dies_in == "save_checkpoint" and epoch == 1) or (dies_in == "evaluate" and calls["n"] == 2):
            raise KeyboardInterrupt("job killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(detr_main, dies_in, dies_on_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(flags)
    monkeypatch.setattr(detr_main, dies_in, real)
    run(flags + ["--resume", str(tmp_path / "checkpoint.pth")])
    assert [row["epoch"] for row in read_log(str(tmp_path))] == [0, 1, 2]


def test_finetune_loads_weights_only(synthetic_coco, tmp_path):
    flags = data_flags(synthetic_coco)
    source = str(tmp_path / "source")
    run(flags + ["--output_dir", source, "--epochs", "1"])
    ckpt = os.path.join(source, "checkpoint.pth")

    target = str(tmp_path / "target")
    run(flags + ["--output_dir", target, "--epochs", "1", "--finetune", ckpt, "--lr", "0", "--lr_backbone", "0"])
    # Weights came from the source (lr 0 keeps them), but training restarted at epoch 0.
    assert read_log(target)[0]["epoch"] == 0
    before = load_checkpoint(ckpt)["model"]
    after = load_checkpoint(os.path.join(target, "checkpoint.pth"))["model"]
    for key in before:
        assert torch.equal(before[key], after[key]), key

    # Another number of classes: refused with a hint, accepted with --finetune_drop_class_head.
    other = flags[:flags.index("--num_classes")] + ["--num_classes", "30"] + flags[flags.index("--num_classes") + 2:]
    with pytest.raises(detr_main.UserInputError, match="finetune_drop_class_head"):
        run(other + ["--epochs", "1", "--finetune", ckpt])
    run(other + ["--output_dir", str(tmp_path / "new_head"), "--epochs", "1", "--finetune", ckpt,
                 "--finetune_drop_class_head"])


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        detr_main.run_cli(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def test_a_gpu_index_the_machine_does_not_have_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    detr_main.check_args(parse(["--device", "cuda:1"]))
    with pytest.raises(detr_main.UserInputError, match=r"cuda:2, but this machine has 2 GPU\(s\), cuda:0..cuda:1"):
        detr_main.check_args(parse(["--device", "cuda:2"]))
    # a job checked for its GPU node (run_with_submitit) is not held to this machine's count
    detr_main.check_args(parse(["--device", "cuda:2"]), cuda_available=True)


@pytest.mark.parametrize("case", ["no_coco_dir", "no_annotations", "missing_ckpt", "ckpt_misfit", "cuda"])
def test_bad_input_is_one_clear_line(case, synthetic_coco, tmp_path, capsys):
    flags = data_flags(synthetic_coco) + ["--epochs", "1"]
    coco = synthetic_coco[0]
    if case == "no_coco_dir":
        flags += ["--coco_path", str(tmp_path / "nowhere")]
        expected = "nowhere"
    elif case == "no_annotations":
        broken = tmp_path / "coco"
        (broken / "train2017").mkdir(parents=True)
        (broken / "val2017").mkdir()
        flags += ["--coco_path", str(broken)]
        expected = "instances_train2017.json"
    elif case == "missing_ckpt":
        flags += ["--finetune", str(tmp_path / "absent.pth")]
        expected = "absent.pth"
    elif case == "ckpt_misfit":
        wrong = str(tmp_path / "wrong")
        run(flags + ["--output_dir", wrong, "--hidden_dim", "16"])
        flags += ["--resume", os.path.join(wrong, "checkpoint.pth")]
        expected = "shape mismatch"
    else:
        flags += ["--device", "cuda"]
        expected = "CUDA is not available"
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    code, err = run_cli(flags, capsys)
    assert code == 2
    assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert os.path.isdir(coco)


def test_cli_error_exits_without_traceback(tmp_path):
    """The real command line: a missing checkpoint gives one line on stderr and exit status 2."""
    proc = subprocess.run(
        [sys.executable, "main.py", "--device", "cpu", "--eval", "--resume", str(tmp_path / "none.pth"),
         "--coco_path", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("loss_flags", [
    [], ["--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum", "--dap_num_gt", "0"]])
def test_two_gloo_processes_and_accumulation_match_one_batch(tmp_path, loss_flags):
    """The same global batch of 4 images as 1 process x 4, torchrun with 2 CPU processes x 2, and
    1 process x 2 images x 2 accumulation steps: the same logged losses and the same weights,
    with the upstream losses and with DAP (whose precision is that of the global batch, and
    whose momentum matcher moves once per step, however the batch is split).

    Four training images, so each epoch is one optimisation step holding all of them in every
    run; dropout and augmentation are off so all runs see identical inputs. The val set is
    split across ranks and merged for COCO evaluation."""
    from datasets.synthetic import make_synthetic_coco
    info = make_synthetic_coco(str(tmp_path / "data"), num_train=4, num_val=4, image_size=96, seed=1)
    flags = data_flags((str(tmp_path / "data"), info["num_classes"])) + [
        "--dropout", "0", "--no_train_augmentation", "--epochs", "2", "--total_batch_size", "4", *loss_flags]
    runs = {name: str(tmp_path / name) for name in ("single", "double", "accumulated")}
    run(flags + ["--output_dir", runs["single"]])
    run(flags + ["--output_dir", runs["accumulated"], "--accum_iter", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "main.py", *flags, "--output_dir", runs["double"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images per process x 2 processes x 1 accumulation steps = 4 per step" in proc.stdout

    reference = read_log(runs["single"])
    checkpoint = load_checkpoint(os.path.join(runs["single"], "checkpoint.pth"))
    weights = checkpoint["model"]
    for name in ("double", "accumulated"):
        log = read_log(runs[name])
        assert len(log) == len(reference) == 2
        # Every loss is normalised by the totals of the whole step (box count, class weights),
        # so the losses of a split batch are those of the whole batch, before and after updates.
        # (Evaluation losses are averages over evaluation batches, which hold 2 images instead of
        # 4 in the accumulated run: only the distributed run must match them.)
        keys = ["train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_loss_ce_0"]
        keys += ["train_loss_dap", "train_loss_dap_0", "train_dap_value"] if loss_flags else []
        keys += ["test_loss", "test_loss_ce", "test_loss_bbox"] if name == "double" else []
        for a, b in zip(reference, log):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (name, key)
            assert b["test_coco_eval_bbox"] == pytest.approx(a["test_coco_eval_bbox"], abs=1e-3)
        other = load_checkpoint(os.path.join(runs[name], "checkpoint.pth"))
        for key, value in weights.items():
            assert torch.allclose(other["model"][key], value, rtol=1e-3, atol=1e-6), (name, key)
        for key, value in checkpoint["matcher"].items():  # the momentum table
            assert torch.allclose(other["matcher"][key], value, rtol=1e-4, atol=1e-6), (name, key)


def test_total_batch_size_must_divide(synthetic_coco, capsys):
    code, err = run_cli(data_flags(synthetic_coco) + ["--total_batch_size", "5", "--accum_iter", "2"], capsys)
    assert code == 2 and "--total_batch_size 5" in err


def test_model_flag_switches_to_that_detectors_defaults():
    # Upstream Deformable DETR's values, written out (family_defaults reads them from the recipe).
    deformable = parse(["--model", "deformable_detr"])
    assert (deformable.lr, deformable.lr_backbone, deformable.epochs, deformable.lr_drop) == (2e-4, 2e-5, 50, 40)
    assert (deformable.dim_feedforward, deformable.num_queries, deformable.set_cost_class,
            deformable.cls_loss_coef, deformable.checkpoint_period) == (1024, 300, 2, 2, 5)
    explicit = parse(["--num_queries", "7", "--model", "deformable_detr", "--lr", "1e-5"])
    assert explicit.lr == 1e-5 and explicit.num_queries == 7 and explicit.lr_backbone == 2e-5
    assert parse([]).num_queries == 100 and parse([]).cls_loss_coef == 1


def test_log_iterations_writes_one_line_per_step(synthetic_coco, tmp_path):
    run(data_flags(synthetic_coco) + ["--output_dir", str(tmp_path), "--epochs", "2", "--log_iterations",
                                      "--accum_iter", "2", "--batch_size", "1"])
    rows = [json.loads(line) for line in (tmp_path / "iterations.jsonl").read_text().splitlines()]
    # 8 images, 1 per micro-batch, 2 micro-batches per step: 4 steps per epoch
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, s) for e in (0, 1) for s in range(4)]
    epoch_mean = sum(r["loss"] for r in rows[:4]) / 4
    assert epoch_mean == pytest.approx(read_log(str(tmp_path))[0]["train_loss"], rel=1e-6)


def test_backbone_norm_batch_trains_the_norms(synthetic_coco):
    model = detr_main.build_model(parse(data_flags(synthetic_coco) + ["--backbone_norm", "batch"]))[0]
    norms = [m for m in model.backbone[0].body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # BatchNorm2d with batch statistics, trainable in the trained stages (layer2-4, as upstream)
    body = model.backbone[0].body
    assert norms and body.layer2[0].bn1.weight.requires_grad and not body.bn1.weight.requires_grad
    frozen = detr_main.build_model(parse(data_flags(synthetic_coco)))[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.backbone[0].body.modules())


def test_a_new_family_is_its_recipe_and_a_registry_entry(synthetic_coco, tmp_path, monkeypatch):
    """What ARCHITECTURE.md promises: a family registered in models.FAMILIES gets its defaults
    from the parser and runs through main.py, with nothing else to change."""
    seen = []

    def param_groups(model, args):
        seen.append(args.model)
        return FAMILIES["detr"].param_groups(model, args)

    small = dataclasses.replace(FAMILIES["detr"], name="small_detr", param_groups=param_groups,
                                defaults={"num_queries": 7, "eos_coef": 0.5})
    monkeypatch.setitem(FAMILIES, "small_detr", small)
    args = parse(["--model", "small_detr"])
    assert (args.num_queries, args.eos_coef, args.lr) == (7, 0.5, 1e-4)
    assert parse([]).num_queries == 100
    flags = data_flags(synthetic_coco)
    del flags[flags.index("--num_queries"):flags.index("--num_queries") + 2]  # the family's 7
    stats = run(flags + ["--model", "small_detr", "--epochs", "1", "--output_dir", str(tmp_path)])
    assert seen == ["small_detr"] and len(stats["test_coco_eval_bbox"]) == 12
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["model"]["query_embed.weight"].shape[0] == 7
