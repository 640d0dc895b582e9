"""RT-DETR (models/rtdetr.py): state-dict compatibility with the released R50 checkpoint
(rtdetr_r50vd_6x_coco_from_paddle.pth), the backbone presets, the multi-scale training input, the varifocal /
focal losses and the matcher against hand computations, the loss / flag combinations, the
parameter groups, post-processing to category ids, and training end to end on the synthetic
dataset. Its parts have their own files: test_presnet, test_hybrid_encoder, test_rtdetr_decoder,
test_denoising, test_ema, test_rtdetr_transforms."""
import io
import itertools
import json
import math
import os

import pytest
import torch

from datasets.coco import CocoDetection, category_ids
from datasets.rtdetr_transforms import make_rtdetr_transforms
from engine import evaluate
from models import build_model
from models.ema import ModelEMA
from models.matcher import matched_pairs
from models.postprocess import TopKPostProcess
from models.rtdetr import param_groups
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.checkpoint import fit_state_dict, load_checkpoint, model_state_from_checkpoint
from util.errors import UserInputError
from util.misc import collate_fn, scaled_size

from conftest import TINY_RTDETR_FLAGS, build_rtdetr, parse, rtdetr_args, rtdetr_targets, run

# ----------------------------------------------------------------------------- state dict

def expected_r50_state_dict():
    """Key -> shape of rtdetr_r50vd_6x_coco_from_paddle.pth ['ema']['module'], written out from
    the released file's key list."""
    sd = {}

    def norm(prefix, c, tracked):
        sd.update({f"{prefix}.{b}": (c,) for b in ("weight", "bias", "running_mean", "running_var")})
        if tracked:
            sd[f"{prefix}.num_batches_tracked"] = ()

    def conv_norm(prefix, shape, tracked=True):
        sd[f"{prefix}.conv.weight"] = shape
        norm(f"{prefix}.norm", shape[0], tracked)

    def linear(prefix, out, inp):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = (out, inp), (out,)

    def layer_norm(prefix, c):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = (c,), (c,)

    def self_attn(prefix):
        sd.update({f"{prefix}.in_proj_weight": (768, 256), f"{prefix}.in_proj_bias": (768,)})
        linear(f"{prefix}.out_proj", 256, 256)

    # backbone: frozen batch norm (no num_batches_tracked)
    for name, shape in [("conv1_1", (32, 3, 3, 3)), ("conv1_2", (32, 32, 3, 3)), ("conv1_3", (64, 32, 3, 3))]:
        conv_norm(f"backbone.conv1.{name}", shape, tracked=False)
    ch_in = 64
    for stage, (width, blocks) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
        for b in range(blocks):
            p = f"backbone.res_layers.{stage}.blocks.{b}"
            cin = ch_in if b == 0 else 4 * width
            conv_norm(f"{p}.branch2a", (width, cin, 1, 1), tracked=False)
            conv_norm(f"{p}.branch2b", (width, width, 3, 3), tracked=False)
            conv_norm(f"{p}.branch2c", (4 * width, width, 1, 1), tracked=False)
            if b == 0:
                short = f"{p}.short" if stage == 0 else f"{p}.short.conv"
                conv_norm(short, (4 * width, cin, 1, 1), tracked=False)
        ch_in = 4 * width

    # decoder
    for i in range(3):
        conv_norm(f"decoder.input_proj.{i}", (256, 256, 1, 1))
    for n in range(6):
        p = f"decoder.decoder.layers.{n}"
        self_attn(f"{p}.self_attn")
        linear(f"{p}.cross_attn.sampling_offsets", 192, 256)
        linear(f"{p}.cross_attn.attention_weights", 96, 256)
        linear(f"{p}.cross_attn.value_proj", 256, 256)
        linear(f"{p}.cross_attn.output_proj", 256, 256)
        for k in (1, 2, 3):
            layer_norm(f"{p}.norm{k}", 256)
        linear(f"{p}.linear1", 1024, 256)
        linear(f"{p}.linear2", 256, 1024)
    sd["decoder.denoising_class_embed.weight"] = (81, 256)
    linear("decoder.query_pos_head.layers.0", 512, 4)
    linear("decoder.query_pos_head.layers.1", 256, 512)
    linear("decoder.enc_output.0", 256, 256)
    layer_norm("decoder.enc_output.1", 256)
    linear("decoder.enc_score_head", 80, 256)
    for head in ["decoder.enc_bbox_head"] + [f"decoder.dec_bbox_head.{n}" for n in range(6)]:
        linear(f"{head}.layers.0", 256, 256)
        linear(f"{head}.layers.1", 256, 256)
        linear(f"{head}.layers.2", 4, 256)
    for n in range(6):
        linear(f"decoder.dec_score_head.{n}", 80, 256)

    # encoder: plain batch norm
    for i, c in enumerate([512, 1024, 2048]):
        sd[f"encoder.input_proj.{i}.0.weight"] = (256, c, 1, 1)
        norm(f"encoder.input_proj.{i}.1", 256, tracked=True)
    p = "encoder.encoder.0.layers.0"
    self_attn(f"{p}.self_attn")
    linear(f"{p}.linear1", 1024, 256)
    linear(f"{p}.linear2", 256, 1024)
    layer_norm(f"{p}.norm1", 256)
    layer_norm(f"{p}.norm2", 256)
    for i in range(2):
        conv_norm(f"encoder.lateral_convs.{i}", (256, 256, 1, 1))
        conv_norm(f"encoder.downsample_convs.{i}", (256, 256, 3, 3))
        for blocks in ("fpn_blocks", "pan_blocks"):
            conv_norm(f"encoder.{blocks}.{i}.conv1", (256, 512, 1, 1))
            conv_norm(f"encoder.{blocks}.{i}.conv2", (256, 512, 1, 1))
            for b in range(3):
                conv_norm(f"encoder.{blocks}.{i}.bottlenecks.{b}.conv1", (256, 256, 3, 3))
                conv_norm(f"encoder.{blocks}.{i}.bottlenecks.{b}.conv2", (256, 256, 1, 1))
    return sd


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_model(parse(["--model", "rtdetr", "--device", "cpu", "--no_pretrained_backbone"]))[0]


