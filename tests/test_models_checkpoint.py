"""Checkpoint layouts (real key lists), mismatch messages, unsafe pickles, load_model."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from lrp_ray.models import (
    CheckpointError,
    CheckpointMismatchError,
    build_model,
    infer_config_overrides,
    load_config,
    load_model,
    load_weights,
)

FIX = Path(__file__).parent / "fixtures" / "detectron2-detr"


def random_state_dict(name: str, fill: str = "randn") -> dict[str, torch.Tensor]:
    """Tensors with exactly the keys, shapes and dtypes of a fixture's keys.json."""
    keys = json.loads((FIX / name / "keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k, v in keys.items():
        dtype = getattr(torch, v["dtype"])
        out[k] = torch.randn(v["shape"], generator=gen, dtype=dtype) if fill == "randn" \
            else torch.empty(v["shape"], dtype=dtype)
    return out


def small_model():
    return build_model(load_config(FIX / "d2-small" / "config.yaml"))


def test_d2_small_checkpoint_file_loads_exactly(tmp_path: Path) -> None:
    sd = random_state_dict("d2-small")
    path = tmp_path / "model_final.pth"
    extra = {"criterion.empty_weight": torch.ones(6)}  # the detectron2 wrapper's loss buffer
    torch.save({"model": {**sd, **extra}, "iteration": 123, "trainer": {"iteration": 123}}, path)
    model = small_model()
    report = load_weights(model, path)
    assert report.ok and report.layout == "detectron2" and report.ignored == ["criterion.empty_weight"]
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(sd)
    own = model.state_dict()
    assert len(own) == len(sd)
    for k, v in sd.items():
        assert torch.equal(own[k[len("detr."):]], v), k


def test_d2_r50_keys_match() -> None:
    sd = random_state_dict("d2-r50", fill="empty")
    model = build_model(load_config(FIX / "d2-r50" / "config.yaml"))
    report = load_weights(model, {"model": sd})
    assert report.ok and report.loaded == len(sd) == len(model.state_dict())


def test_original_detr_layout_converts() -> None:
    sd = random_state_dict("detr-original-r50", fill="empty")
    probe = torch.arange(256, dtype=torch.float32)
    sd["backbone.0.body.layer1.0.downsample.1.running_var"] = probe
    sd["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(5)
    model = build_model(load_config(None, ["MODEL.DETR.NUM_CLASSES", "91"]))
    report = load_weights(model, {"model": sd, "optimizer": {}, "epoch": 3})
    assert report.ok and report.layout == "detr" and report.loaded == len(sd) - 1
    assert "backbone.0.body.bn1.num_batches_tracked" in report.ignored
    assert torch.equal(model.backbone[0].backbone.res2[0].shortcut.norm.running_var, probe)
    assert model.class_embed.out_features == 92


def test_plain_and_state_dict_layouts(tmp_path: Path) -> None:
    sd = random_state_dict("d2-small")
    plain = {"module." + k[len("detr."):]: v for k, v in sd.items()}
    model = small_model()
    assert load_weights(model, plain).layout == "plain"
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {k[len("detr."):]: v for k, v in sd.items()}}, path)
    other = small_model()
    assert load_weights(other, path).ok
    assert torch.equal(other.query_embed.weight, sd["detr.query_embed.weight"])


def test_mismatch_message_names_keys_and_hint(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save({"model": random_state_dict("d2-small")}, path)
    wrong = build_model(load_config(FIX / "d2-small" / "config.yaml",
                                    ["MODEL.DETR.ENC_LAYERS", "2", "MODEL.DETR.NUM_CLASSES", "7"]))
    before = wrong.class_embed.bias.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(wrong, path)
    msg = str(info.value)
    assert "12 unexpected keys: transformer.encoder.layers.2." in msg
    assert "shape conflicts: class_embed.weight checkpoint [6, 64] vs model [8, 64]" in msg
    assert "checkpoint has 3 encoder layers, config says 2: set MODEL.DETR.ENC_LAYERS 3" in msg
    assert "set MODEL.DETR.NUM_CLASSES 5" in msg
    assert torch.equal(wrong.class_embed.bias, before)  # nothing loaded
    report = load_weights(wrong, path, strict=False)
    assert not report.ok and len(report.unexpected) == 12 and len(report.shape_mismatch) == 2
    assert torch.equal(wrong.query_embed.weight, torch.load(path)["model"]["detr.query_embed.weight"])


def test_missing_keys_are_reported() -> None:
    sd = random_state_dict("d2-small")
    del sd["detr.input_proj.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: input_proj\.bias"):
        load_weights(small_model(), {"model": sd})


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"x": torch.zeros(1)}, "evil": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocol 4 before refusing
        with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint.*refused for safety"):
            load_weights(small_model(), path)
    assert not marker.exists()


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_weights(small_model(), path)
    torch.save({"iteration": 3}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_weights(small_model(), path)


def test_infer_config_overrides() -> None:
    small = infer_config_overrides(random_state_dict("d2-small", fill="empty"))
    assert small == {
        "MODEL.DETR.HIDDEN_DIM": 64, "MODEL.DETR.NUM_OBJECT_QUERIES": 20, "MODEL.DETR.ENC_LAYERS": 3,
        "MODEL.DETR.DEC_LAYERS": 3, "MODEL.DETR.DIM_FEEDFORWARD": 256, "MODEL.DETR.PRE_NORM": False,
        "MODEL.DETR.NUM_CLASSES": 5, "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.RESNETS.DEPTH": 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    }
    orig = infer_config_overrides(random_state_dict("detr-original-r50", fill="empty"))
    assert orig["MODEL.RESNETS.DEPTH"] == 50 and orig["MODEL.DETR.NUM_CLASSES"] == 91
    assert orig["MODEL.DETR.ENC_LAYERS"] == 6 and orig["MODEL.RESNETS.WIDTH_PER_GROUP"] == 64


def test_load_model_infers_config_from_weights(tmp_path: Path) -> None:
    sd = random_state_dict("d2-small")
    path = tmp_path / "run" / "model_final.pth"
    path.parent.mkdir()
    torch.save({"model": sd}, path)
    model = load_model(weights=path)
    assert (model.cfg.hidden_dim, model.cfg.enc_layers, model.cfg.num_classes) == (64, 3, 5)
    assert model.cfg.nheads == 8  # cannot be inferred from weights
    assert not model.training
    (path.parent / "config.yaml").write_text((FIX / "d2-small" / "config.yaml").read_text())
    model = load_model(weights=str(path))
    assert model.cfg.nheads == 4 and model.cfg.min_size_test == 320
    assert torch.equal(model.class_embed.weight, sd["detr.class_embed.weight"])


def test_load_model_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model(FIX / "d2-small" / "config.yaml", tmp_path / "nope.pth")


def test_load_model_demo_is_deterministic() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = load_model(), load_model()
    assert not a.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    from lrp_ray.models.build import DEMO_DIR

    bundled = (DEMO_DIR / "config.yaml").is_file() and (DEMO_DIR / "model_final.pth").is_file()
    want = load_config(DEMO_DIR / "config.yaml").stem_out_channels if bundled else 16
    assert a.cfg.hidden_dim == 64 and a.cfg.stem_out_channels == want


# --- Numerical check of the original-DETR conversion against a torchvision-convention ResNet ----------


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    scale = sd[f"{name}.weight"] / torch.sqrt(sd[f"{name}.running_var"] + 1e-5)
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _torchvision_resnet(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: list[int],
                        bottleneck: bool) -> torch.Tensor:
    """torchvision ResNet (stride in the 3x3 conv) written out on a ``backbone.0.body.*`` state dict."""
    p = "backbone.0.body."
    sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    conv = torch.nn.functional.conv2d
    relu = torch.relu
    x = relu(_bn(conv(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = torch.nn.functional.max_pool2d(x, 3, 2, 1)
    for layer, n in enumerate(blocks, start=1):
        for i in range(n):
            b = f"layer{layer}.{i}."
            stride = 2 if i == 0 and layer > 1 else 1
            if bottleneck:
                out = relu(_bn(conv(x, sd[b + "conv1.weight"]), sd, b + "bn1"))
                out = relu(_bn(conv(out, sd[b + "conv2.weight"], stride=stride, padding=1), sd, b + "bn2"))
                out = _bn(conv(out, sd[b + "conv3.weight"]), sd, b + "bn3")
            else:
                out = relu(_bn(conv(x, sd[b + "conv1.weight"], stride=stride, padding=1), sd, b + "bn1"))
                out = _bn(conv(out, sd[b + "conv2.weight"], padding=1), sd, b + "bn2")
            if b + "downsample.0.weight" in sd:
                x = _bn(conv(x, sd[b + "downsample.0.weight"], stride=stride), sd, b + "downsample.1")
            x = relu(out + x)
    return x


def _to_original_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (detectron2) names -> original DETR names, written independently of the loader."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("backbone.0.backbone."):
            out[k] = v
            continue
        rest = k[len("backbone.0.backbone."):]
        parts = rest.split(".")
        if parts[0] == "stem":
            new = "bn1." + parts[-1] if parts[2] == "norm" else "conv1." + parts[-1]
        else:
            layer, block, conv = int(parts[0][3:]) - 1, parts[1], parts[2]
            is_norm = parts[3] == "norm"
            if conv == "shortcut":
                tail = ("downsample.1." if is_norm else "downsample.0.") + parts[-1]
            else:
                tail = (f"bn{conv[4:]}." if is_norm else f"{conv}.") + parts[-1]
            new = f"layer{layer}.{block}.{tail}"
        out["backbone.0.body." + new] = v
        if new.endswith("running_var"):
            out["backbone.0.body." + new.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    return out


@pytest.mark.parametrize("depth, blocks, bottleneck, res2", [
    (18, [2, 2, 2, 2], False, 8), (50, [3, 4, 6, 3], True, 32)])
def test_original_layout_matches_torchvision_resnet(depth: int, blocks: list[int], bottleneck: bool,
                                                    res2: int) -> None:
    cfg = load_config(None, ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
                             "MODEL.RESNETS.RES2_OUT_CHANNELS", str(res2),
                             "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
                             "MODEL.DETR.HIDDEN_DIM", "16", "MODEL.DETR.NHEADS", "2",
                             "MODEL.DETR.DIM_FEEDFORWARD", "16", "MODEL.DETR.ENC_LAYERS", "1",
                             "MODEL.DETR.DEC_LAYERS", "1", "MODEL.DETR.NUM_OBJECT_QUERIES", "2"])
    gen = torch.Generator().manual_seed(3)
    source = build_model(cfg).state_dict()
    for k, v in source.items():
        if k.endswith("running_var"):
            source[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith(("norm.weight", "norm.bias", "running_mean")):
            source[k] = torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if k.endswith("weight") else 0.0)
        elif k.startswith("backbone") and v.dim() == 4:
            source[k] = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
    original = _to_original_names(source)
    model = build_model(cfg)
    report = load_weights(model, {"model": original})
    assert report.ok and report.layout == "detr"
    x = torch.randn(1, 3, 64, 80, generator=gen)
    with torch.no_grad():
        ours = model.backbone[0].backbone(x)
        ref = _torchvision_resnet(original, x, blocks, bottleneck)
    assert ours.shape == ref.shape == (1, res2 * 8, 2, 3)
    assert ref.abs().max() > 0
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("text", ["hello", "model weights v2\n", "{}", "cos\nsystem\n(S'true'\ntR."])
def test_a_text_file_as_weights_is_called_what_it_is(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pth"
    path.write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_weights(small_model(), path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    if "refused for safety" not in msg:  # a real pickle of code (the last case) is refused for safety
        assert "not a torch.save file" in msg and "Python objects" not in msg


def test_a_hidden_dim_mismatch_names_the_file_and_the_fix_first(tmp_path: Path) -> None:
    path = tmp_path / "model_final.pth"
    torch.save({"model": random_state_dict("d2-small")}, path)
    config = tmp_path / "config.yaml"
    config.write_text((FIX / "d2-small" / "config.yaml").read_text().replace("HIDDEN_DIM: 64",
                                                                            "HIDDEN_DIM: 128"))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config, path)
    msg = str(info.value)
    assert f"checkpoint {path} " in msg and "<state dict>" not in msg
    first_lines = msg.splitlines()[:2]
    assert first_lines[1].strip().startswith("hint: checkpoint has hidden dim 64, config says 128: "
                                             "set MODEL.DETR.HIDDEN_DIM 64")
