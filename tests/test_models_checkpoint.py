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
    torch.save({"model": sd, "iteration": 123, "trainer": {"iteration": 123}}, path)
    model = small_model()
    report = load_weights(model, path)
    assert report.ok and report.layout == "detectron2"
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
    assert a.cfg.hidden_dim == 64 and a.cfg.stem_out_channels == 16