def test_r50_state_dict_matches_released_checkpoint(r50):
    own = {k: tuple(v.shape) for k, v in r50.state_dict().items()}
    expected = expected_r50_state_dict()
    assert sorted(set(own) - set(expected)) == [] and sorted(set(expected) - set(own)) == []
    assert {k: v for k, v in own.items() if v != expected[k]} == {}
    # Upstream's order of the top-level modules, and its parameter count (42M).
    prefixes = [k.split(".")[0] for k in own]
    assert [p for i, p in enumerate(prefixes) if i == 0 or p != prefixes[i - 1]] == ["backbone", "decoder", "encoder"]
    assert sum(p.numel() for p in r50.parameters()) == pytest.approx(42.9e6, rel=0.01)
    # Only the stem is frozen (R50): the backbone's other convolutions train.
    frozen = {n for n, p in r50.named_parameters() if not p.requires_grad}
    assert frozen == {f"backbone.conv1.conv1_{i}.conv.weight" for i in (1, 2, 3)}


def test_released_checkpoint_layout_loads_strictly(r50):
    """A checkpoint in the released layout ({'ema': {'module': ...}}, BN counters included)
    loads with strict=True, and the weights arrive."""
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randint(0, 9, v.shape, generator=g) if v.dtype == torch.int64
                 else torch.randn(v.shape, generator=g)) for k, v in r50.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"ema": {"module": state, "updates": 10, "warmups": 2000}}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = build_model(parse(["--model", "rtdetr", "--device", "cpu", "--no_pretrained_backbone"]))[0]
    model.load_state_dict(model_state_from_checkpoint(checkpoint), strict=True)
    for k in ("backbone.res_layers.2.blocks.5.branch2b.norm.running_var", "decoder.dec_score_head.5.bias",
              "encoder.encoder.0.layers.0.self_attn.in_proj_weight"):
        assert torch.equal(model.state_dict()[k], state[k])


@pytest.mark.parametrize("backbone, dec_layers, keys, millions", [
    # R18/R34: basic blocks with real batch norm; CSP expansion 0.5 adds conv3.
    ("presnet18vd", 3, {"backbone.res_layers.0.blocks.0.short.conv.weight": (64, 64, 1, 1),
                        "backbone.res_layers.1.blocks.0.short.conv.conv.weight": (128, 64, 1, 1),
                        "backbone.res_layers.0.blocks.1.branch2b.norm.num_batches_tracked": (),
                        "encoder.fpn_blocks.0.conv1.conv.weight": (128, 512, 1, 1),
                        "encoder.fpn_blocks.0.conv3.conv.weight": (256, 128, 1, 1),
                        "encoder.input_proj.2.0.weight": (256, 512, 1, 1)}, 20),
    ("presnet101vd", 6, {"backbone.res_layers.2.blocks.22.branch2c.conv.weight": (1024, 256, 1, 1),
                         "encoder.encoder.0.layers.0.linear1.weight": (2048, 384),
                         "decoder.input_proj.0.conv.weight": (256, 384, 1, 1)}, 76),
])
def test_backbone_variants(backbone, dec_layers, keys, millions):
    model = build_model(parse(["--model", "rtdetr", "--device", "cpu", "--no_pretrained_backbone",
                               "--backbone", backbone, "--dec_layers", str(dec_layers)]))[0]
    sd = model.state_dict()
    assert {k: tuple(sd[k].shape) for k in keys} == keys
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.7)


