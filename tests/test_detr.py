"""DETR model: state-dict compatibility with the released checkpoints, forward shapes and masks,
post-processing, and the positional encodings against their formulas."""
import io
import math

import pytest
import torch
import torchvision
from torch import nn

import main
from models import build_model
from models.backbone import Backbone
from models.layers import FrozenBatchNorm2d, TransformerEncoderLayer
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from models.postprocess import PostProcess
from models.transformer import Transformer, TransformerDecoderLayer
from util.errors import UserInputError
from util.misc import NestedTensor, nested_tensor_from_tensor_list


def make_args(**overrides):
    """main.py's defaults (upstream DETR's) on CPU, without ImageNet weights."""
    args = main.get_args_parser().parse_args([])
    vars(args).update(device="cpu", pretrained_backbone=False, **overrides)
    return args


def tiny_args(**overrides):
    return make_args(**{**dict(backbone="resnet18", hidden_dim=32, dim_feedforward=64, nheads=2,
                               enc_layers=1, dec_layers=2, num_queries=10, num_classes=5), **overrides})


# ----------------------------------------------------------------------------- state dict

def expected_detr_state_dict(blocks_layer3, hidden=256, ffn=2048, enc=6, dec=6, queries=100,
                             num_classes=91, learned_pos=False, pre_norm=False):
    """Key -> shape of a released DETR checkpoint, written out from the released files' key lists."""
    sd = {}

    def fbn(prefix, n):
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.{name}"] = [n]

    body = "backbone.0.body"
    sd[f"{body}.conv1.weight"] = [64, 3, 7, 7]
    fbn(f"{body}.bn1", 64)
    in_ch = 64
    for layer, (blocks, planes) in enumerate(zip([3, 4, blocks_layer3, 3], [64, 128, 256, 512]), start=1):
        out_ch = planes * 4
        for b in range(blocks):
            p = f"{body}.layer{layer}.{b}"
            sd[f"{p}.conv1.weight"] = [planes, in_ch if b == 0 else out_ch, 1, 1]
            fbn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.weight"] = [planes, planes, 3, 3]
            fbn(f"{p}.bn2", planes)
            sd[f"{p}.conv3.weight"] = [out_ch, planes, 1, 1]
            fbn(f"{p}.bn3", out_ch)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = [out_ch, in_ch, 1, 1]
                fbn(f"{p}.downsample.1", out_ch)
        in_ch = out_ch
    if learned_pos:
        sd["backbone.1.row_embed.weight"] = [50, hidden // 2]
        sd["backbone.1.col_embed.weight"] = [50, hidden // 2]

    def attention(prefix):
        sd[f"{prefix}.in_proj_weight"] = [3 * hidden, hidden]
        sd[f"{prefix}.in_proj_bias"] = [3 * hidden]
        sd[f"{prefix}.out_proj.weight"] = [hidden, hidden]
        sd[f"{prefix}.out_proj.bias"] = [hidden]

    def ffn_and_norms(prefix, num_norms):
        sd[f"{prefix}.linear1.weight"] = [ffn, hidden]
        sd[f"{prefix}.linear1.bias"] = [ffn]
        sd[f"{prefix}.linear2.weight"] = [hidden, ffn]
        sd[f"{prefix}.linear2.bias"] = [hidden]
        for k in range(1, num_norms + 1):
            sd[f"{prefix}.norm{k}.weight"] = [hidden]
            sd[f"{prefix}.norm{k}.bias"] = [hidden]

    for n in range(enc):
        attention(f"transformer.encoder.layers.{n}.self_attn")
        ffn_and_norms(f"transformer.encoder.layers.{n}", 2)
    for n in range(dec):
        attention(f"transformer.decoder.layers.{n}.self_attn")
        attention(f"transformer.decoder.layers.{n}.multihead_attn")
        ffn_and_norms(f"transformer.decoder.layers.{n}", 3)
    sd["transformer.decoder.norm.weight"] = [hidden]
    sd["transformer.decoder.norm.bias"] = [hidden]
    if pre_norm:
        sd["transformer.encoder.norm.weight"] = [hidden]
        sd["transformer.encoder.norm.bias"] = [hidden]

    sd["input_proj.weight"] = [hidden, 2048, 1, 1]
    sd["input_proj.bias"] = [hidden]
    sd["query_embed.weight"] = [queries, hidden]
    sd["class_embed.weight"] = [num_classes + 1, hidden]
    sd["class_embed.bias"] = [num_classes + 1]
    for k, out in enumerate([hidden, hidden, 4]):
        sd[f"bbox_embed.layers.{k}.weight"] = [out, hidden]
        sd[f"bbox_embed.layers.{k}.bias"] = [out]
    return sd


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def assert_same_keys_and_shapes(actual, expected):
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert {k: v for k, v in actual.items() if v != expected[k]} == {}


@pytest.mark.parametrize("backbone,blocks_layer3,num_entries", [("resnet50", 6, 458), ("resnet101", 23, 713)])
def test_state_dict_matches_released_checkpoint(backbone, blocks_layer3, num_entries):
    model, criterion, _ = build_model(make_args(backbone=backbone))
    actual = shapes(model)
    expected = expected_detr_state_dict(blocks_layer3)
    assert len(expected) == num_entries
    assert_same_keys_and_shapes(actual, expected)
    assert not any("num_batches_tracked" in k for k in actual)
    # The no-object weight belongs to the criterion, not to the model checkpoint.
    assert "empty_weight" in criterion.state_dict()


@pytest.mark.parametrize("flags,expected_flags", [
    (dict(dilation=True), {}),
    (dict(position_embedding="learned"), dict(learned_pos=True)),
    (dict(position_embedding="v3"), dict(learned_pos=True)),
    (dict(pre_norm=True), dict(pre_norm=True)),
    (dict(num_classes=250, num_queries=300), dict(num_classes=250, queries=300)),
])
def test_flag_dependent_state_dict_keys(flags, expected_flags):
    model, _, _ = build_model(make_args(**flags))
    assert_same_keys_and_shapes(shapes(model), expected_detr_state_dict(6, **expected_flags))


def test_dilation_keeps_stride_16_in_layer4():
    x = NestedTensor(torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    with torch.no_grad():
        plain = Backbone("resnet50", train_backbone=False).eval()(x)["0"].tensors
        dc5 = Backbone("resnet50", train_backbone=False, dilation=True).eval()(x)["0"].tensors
    assert plain.shape == (1, 2048, 2, 3) and dc5.shape == (1, 2048, 4, 6)


def test_num_classes_default_is_coco_and_must_hold_every_category_id():
    model, criterion, _ = build_model(tiny_args(num_classes=None))
    assert model.class_embed.weight.shape[0] == 92 and criterion.empty_weight.shape[0] == 92
    model, _, _ = build_model(tiny_args(num_classes=8), category_ids=(1, 7))
    assert model.class_embed.weight.shape[0] == 9
    with pytest.raises(UserInputError, match="--num_classes 9"):
        build_model(tiny_args(num_classes=8), category_ids=(1, 8))


def test_state_dict_round_trips_strictly():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    buffer.seek(0)
    fresh, _, _ = build_model(tiny_args())
    fresh.load_state_dict(torch.load(buffer, weights_only=True)["model"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_frozen_batchnorm_loads_torchvision_weights_and_matches_batchnorm():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    state = reference.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)

    frozen = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    frozen.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(frozen(x), reference(x), atol=1e-4)


def test_frozen_batchnorm_formula():
    bn = FrozenBatchNorm2d(2)
    bn.load_state_dict({"weight": torch.tensor([2., 3.]), "bias": torch.tensor([1., -1.]),
                        "running_mean": torch.tensor([0.5, -2.]), "running_var": torch.tensor([4., 0.25]),
                        "num_batches_tracked": torch.tensor(7)}, strict=True)
    x = torch.randn(3, 2, 4, 5)
    expected = torch.stack([(x[:, 0] - 0.5) / math.sqrt(4 + 1e-5) * 2 + 1,
                            (x[:, 1] + 2.) / math.sqrt(0.25 + 1e-5) * 3 - 1], dim=1)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]


def test_frozen_batchnorm_keeps_the_autocast_dtype():
    """Under --amp the backbone runs in half precision between its convolutions: a frozen batch
    norm (float32 buffers) returned float32 and so did everything after it."""
    torch.manual_seed(0)
    frozen = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = frozen(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = frozen.layer1(frozen.maxpool(frozen.relu(frozen.bn1(frozen.conv1(x)))))
            out = frozen(x)
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("lr_backbone,trainable", [(1e-5, ("layer2", "layer3", "layer4")), (0.0, ())])
def test_backbone_trains_only_layer2_to_4(lr_backbone, trainable):
    model, _, _ = build_model(tiny_args(lr_backbone=lr_backbone))
    for name, p in model.backbone.named_parameters():
        child = name.split(".")[2]  # 0.body.<child>.…
        assert p.requires_grad == (child in trainable), name
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone"))


def test_failed_weight_download_names_url_and_fix(monkeypatch, tmp_path):
    def no_network(url, dst, *args, **kwargs):
        raise torch.hub.URLError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserInputError) as info:
        Backbone("resnet18", train_backbone=True, pretrained=True)
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--no_pretrained_backbone" in message and "hub/checkpoints" in message


def test_bad_backbone_flags_are_user_errors():
    with pytest.raises(UserInputError, match="resnet152"):
        Backbone("resnet152", train_backbone=True)
    with pytest.raises(UserInputError, match="--dilation"):
        Backbone("resnet18", train_backbone=True, dilation=True)


# ----------------------------------------------------------------------------- forward

def test_forward_shapes_masks_and_aux_outputs():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args())
    model.eval()
    images = [torch.randn(3, 70, 128), torch.randn(3, 128, 40)]
    samples = nested_tensor_from_tensor_list(images)

    features, pos = model.backbone(samples)
    assert len(features) == len(pos) == 1
    feat, mask = features[0].decompose()
    assert feat.shape == (2, 512, 4, 4) and pos[0].shape == (2, 32, 4, 4)
    # Nearest downsampling by 32: feature cell (r, c) reads input pixel (32r, 32c), so a
    # 70-pixel-high image keeps 3 rows (pixel 64 is valid) and a 40-pixel-wide one 2 columns.
    rows = torch.arange(4)[:, None] * 32
    cols = torch.arange(4)[None, :] * 32
    expected = torch.stack([(rows >= h) | (cols >= w) for h, w in ((70, 128), (128, 40))])
    assert torch.equal(mask, expected)

    with torch.no_grad():
        out = model(samples)
    assert out["pred_logits"].shape == (2, 10, 6)
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 10, 6)
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)

    # A list of images and a NestedTensor are the same input.
    with torch.no_grad():
        assert torch.allclose(model(images)["pred_logits"], out["pred_logits"], atol=1e-5)


