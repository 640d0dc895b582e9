"""The fault matrix (docs/RELIABILITY.md): bad flags, bad data, bad checkpoints, a folder that
holds another run, divergence, interrupts and kills. Every case asserts the exit status, the one
line on stderr (no traceback) and that the files that existed before are byte-identical after.

main.py runs in this process (run_cli, as `python main.py` does) except where a real signal or a
second process is the point of the case."""
import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as detr_main
from datasets.synthetic import make_synthetic_coco
from util.checkpoint import load_checkpoint

from conftest import REPO, TINY_DETR_FLAGS

# ----------------------------------------------------------------------------- helpers


def cli(argv, capsys):
    """run_cli(argv): (exit status, stderr)."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        detr_main.run_cli([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, capsys.readouterr().err


def one_line(err, expected, prefix="error: "):
    """The message lines of stderr (warnings aside): exactly one, with the expected words."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and expected in lines[0], lines[0]
    return lines[0]


def snapshot(*roots):
    """sha256 of every file under the roots (folders or files)."""
    files = {}
    for root in map(Path, roots):
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            if path.name != ".lock":
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_data")
    info = make_synthetic_coco(str(root), num_train=8, num_val=4, image_size=96, seed=0)
    return root, info["num_classes"]


@pytest.fixture
def data(base_data, tmp_path):
    """A private copy of the dataset, to break."""
    root = tmp_path / "coco"
    shutil.copytree(base_data[0], root)
    return root


def tiny(coco, num_classes, *flags):
    return [str(f) for f in TINY_DETR_FLAGS + ["--coco_path", coco, "--num_classes", num_classes, "--batch_size",
                                               "2", "--epochs", "1", *flags]]


@pytest.fixture(scope="module")
def trained(base_data, tmp_path_factory):
    """A finished 1-epoch run (its folder) of the tiny DETR."""
    out = tmp_path_factory.mktemp("trained")
    detr_main.main(detr_main.get_args_parser().parse_args(tiny(*base_data, "--output_dir", out)))
    return out


# ----------------------------------------------------------------------------- flags: ranges

def out_of_range_cases():
    """Every flag with a range: a value outside it, and text that is not a number."""
    cases = []
    for action in detr_main.get_args_parser()._actions:
        kind = getattr(action.type, "type", action.type)  # inside a family default's DefaultOr
        probe = getattr(kind, "outside", None)
        if not action.option_strings or probe is None:
            continue
        flag = action.option_strings[0]
        cases += [pytest.param(flag, probe, id=f"{flag}={probe}"), pytest.param(flag, "abc", id=f"{flag}=abc")]
    return cases


@pytest.mark.parametrize("flag, value", out_of_range_cases())
def test_out_of_range_flag_is_refused_when_parsed(flag, value, capsys):
    code, err = cli([flag, value], capsys)
    assert code == 2
    one_line(err, f"argument {flag}")


def test_the_range_cases_cover_the_flags():
    assert len(out_of_range_cases()) >= 90


def test_nan_and_infinity_are_refused(capsys):
    for value in ("nan", "inf"):
        code, err = cli(["--lr", value], capsys)
        assert code == 2
        one_line(err, "finite")


# ----------------------------------------------------------------------------- flags: combinations