# ----------------------------------------------------------------------------- forward


def test_multi_scale_resizes_training_batches_only():
    model, _, _ = build_rtdetr()
    seen = []
    model.backbone.register_forward_hook(lambda m, inputs, out: seen.append(tuple(inputs[0].shape[-2:])))
    assert model.multi_scale == [scaled_size(s, 0.1) for s in (480, 512, 544, 576, 608, 640, 640, 640, 672,
                                                               704, 736, 768, 800)]
    model.multi_scale = [32]
    model.train()
    model(torch.rand(2, 3, 64, 64), rtdetr_targets())
    model.eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    assert seen == [(32, 32), (64, 64)]
    assert build_rtdetr("--no_multi_scale")[0].multi_scale is None
    assert build_rtdetr("--no_train_augmentation")[0].multi_scale is None


# ----------------------------------------------------------------------------- denoising


def test_no_ground_truth_gives_empty_denoising_and_zero_losses():
    model, criterion, _ = build_rtdetr("--no_multi_scale")
    model.train()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.rand(2, 3, 64, 64), empty)
    assert out["dn_meta"]["dn_num_split"] == [0, 16] and out["dn_aux_outputs"][0]["pred_boxes"].shape == (2, 0, 4)
    losses = criterion(out, empty)
    assert set(losses) == set(criterion.weight_dict)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v == 0 for k, v in losses.items() if "_dn_" in k)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    # every parameter takes part (no unused parameters for DDP), the denoising embedding included
    assert model.decoder.denoising_class_embed.weight.grad is not None


# ----------------------------------------------------------------------------- criterion

def bce(x, t):
    return math.log1p(math.exp(x)) - x * t


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_vfl_and_focal_against_hand_computation():
    _, criterion, _ = build_rtdetr()
    logits = torch.tensor([[[0.0, 1.0], [-1.0, 2.0]]])
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    iou = (0.15 * 0.2) / (0.04 + 0.04 - 0.15 * 0.2)  # = 0.6
    # (query 0, class 1) is the positive: target iou, weight iou; the rest: target 0, weight 0.75 p^2
    expected = (0.75 * sigmoid(0.0) ** 2 * bce(0.0, 0) + iou * bce(1.0, iou)
                + 0.75 * sigmoid(-1.0) ** 2 * bce(-1.0, 0) + 0.75 * sigmoid(2.0) ** 2 * bce(2.0, 0)) / 2.0
    totals = {"num_boxes": 2.0}
    vfl = criterion.loss_vfl(outputs, targets, matched_pairs(targets, indices), totals)["loss_vfl"]
    assert vfl.item() == pytest.approx(expected, rel=1e-5)

    def focal(x, t):
        p = sigmoid(x)
        p_t = p if t else 1 - p
        return (0.75 if t else 0.25) * (1 - p_t) ** 2 * bce(x, t)
    expected = (focal(0.0, 0) + focal(1.0, 1) + focal(-1.0, 0) + focal(2.0, 0)) / 2.0
    focal_loss = criterion.loss_focal(outputs, targets, matched_pairs(targets, indices), totals)["loss_focal"]
    assert focal_loss.item() == pytest.approx(expected, rel=1e-5)


def test_matcher_is_the_focal_hungarian_with_rtdetr_costs():
    """Brute force over every assignment of 2 targets among 4 queries with RT-DETR's cost:
    2 * focal class cost (alpha 0.25, gamma 2) + 5 * L1 + 2 * (-GIoU)."""
    _, criterion, _ = build_rtdetr()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 5, generator=g)
    boxes = torch.rand(1, 4, 2, generator=g) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.rand(1, 4, 2, generator=g) * 0.3 + 0.1], -1)
    target = {"labels": torch.tensor([2, 4]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2], [0.6, 0.6, 0.2, 0.3]])}

    def cost(q, t):
        p = torch.sigmoid(logits[0, q, target["labels"][t]]).item()
        cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
        l1 = (boxes[0, q] - target["boxes"][t]).abs().sum().item()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, q:q + 1]),
                                   box_cxcywh_to_xyxy(target["boxes"][t:t + 1])).item()
        return 2 * cls + 5 * l1 - 2 * giou

    best = min(itertools.permutations(range(4), 2), key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    (src, tgt), = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
    assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(best))