def test_padding_mask_isolates_images_in_a_batch():
    """An image that needs no padding gets the same output alone or next to smaller images."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(aux_loss=False, num_queries=4))
    model.eval()
    big, small = torch.randn(3, 96, 128), torch.randn(3, 64, 64)
    with torch.no_grad():
        alone = model([big])
        batched = model([big, small])
        small_alone = model([small])
    assert "aux_outputs" not in alone
    assert torch.allclose(batched["pred_logits"][0], alone["pred_logits"][0], atol=1e-4)
    assert torch.allclose(batched["pred_boxes"][0], alone["pred_boxes"][0], atol=1e-5)
    # The padded image does see its padding (zeros through the backbone), so it differs.
    assert not torch.allclose(batched["pred_logits"][1], small_alone["pred_logits"][0], atol=1e-4)


def test_postprocess_scales_boxes_and_drops_no_object():
    logits = torch.tensor([[[0.0, 2.0, 1.0, 5.0],      # no-object most likely: still reports class 1
                            [3.0, 0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert len(results) == 1
    r = results[0]
    prob = logits.softmax(-1)[0]
    assert torch.equal(r["labels"], torch.tensor([1, 0]))
    assert torch.allclose(r["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    # (h, w) = (100, 200): x scales by 200, y by 100.
    assert torch.allclose(r["boxes"], torch.tensor([[80., 30., 120., 70.], [0., 50., 100., 100.]]))
    with pytest.raises(ValueError):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200], [1, 1]]))


# ----------------------------------------------------------------------------- transformer

@pytest.mark.parametrize("pre_norm", [False, True])
def test_layers_match_torch_transformer_layers_without_positions(pre_norm):
    """Same parameter names as torch.nn's layers, so the residual wiring can be checked against them."""
    torch.manual_seed(0)
    ours_enc = TransformerEncoderLayer(16, 2, 32, dropout=0.0, normalize_before=pre_norm).eval()
    ours_dec = TransformerDecoderLayer(16, 2, 32, dropout=0.0, normalize_before=pre_norm).eval()
    torch_enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=pre_norm).eval()
    torch_dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, norm_first=pre_norm).eval()
    torch_enc.load_state_dict(ours_enc.state_dict(), strict=True)
    torch_dec.load_state_dict(ours_dec.state_dict(), strict=True)

    src, tgt = torch.randn(12, 2, 16), torch.randn(5, 2, 16)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    with torch.no_grad():
        memory = ours_enc(src, src_key_padding_mask=mask)
        assert torch.allclose(memory, torch_enc(src, src_key_padding_mask=mask), atol=1e-5)
        assert torch.allclose(ours_dec(tgt, memory, memory_key_padding_mask=mask),
                              torch_dec(tgt, memory, memory_key_padding_mask=mask), atol=1e-5)