COMBINATIONS = {
    "device_mps": (["--device", "mps"], "--device mps is not supported"),
    "device_cuda_without_cuda": (["--device", "cuda"], "CUDA is not available"),
    "hidden_not_divisible": (["--hidden_dim", "30", "--nheads", "4"], "not divisible by --nheads"),
    "tiny_input_scale": (["--input_scale", "0.01"], "--input_scale"),
    "no_matching_cost": (["--set_cost_class", "0", "--set_cost_bbox", "0", "--set_cost_giou", "0"], "no cost"),
    "momentum_without_dap_loss": (["--matcher", "dap", "--dap_cost_mode", "momentum"], "--loss dap or raw+dap"),
    "momentum_with_a_ranking_loss": (["--matcher", "dap", "--dap_cost_mode", "momentum", "--loss", "rs"],
                                     "--loss rs does not compute"),
    "finetune_and_resume": (["--finetune", "a.pth", "--resume", "b.pth"], "exclusive"),
    "drop_head_without_finetune": (["--finetune_drop_class_head"], "needs --finetune"),
    "eval_without_weights": (["--eval"], "give it with --resume"),
    "deformable_flag_without_its_model": (["--two_stage"], "--two_stage is a flag of --model deformable_detr"),
    "rtdetr_flag_with_deformable": (["--model", "deformable_detr", "--num_denoising", "50"],
                                    "--num_denoising is a flag of --model rtdetr"),
    "total_batch_not_divisible": (["--total_batch_size", "5", "--accum_iter", "2"], "not divisible"),
    "two_stage_without_refine": (["--model", "deformable_detr", "--two_stage"], "--with_box_refine"),
    "deformable_pre_norm": (["--model", "deformable_detr", "--pre_norm"], "post-norm"),
    "rtdetr_dap_with_iou_selection": (["--model", "rtdetr", "--loss", "dap"], "--no_iou_aware_query_selection"),
    "rtdetr_dilation": (["--model", "rtdetr", "--dilation"], "--dilation"),
    "rtdetr_more_queries_than_positions": (["--model", "rtdetr", "--input_scale", "0.2"],
                                           "--num_queries 300 is more than the 189 encoder positions"),
    "rtdetr_unknown_backbone": (["--model", "rtdetr", "--backbone", "resnet50"], "presnet50vd"),
    "rtdetr_width_not_divisible": (["--model", "rtdetr", "--backbone", "presnet101vd", "--hidden_dim", "256",
                                    "--nheads", "5"], "divisible"),
    "unknown_model": (["--model", "yolo"], "invalid choice"),
    "unknown_loss": (["--loss", "focal"], "invalid choice"),
    "unknown_dataset_file": (["--dataset_file", "voc"], "invalid choice"),
    "unknown_flag": (["--learning_rate", "1"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(COMBINATIONS))
def test_flag_combination_is_refused_before_work(case, tmp_path, capsys):
    if case == "device_cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    flags, expected = COMBINATIONS[case]
    base = ["--device", "cpu"] if "--device" not in flags else []
    code, err = cli(base + flags + ["--output_dir", tmp_path / "out"], capsys)
    assert code == 2
    one_line(err, expected)
    assert not (tmp_path / "out" / "log.txt").exists()


@pytest.mark.parametrize("flag", ["--masks", "--frozen_weights x", "--mask_loss_coef 1", "--dice_loss_coef 1",
                                  "--coco_panoptic_path p", "--remove_difficult", "--position_embedding_scale 6",
                                  "--lr_drop_epochs 3 4", "--cache_mode"])
def test_unsupported_upstream_flag(flag, capsys):
    code, err = cli(flag.split(), capsys)
    assert code == 2
    one_line(err, "is not supported by dap-detr")


# ----------------------------------------------------------------------------- data


def edit_json(root, split, change):
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_ann(key, value):
    def change(data):
        data["annotations"][0][key] = value
    return change


def drop_key(collection, index, key):
    def change(data):
        del data[collection][index][key]
    return change


def set_top(key, value):
    def change(data):
        data[key] = value
    return change


def duplicate(collection):
    def change(data):
        data[collection].append(copy.deepcopy(data[collection][0]))
    return change


def remove_non_crowd(data):
    data["annotations"] = []


DATA_CASES = {
    "category_at_num_classes": (first_ann("category_id", "NUM_CLASSES"), "category id"),
    "category_above_num_classes": (first_ann("category_id", 99), "category id 99"),
    "category_negative": (first_ann("category_id", -1), "category id -1"),
    "category_not_listed": (None, "not one of the dataset's categories"),
    "category_as_text": (first_ann("category_id", "1"), "category id '1'"),
    "bbox_three_numbers": (first_ann("bbox", [1, 2, 3]), "bbox"),
    "bbox_text": (first_ann("bbox", "1 2 3 4"), "bbox"),
    "bbox_nan": (first_ann("bbox", [1, 2, float("nan"), 4]), "four finite numbers"),
    "bbox_negative_width": (first_ann("bbox", [10, 10, -5, 4]), "negative width"),
    "no_area": (drop_key("annotations", 0, "area"), "'area'"),
    "iscrowd_two": (first_ann("iscrowd", 2), "iscrowd 2"),
    "unknown_image_id": (first_ann("image_id", 123456), "image id 123456"),
    "image_id_text": (first_ann("image_id", "x"), "image id 'x'"),
    "duplicate_image": (duplicate("images"), "appears twice"),
    "duplicate_category": (duplicate("categories"), "appear twice"),
    "image_without_file_name": (drop_key("images", 0, "file_name"), "'file_name'"),
    "image_without_id": (drop_key("images", 0, "id"), "integer 'id'"),
    "image_id_beyond_float64": (lambda d: d["images"][0].update(id=2**53), "image ids must be in 0..2**53 - 1"),
    "category_without_id": (drop_key("categories", 0, "id"), "integer 'id'"),
    "images_not_a_list": (set_top("images", {}), "'images' must be a list"),
    "annotations_not_a_list": (set_top("annotations", None), "'annotations' must be a list"),
    "no_images": (lambda d: d.update(images=[], annotations=[]), "lists no images"),
    "no_annotations": (remove_non_crowd, "nothing to"),
    "missing_categories": (lambda d: d.pop("categories"), "lacks the key(s) categories"),
}


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_annotation_is_refused_before_training(case, split, data, base_data, tmp_path, capsys):
    change, expected = DATA_CASES[case]
    num_classes = base_data[1]
    if case == "category_at_num_classes":
        change, expected = first_ann("category_id", num_classes), f"category id {num_classes}"
    if case == "category_not_listed":
        val = json.loads((data / "annotations" / "instances_val2017.json").read_text())
        listed = {c["id"] for c in val["categories"]}
        change = first_ann("category_id", min(set(range(num_classes)) - listed))
    edit_json(data, split, change)
    before = snapshot(data)
    out = tmp_path / "out"
    code, err = cli(tiny(data, num_classes, "--output_dir", out), capsys)
    assert code == 2
    one_line(err, expected)
    assert snapshot(data) == before and not (out / "log.txt").exists()


@pytest.mark.parametrize("content, expected", [
    ("", "not a valid COCO JSON file"), ("{", "not a valid COCO JSON file"), ("[1, 2]", "not a valid COCO JSON"),
    ("null", "not a valid COCO JSON"), ('{"images": []}', "lacks the key(s) annotations, categories"),
])
@pytest.mark.parametrize("split", ["train", "val"])
def test_unreadable_annotation_file(content, expected, split, data, base_data, capsys):
    (data / "annotations" / f"instances_{split}2017.json").write_text(content)
    code, err = cli(tiny(data, base_data[1]), capsys)
    assert code == 2
    one_line(err, expected)


@pytest.mark.parametrize("case", ["no_coco_path", "missing_root", "root_is_a_file", "no_train_images",
                                  "no_val_images", "no_annotations_folder"])
def test_missing_layout(case, data, base_data, tmp_path, capsys):
    flags = tiny(data, base_data[1])
    if case == "no_coco_path":
        i = flags.index("--coco_path")
        del flags[i:i + 2]
    elif case == "missing_root":
        shutil.rmtree(data)
    elif case == "root_is_a_file":
        shutil.rmtree(data)
        data.write_text("x")
    else:
        shutil.rmtree(data / {"no_train_images": "train2017", "no_val_images": "val2017",
                              "no_annotations_folder": "annotations"}[case])
    code, err = cli(flags, capsys)
    assert code == 2
    one_line(err, "--coco_path")


def break_image(path, how):
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "not_an_image":
        path.write_text("this is not a picture")
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("how", ["empty", "truncated", "not_an_image", "missing"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_image_names_its_file(how, split, workers, data, base_data, trained, capsys):
    images = json.loads((data / "annotations" / f"instances_{split}2017.json").read_text())["images"]
    target = data / f"{split}2017" / images[0]["file_name"]
    break_image(target, how)
    # The validation split is read by --eval at once (in training: after the first epoch).
    evaluate = ["--eval", "--resume", trained / "checkpoint.pth"] if split == "val" else []
    code, err = cli(tiny(data, base_data[1], "--num_workers", workers, *evaluate), capsys)
    assert code == 2
    line = one_line(err, target.name)
    assert ("does not exist" if how == "missing" else "cannot be decoded") in line


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(path, how, trained):
    source = trained / "checkpoint.pth"
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(source.read_bytes()[:5000])
    elif how == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif how == "text":
        path.write_text("model weights")
    elif how == "code":
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch pwned",))
        torch.save({"model": Evil()}, path)
    elif how == "no_model_key":
        torch.save({"weights": {}}, path)
    elif how == "wrong_shapes":
        state = load_checkpoint(str(source))
        state["model"]["query_embed.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
    elif how == "missing_keys":
        state = load_checkpoint(str(source))
        del state["model"]["class_embed.weight"]
        torch.save(state, path)
    elif how == "non_finite":
        state = load_checkpoint(str(source))
        state["model"]["class_embed.weight"][0, 0] = float("nan")
        torch.save(state, path)
    elif how == "other_model":
        torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)


CHECKPOINT_CASES = {"empty": "", "truncated": "", "random_bytes": "", "text": "", "code": "",
                    "no_model_key": "", "wrong_shapes": "shape mismatch", "missing_keys": "missing keys",
                    "non_finite": "non-finite", "other_model": "does not fit", "absent": "not found"}


@pytest.mark.parametrize("flag", ["--resume", "--finetune"])
@pytest.mark.parametrize("how", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(how, flag, trained, base_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "given.pth"
    if how != "absent":
        write_checkpoint(path, how, trained)
    before = snapshot(tmp_path, trained)
    code, err = cli(tiny(*base_data, flag, path, "--output_dir", tmp_path / "out"), capsys)
    assert code == 2
    line = one_line(err, CHECKPOINT_CASES[how])
    assert "given.pth" in line
    assert not (tmp_path / "pwned").exists()
    after = snapshot(tmp_path, trained)
    assert {k: v for k, v in after.items() if "/out/" not in k} == before


@pytest.mark.parametrize("flag,value,named", [(["--lr", "1e-6"], "0.0001", "lr"),
                                              (["--lr_drop", "1"], "200", "lr_drop"),
                                              (["--sgd"], "False", "sgd"),
                                              (["--lr_backbone", "0"], "1e-05", "lr_backbone"),
                                              (["--loss", "dap"], "raw", "loss"),
                                              (["--set_cost_giou", "3"], "2", "set_cost_giou")])
def test_resume_with_other_training_flags_is_refused(flag, value, named, trained, base_data, tmp_path, capsys):
    """A resumed run restores its optimizer and schedule: a changed learning rate or drop would be
    ignored, another optimizer or parameter grouping would fail at its first step; another loss or
    matching would train the rest of the run with another recipe."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    code, err = cli(tiny(*base_data, "--output_dir", out, "--resume", out / "checkpoint.pth", "--epochs", "2", *flag),
                    capsys)
    assert code == 2
    line = one_line(err, f"trained with {named}={value}")
    assert "--finetune" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("flags,expected", [
    (["--num_queries", "12"], "does not fit the model: shape mismatch: query_embed.weight"),
    (["--nheads", "4"], "which its weights fit either way but compute otherwise"),
])
def test_a_checkpoint_of_another_architecture_names_the_flags_it_was_trained_with(flags, expected, trained,
                                                                                   base_data, capsys):
    """Weights of another shape (--num_queries), or of the same shapes computing otherwise
    (--nheads, DETR-DC5's --dilation): the line names the flags the checkpoint was trained with."""
    code, err = cli(tiny(*base_data, "--eval", "--resume", trained / "checkpoint.pth", *flags), capsys)
    assert code == 2
    line = one_line(err, expected)
    assert f"trained with {flags[0][2:]}={TINY_DETR_FLAGS[TINY_DETR_FLAGS.index(flags[0]) + 1]}" in line


def test_unreachable_checkpoint_url(base_data, capsys):
    code, err = cli(tiny(*base_data, "--finetune", "http://127.0.0.1:9/detr.pth"), capsys)
    assert code == 2
    one_line(err, "127.0.0.1:9")


# ----------------------------------------------------------------------------- the output folder


def test_a_folder_holding_a_run_is_refused_without_resume(trained, base_data, capsys):
    before = snapshot(trained)
    code, err = cli(tiny(*base_data, "--output_dir", trained), capsys)
    assert code == 2
    one_line(err, "already holds a run")
    assert snapshot(trained) == before


def test_overwrite_starts_the_run_over(trained, base_data, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(trained, out)
    code, _ = cli(tiny(*base_data, "--output_dir", out, "--overwrite", "--epochs", "1", "--lr", "2e-4"), capsys)
    assert code == 0
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]  # not appended to the earlier run's log
    assert load_checkpoint(str(out / "checkpoint.pth"))["args"].lr == 2e-4


def test_resume_from_another_runs_checkpoint_into_a_run_folder_is_refused(trained, base_data, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(trained, out)
    elsewhere = tmp_path / "elsewhere.pth"
    shutil.copy(trained / "checkpoint.pth", elsewhere)
    before = snapshot(out)
    code, err = cli(tiny(*base_data, "--output_dir", out, "--resume", elsewhere, "--epochs", "2"), capsys)
    assert code == 2
    one_line(err, "another run's checkpoint")
    assert snapshot(out) == before


def test_a_run_stopped_before_its_first_checkpoint_starts_over(trained, base_data, tmp_path, capsys):
    """What a kill between epoch 0's log line and its checkpoint leaves (log.txt, iterations,
    TensorBoard events, no checkpoint): the same command run again starts over, as a requeued
    job runs it, instead of being refused (there is nothing to --resume) or appending to it."""
    out = tmp_path / "stopped"
    shutil.copytree(trained, out)
    for path in out.glob("checkpoint*.pth"):
        path.unlink()
    (out / "iterations.jsonl").write_text('{"epoch": 0, "step": 0, "lr": 1.0}\n')
    code, err = cli(tiny(*base_data, "--output_dir", out, "--log_iterations"), capsys)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    steps = [json.loads(line)["step"] for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0  # each step once, none of the stopped run's
    assert all(json.loads(line)["lr"] != 1.0 for line in (out / "iterations.jsonl").read_text().splitlines())


def test_eval_into_a_training_folder_is_allowed(trained, base_data, capsys):
    before = snapshot(trained)
    code, _ = cli(tiny(*base_data, "--output_dir", trained, "--eval", "--resume", trained / "checkpoint.pth"),
                  capsys)
    assert code == 0
    after = snapshot(trained)
    assert {k: v for k, v in after.items() if not k.endswith(("eval.pth", "eval_stats.json"))} == before
    (trained / "eval.pth").unlink()
    (trained / "eval_stats.json").unlink()


def test_stale_temporary_files_are_removed(trained, base_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoint.pth.tmp").write_bytes(b"partial")
    (out / "eval" / "latest.pth.tmp").write_bytes(b"partial")
    code, _ = cli(tiny(*base_data, "--output_dir", out, "--resume", out / "checkpoint.pth", "--epochs", "2"),
                  capsys)
    assert code == 0
    assert not list(out.rglob("*.tmp"))


def test_two_runs_cannot_write_one_folder(base_data, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(tiny(*base_data, "--output_dir", out), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    one_line(err, "another run is writing")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_output_dir_that_is_a_file(base_data, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, err = cli(tiny(*base_data, "--output_dir", target), capsys)
    assert code == 2
    one_line(err, "cannot be created")
    assert target.read_text() == "x"


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("flags", [["--lr", "1e8"], ["--lr", "1e8", "--clip_max_norm", "0"],
                                   ["--lr", "1e8", "--loss", "raw+dap"]])
def test_divergence_is_named_and_nothing_non_finite_is_saved(flags, base_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(tiny(*base_data, "--output_dir", out, "--epochs", "3", "--lr_backbone", "1e8", *flags), capsys)
    assert code == 1
    line = one_line(err, "training diverged at epoch")
    assert "step" in line and "--lr" in line
    if (out / "checkpoint.pth").exists():  # an earlier epoch's: finite
        state = load_checkpoint(str(out / "checkpoint.pth"))["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- interrupts and kills


def main_process(argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "main.py", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(process, text, timeout=120):
    """Read the process's stdout until a line contains text."""
    deadline = time.time() + timeout
    for line in process.stdout:
        if text in line:
            return
        assert time.time() < deadline, f"no {text!r} within {timeout} s"
    raise AssertionError(f"the process ended before printing {text!r}: {process.stderr.read()}")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupt_says_where_to_resume(sig, status, base_data, tmp_path):
    out = tmp_path / "out"
    process = main_process(tiny(*base_data, "--output_dir", out, "--epochs", "50", "--print_freq", "1"))
    wait_for(process, "Epoch: [1]")  # epoch 0 checkpointed
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status
    line = one_line(err, f"--resume {out / 'checkpoint.pth'}", prefix="interrupted: ")
    assert line
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] >= 0
    assert not list(out.rglob("*.tmp"))


def final_weights(folder):
    return load_checkpoint(str(folder / "checkpoint.pth"))["model"]


@pytest.fixture(scope="module")
def uninterrupted(base_data, tmp_path_factory):
    """The reference for the kill cases: 3 epochs straight through, in a process of its own."""
    out = tmp_path_factory.mktemp("uninterrupted")
    process = main_process(tiny(*base_data, "--output_dir", out, "--epochs", "3", "--lr_drop", "2"))
    process.communicate(timeout=300)
    assert process.returncode == 0
    return out


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(seed, uninterrupted, base_data, tmp_path):
    """SIGKILL a training process at a random moment (startup, training, evaluation, a write),
    continue it as a requeued job does (--resume when a checkpoint exists, else the same command),
    again and again until it finishes: the weights and the log equal the uninterrupted run's."""
    rng = torch.Generator().manual_seed(seed)
    out = tmp_path / "out"
    flags = tiny(*base_data, "--output_dir", out, "--epochs", "3", "--lr_drop", "2")
    kills = 0
    for attempt in range(12):
        has_checkpoint = (out / "checkpoint.pth").exists()
        again = ["--resume", out / "checkpoint.pth"] if has_checkpoint else []
        process = main_process(flags + again)
        if attempt < 3:  # three kills, then let it finish
            time.sleep(2 + 6 * torch.rand(1, generator=rng).item())
            process.kill()
            kills += process.wait() == -signal.SIGKILL
            # what a kill may leave: the last complete checkpoint, never a partial one
            if (out / "checkpoint.pth").exists():
                load_checkpoint(str(out / "checkpoint.pth"))
            continue
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        break
    assert kills >= 1
    reference, resumed = final_weights(uninterrupted), final_weights(out)
    assert reference.keys() == resumed.keys()
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    expected = [json.loads(line) for line in (uninterrupted / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert [r["test_coco_eval_bbox"] for r in log] == [r["test_coco_eval_bbox"] for r in expected]


def test_sigkill_during_evaluation_keeps_the_earlier_eval_files(trained, base_data, tmp_path):
    out = tmp_path / "eval"
    flags = tiny(*base_data, "--output_dir", out, "--eval", "--resume", trained / "checkpoint.pth")
    first = main_process(flags)
    first.communicate(timeout=300)
    assert first.returncode == 0
    before = snapshot(out)
    for delay in (1.0, 2.5, 4.0):
        process = main_process(flags)
        time.sleep(delay)
        process.kill()
        process.wait()
        after = {k: v for k, v in snapshot(out).items() if not k.endswith(".tmp")}
        assert after == before  # never a partial eval.pth or eval_stats.json


# ----------------------------------------------------------------------------- two processes (torchrun)


def torchrun(argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "main.py", *map(str, argv)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_torchrun_every_rank_stops_when_rank_0_refuses_the_folder(trained, base_data):
    process = torchrun(tiny(*base_data, "--output_dir", trained))
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "already holds a run" in err and "refused to start" in err  # rank 0's line, and rank 1's


def test_torchrun_bad_flag_stops_both_ranks(base_data):
    process = torchrun(tiny(*base_data, "--dap_bins", "0"))
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    # Each rank refuses the flag before any work; torchrun stops the other rank as soon as one
    # exits, which can be before that one has parsed its flags: one or two refusals, no hang.
    assert 1 <= err.count("error: argument --dap_bins: must be a positive integer") <= 2


def worker_pids(process, count=2, timeout=120):
    """The main.py workers that torchrun (process) started: its children."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = []
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (OSError, ValueError):
                continue
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == process.pid:
                pids.append(int(entry))
        if len(pids) >= count:
            return sorted(pids)
        time.sleep(0.5)
    raise AssertionError("the workers did not start")


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_torchrun_a_worker_that_dies_or_freezes_does_not_hang_the_other(how, base_data, tmp_path):
    out = tmp_path / "out"
    process = torchrun(tiny(*base_data, "--output_dir", out, "--epochs", "50", "--dist_timeout", "0.1",
                            "--print_freq", "1"))
    try:
        steps_seen = 0
        for line in process.stdout:  # rank 0 prints each step; once it printed two, both ranks
            steps_seen += "Epoch: [0]" in line  # have recorded their first heartbeat
            if steps_seen == 2:
                break
        victim = worker_pids(process)[-1]
        variables = Path(f"/proc/{victim}/environ").read_text().split("\0")
        environ = dict(item.split("=", 1) for item in variables if "=" in item)
        os.kill(victim, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    if how == "sigstop":  # the survivor names itself and the timeout
        assert "lost the other processes" in err, err[-3000:]
        assert f"rank {environ['RANK']} last answered" in err, err[-3000:]