@pytest.mark.parametrize("flags, enc_cls, dap", [
    ([], "loss_vfl", False),
    (["--no_iou_aware_query_selection"], "loss_focal", False),
    (["--loss", "raw+dap"], "loss_vfl", True),
    (["--loss", "raw+dap", "--no_iou_aware_query_selection"], "loss_focal", True),
    (["--loss", "dap", "--no_iou_aware_query_selection"], None, True),
])
def test_loss_keys_per_configuration(flags, enc_cls, dap):
    model, criterion, _ = build_rtdetr("--no_multi_scale", *flags)
    model.train()
    targets = rtdetr_targets()
    losses = criterion(model(torch.rand(2, 3, 64, 64), targets), targets)
    weighted = {k for k in losses if k in criterion.weight_dict}
    assert weighted == set(criterion.weight_dict)
    raw = enc_cls is not None
    # 2 decoder layers: final + _aux_0; the encoder's selection is _aux_1; denoising _dn_0, _dn_1
    expected = {f"loss_{n}_dn_{i}" for n in ("vfl", "bbox", "giou") for i in range(2)}
    if raw:
        expected |= {f"loss_{n}{s}" for n in ("vfl", "bbox", "giou") for s in ("", "_aux_0")}
        expected |= {f"{enc_cls}_aux_1", "loss_bbox_aux_1", "loss_giou_aux_1"}
    if dap:
        expected |= {"loss_dap", "loss_dap_aux_0", "loss_dap_aux_1"}
    assert weighted == expected
    assert (("dap_value" in losses) == dap) and all(torch.isfinite(v) for v in losses.values())
    w = criterion.weight_dict
    assert all(w[k] == {"vfl": 1, "foc": 1, "bbo": 5, "gio": 2, "dap": 1}[k[5:8]] for k in w)


def test_refused_flag_combinations():
    with pytest.raises(UserInputError, match="--no_iou_aware_query_selection"):
        build_rtdetr("--loss", "dap")
    with pytest.raises(UserInputError, match="presnet50vd"):
        build_rtdetr("--backbone", "resnet50")
    with pytest.raises(UserInputError, match="--dilation"):
        build_rtdetr("--dilation")


def test_param_groups():
    model, _, _ = build_rtdetr()
    args = rtdetr_args()
    groups = param_groups(model, args)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def group(name):
        g = by_param[id(named[name])]
        return g.get("lr", args.lr), g.get("weight_decay", args.weight_decay)

    assert group("backbone.res_layers.1.blocks.0.branch2a.conv.weight") == (1e-5, 1e-4)
    assert group("backbone.res_layers.1.blocks.0.branch2a.norm.weight") == (1e-5, 0.0)  # R18: real BN
    assert group("encoder.lateral_convs.0.norm.weight") == (1e-4, 0.0)
    assert group("encoder.input_proj.0.1.weight") == (1e-4, 1e-4)  # upstream's regex misses it
    assert group("encoder.input_proj.0.1.bias") == (1e-4, 0.0)
    assert group("decoder.decoder.layers.0.norm1.weight") == (1e-4, 0.0)
    assert group("decoder.dec_bbox_head.0.layers.0.bias") == (1e-4, 0.0)
    assert group("decoder.dec_bbox_head.0.layers.0.weight") == (1e-4, 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_finetune_to_other_categories_drops_only_the_class_heads(synthetic_coco):
    source = build_rtdetr()[0]  # COCO's 80 categories
    target = build_rtdetr("--coco_path", synthetic_coco[0])[0]
    with pytest.raises(UserInputError, match="shape mismatch"):
        fit_state_dict(target, source.state_dict())
    fit_state_dict(target, source.state_dict(), drop_prefixes=target.class_head_prefixes)
    own, other = target.state_dict(), source.state_dict()
    assert torch.equal(own["decoder.enc_bbox_head.layers.0.weight"], other["decoder.enc_bbox_head.layers.0.weight"])
    num_categories = len(category_ids(rtdetr_args("--coco_path", synthetic_coco[0])))
    assert own["decoder.dec_score_head.1.weight"].shape[0] == num_categories


# ----------------------------------------------------------------------------- post-processing, labels

def test_postprocess_top_k_category_ids_and_sizes():
    post = TopKPostProcess(num_select=300, category_ids=[3, 7, 20])
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2] = 2.0  # best: query 1, label 2 -> category 20
    logits[0, 0, 0] = 1.0  # second: query 0, label 0 -> category 3
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (r,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))  # (h, w)
    assert len(r["scores"]) == 6 and r["labels"][:2].tolist() == [20, 3]
    torch.testing.assert_close(r["scores"][:2], torch.sigmoid(torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(r["boxes"][:2], torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))


# ----------------------------------------------------------------------------- EMA


# ----------------------------------------------------------------------------- end to end

def test_train_steps_then_shared_evaluation_with_ema(synthetic_coco):
    """The pieces main.py wires together: the synthetic COCO dataset through the RT-DETR
    pipelines, a few optimizer steps with EMA updates, then engine.evaluate on the EMA model,
    whose detections carry the dataset's category ids."""
    path, _ = synthetic_coco
    args = rtdetr_args("--coco_path", path)
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args, category_ids(args))
    root = os.path.join(path, "{}2017"), os.path.join(path, "annotations", "instances_{}2017.json")
    train, val = (CocoDetection(root[0].format(split), root[1].format(split),
                                make_rtdetr_transforms(split, args.input_scale, category_ids(args)))
                  for split in ("train", "val"))
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    ema = ModelEMA(model, decay=args.ema_decay, warmups=args.ema_warmups)
    loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, collate_fn=collate_fn)
    model.train()
    criterion.train()
    for samples, targets in loader:
        losses = criterion(model(samples, targets), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        ema.update(model)
    assert ema.updates == 4
    assert not torch.equal(ema.module.decoder.enc_score_head.weight, model.decoder.enc_score_head.weight)

    val_loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate_fn)
    detections = []
    postprocessors["bbox"].register_forward_hook(lambda m, i, out: detections.extend(out))
    stats, _ = evaluate(ema.module, criterion, postprocessors, val_loader, val.coco, "cpu")
    assert len(stats["coco_eval_bbox"]) == 12 and math.isfinite(stats["loss"])
    assert len(detections) == 4
    assert {int(c) for d in detections for c in d["labels"]} <= set(val.coco.getCatIds())