def test_positions_go_to_queries_and_keys_only():
    torch.manual_seed(0)
    enc = TransformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
    dec = TransformerDecoderLayer(16, 2, 32, dropout=0.0).eval()
    src, pos = torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    tgt, query_pos = torch.randn(5, 2, 16), torch.randn(5, 2, 16)

    def ffn(layer, x):
        return layer.linear2(torch.relu(layer.linear1(x)))

    with torch.no_grad():
        x = enc.norm1(src + enc.self_attn(src + pos, src + pos, src)[0])
        expected_memory = enc.norm2(x + ffn(enc, x))
        memory = enc(src, pos=pos)
        assert torch.allclose(memory, expected_memory, atol=1e-5)

        y = dec.norm1(tgt + dec.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        y = dec.norm2(y + dec.multihead_attn(y + query_pos, memory + pos, memory)[0])
        expected = dec.norm3(y + ffn(dec, y))
        assert torch.allclose(dec(tgt, memory, pos=pos, query_pos=query_pos), expected, atol=1e-5)


def test_decoder_norm_applies_to_every_intermediate_output():
    torch.manual_seed(0)
    stacked = Transformer(16, 2, 1, 3, 32, dropout=0.0, return_intermediate_dec=True).eval()
    last_only = Transformer(16, 2, 1, 3, 32, dropout=0.0, return_intermediate_dec=False).eval()
    # Layers end in a LayerNorm already: a non-trivial final norm makes its use visible.
    nn.init.uniform_(stacked.decoder.norm.weight, 0.5, 1.5)
    nn.init.uniform_(stacked.decoder.norm.bias, -1, 1)
    last_only.load_state_dict(stacked.state_dict(), strict=True)
    src, pos = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    query = torch.randn(5, 16)
    with torch.no_grad():
        hs, memory = stacked(src, mask, query, pos)
        hs_last, _ = last_only(src, mask, query, pos)
        assert hs.shape == (3, 2, 5, 16) and hs_last.shape == (1, 2, 5, 16) and memory.shape == src.shape
        assert torch.allclose(hs[-1], hs_last[0], atol=1e-6)
        # The first intermediate output is decoder.norm of the first layer's output.
        mem = memory.flatten(2).permute(2, 0, 1)
        query_pos = query[:, None].repeat(1, 2, 1)
        first = stacked.decoder.layers[0](torch.zeros_like(query_pos), mem, pos=pos.flatten(2).permute(2, 0, 1),
                                          query_pos=query_pos, memory_key_padding_mask=mask.flatten(1))
        assert torch.allclose(hs[0], stacked.decoder.norm(first).transpose(0, 1), atol=1e-5)


# ----------------------------------------------------------------------------- position encodings

def sine_reference(mask, num_pos_feats, normalize, offset=0.0, temperature=10000):
    """Evaluate the sine encoding pixel by pixel, in float64."""
    b, h, w = mask.shape
    out = torch.zeros(b, 2 * num_pos_feats, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                # Valid pixels up to and including this one (also evaluated on padding).
                y = float((~mask[n, :i + 1, j]).sum())
                x = float((~mask[n, i, :j + 1]).sum())
                if normalize:
                    y = (y + offset) / (float((~mask[n, :, j]).sum()) + 1e-6) * 2 * math.pi
                    x = (x + offset) / (float((~mask[n, i, :]).sum()) + 1e-6) * 2 * math.pi
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[n, k, i, j] = trig(y / freq)
                    out[n, num_pos_feats + k, i, j] = trig(x / freq)
    return out


@pytest.mark.parametrize("normalize,offset", [(True, 0.0), (True, -0.5), (False, 0.0)])
def test_sine_position_embedding_matches_formula(normalize, offset):
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[0, 3:, :] = True
    mask[0, :, 6:] = True
    mask[1, :, 4:] = True
    x = NestedTensor(torch.zeros(2, 3, 5, 7), mask)
    pos = PositionEmbeddingSine(8, normalize=normalize, offset=offset)(x)
    assert pos.shape == (2, 16, 5, 7) and pos.dtype == torch.float32
    expected = sine_reference(mask, 8, normalize, offset)
    # Padding is never attended to; with offset -0.5 a fully padded column even divides by ~0.
    valid = (~mask)[:, None].expand_as(pos)
    assert torch.allclose(pos.double()[valid], expected[valid], atol=1e-5)


def test_sine_offset_shifts_positions():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    x = NestedTensor(torch.zeros(1, 3, 4, 4), mask)
    detr = PositionEmbeddingSine(4, normalize=True)(x)
    deformable = PositionEmbeddingSine(4, normalize=True, offset=-0.5)(x)
    # Channel 0 is sin(2*pi*y/H): DETR's last row is sin(~2*pi) = ~0, Deformable's is sin(7/8 * 2*pi).
    assert detr[0, 0, -1, 0].item() == pytest.approx(0.0, abs=1e-5)
    assert deformable[0, 0, -1, 0].item() == pytest.approx(math.sin(3.5 / 4 * 2 * math.pi), abs=1e-5)


def test_learned_position_embedding_is_column_then_row():
    torch.manual_seed(0)
    pe = PositionEmbeddingLearned(6)
    x = NestedTensor(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.bool))
    pos = pe(x)
    assert pos.shape == (2, 12, 4, 5)
    for i in range(4):
        for j in range(5):
            assert torch.equal(pos[1, :6, i, j], pe.col_embed.weight[j])
            assert torch.equal(pos[1, 6:, i, j], pe.row_embed.weight[i])
    pos.sum().backward()
    assert pe.row_embed.weight.grad[:4].abs().sum() > 0 and pe.row_embed.weight.grad[4:].abs().sum() == 0


def test_build_position_encoding_aliases():
    for name, cls in (("sine", PositionEmbeddingSine), ("v2", PositionEmbeddingSine),
                      ("learned", PositionEmbeddingLearned), ("v3", PositionEmbeddingLearned)):
        pe = build_position_encoding(make_args(position_embedding=name, hidden_dim=64))
        assert type(pe) is cls
    assert build_position_encoding(make_args(hidden_dim=64)).num_pos_feats == 32
    with pytest.raises(UserInputError):
        build_position_encoding(make_args(position_embedding="v4"))