# End to end through main.main.


def data_flags(synthetic_coco):
    return TINY_RTDETR_FLAGS + ["--coco_path", synthetic_coco[0]]


@pytest.mark.parametrize("flags", [
    [], ["--no_iou_aware_query_selection"], ["--loss", "raw+dap"],
    ["--loss", "raw+dap", "--no_iou_aware_query_selection"], ["--loss", "dap", "--no_iou_aware_query_selection"],
    ["--loss", "raw+dap", "--amp"],  # bfloat16 autocast on the CPU
])
def test_main_trains_each_configuration(synthetic_coco, flags):
    stats = run(data_flags(synthetic_coco) + flags + ["--epochs", "1"])
    assert len(stats["test_coco_eval_bbox"]) == 12 and math.isfinite(stats["train_loss"])
    assert ("train_loss_dap" in stats) == ("dap" in " ".join(flags))
    assert "train_loss_vfl_dn_1" in stats


def test_main_train_checkpoint_resume_evaluate(synthetic_coco, tmp_path):
    flags = data_flags(synthetic_coco)
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run(flags + ["--output_dir", straight, "--epochs", "2"])
    ckpt = load_checkpoint(os.path.join(straight, "checkpoint.pth"))
    assert {"model", "ema", "optimizer", "lr_scheduler", "epoch"} <= set(ckpt)
    assert ckpt["ema"]["updates"] == 8  # 4 steps per epoch
    assert any(not torch.equal(ckpt["ema"]["module"][k], v) for k, v in ckpt["model"].items())

    run(flags + ["--output_dir", interrupted, "--epochs", "1"])
    run(flags + ["--output_dir", interrupted, "--epochs", "2", "--resume", os.path.join(interrupted, "checkpoint.pth")])
    resumed = load_checkpoint(os.path.join(interrupted, "checkpoint.pth"))
    for part in ("model", ("ema", "module")):
        if isinstance(part, str):
            a, b = ckpt[part], resumed[part]
        else:
            a, b = ckpt[part[0]][part[1]], resumed[part[0]][part[1]]
        for key, value in a.items():
            assert torch.equal(value, b[key]), key

    # --eval evaluates the EMA weights and reproduces the last logged evaluation.
    with open(os.path.join(straight, "log.txt")) as f:
        last = json.loads(f.read().splitlines()[-1])
    stats = run(flags + ["--eval", "--resume", os.path.join(straight, "checkpoint.pth")])
    assert stats["coco_eval_bbox"] == pytest.approx(last["test_coco_eval_bbox"])
