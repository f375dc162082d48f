"""detectron2 YAML configs: fixtures, _BASE_, overrides, validation, safe loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrp_ray.models import ConfigError, DetrConfig, load_config

FIX = Path(__file__).parent / "fixtures" / "detectron2-detr"


def test_defaults_are_detr_r50() -> None:
    cfg = load_config(None)
    assert cfg == DetrConfig()
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == (256, 8, 6, 6)
    assert (cfg.dim_feedforward, cfg.num_queries, cfg.num_classes, cfg.resnet_depth) == (2048, 100, 80, 50)
    assert cfg.pixel_mean == (123.675, 116.28, 103.53) and cfg.pixel_std == (58.395, 57.12, 57.375)
    assert cfg.input_format == "RGB" and not cfg.stride_in_1x1 and cfg.res2_out_channels == 256


def test_fixture_configs() -> None:
    small = load_config(FIX / "d2-small" / "config.yaml")
    assert (small.hidden_dim, small.nheads, small.enc_layers, small.dec_layers) == (64, 4, 3, 3)
    assert (small.dim_feedforward, small.num_queries, small.num_classes) == (256, 20, 5)
    assert (small.resnet_depth, small.res2_out_channels, small.min_size_test, small.max_size_test) == \
        (18, 64, 320, 512)
    r50 = load_config(str(FIX / "d2-r50" / "config.yaml"))
    assert r50 == DetrConfig()


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text(
        "MODEL:\n  META_ARCHITECTURE: Detr\n  DETR:\n    HIDDEN_DIM: 128\n    NHEADS: 4\n    ENC_LAYERS: 2\n"
        "INPUT:\n  FORMAT: BGR\n")
    (tmp_path / "bases" / "mid.yaml").write_text(
        "_BASE_: root.yaml\nMODEL:\n  DETR:\n    ENC_LAYERS: 4\n    DEC_LAYERS: 5\n"
        "SOLVER:\n  SOMETHING_UNUSED: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: bases/mid.yaml\nMODEL:\n  DETR:\n    DEC_LAYERS: 1\n")
    cfg = load_config(child)
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == (128, 4, 4, 1)
    assert cfg.input_format == "BGR"
    cfg = load_config(child, ["MODEL.DETR.ENC_LAYERS", "3", "INPUT.FORMAT=RGB", "MODEL.PIXEL_STD [1, 2, 3]",
                              "num_queries", "7"])
    assert cfg.enc_layers == 3 and cfg.input_format == "RGB" and cfg.pixel_std == (1.0, 2.0, 3.0)
    assert cfg.num_queries == 7 and cfg.dec_layers == 1


def test_circular_base(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_python_object_tag_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"MODEL: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="refused a Python object tag"):
        load_config(bad)
    assert not marker.exists()


@pytest.mark.parametrize("overrides, words", [
    (["MODEL.DETR.HIDDEN_DIM", "abc"], "MODEL.DETR.HIDDEN_DIM"),
    (["MODEL.DETR.PRE_NORM", "3"], "MODEL.DETR.PRE_NORM"),
    (["MODEL.DETR.NHEADS", "7"], "divisible by MODEL.DETR.NHEADS"),
    (["MODEL.PIXEL_MEAN", "[1, 2]"], "MODEL.PIXEL_MEAN must have 3 values"),
    (["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "only DETR"),
    (["MODEL.RESNETS.DEPTH", "42"], "MODEL.RESNETS.DEPTH"),
    (["INPUT.FORMAT", "YUV"], "INPUT.FORMAT"),
    (["MODEL.DETR.ENC_LAYER", "3"], "did you mean MODEL.DETR.ENC_LAYERS"),
    (["MODEL.DETR.ENC_LAYERS"], "has no value"),
])
def test_bad_values_name_the_key(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, overrides)


def test_wrong_type_in_file_names_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("MODEL:\n  DETR:\n    NUM_OBJECT_QUERIES: '100'\n")
    with pytest.raises(ConfigError, match=r"MODEL\.DETR\.NUM_OBJECT_QUERIES"):
        load_config(p)


def test_basic_block_resnet_default_width() -> None:
    assert load_config(None, ["MODEL.RESNETS.DEPTH", "34"]).res2_out_channels == 64
    narrow = load_config(None, ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16"])
    assert narrow.res2_out_channels == 16


def test_to_yaml_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(FIX / "d2-small" / "config.yaml",
                      ["INPUT.FORMAT", "BGR", "MODEL.DETR.PRE_NORM", "true"])
    path = tmp_path / "out.yaml"
    cfg.to_yaml(path)
    again = load_config(path)
    assert again == cfg and again.pre_norm and again.input_format == "BGR"
    assert "META_ARCHITECTURE: Detr" in path.read_text()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dilation_needs_bottleneck() -> None:
    with pytest.raises(ConfigError, match="RES5_DILATION 2 needs a bottleneck"):
        load_config(None, ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES5_DILATION", "2"])
    assert load_config(None, ["MODEL.RESNETS.RES5_DILATION", "2"]).res5_dilation == 2


def test_unknown_keys_in_checked_sections_are_refused_naming_the_closest(tmp_path):
    from lrp_ray.models.config import CHECKED_SECTIONS

    fixture = Path(__file__).parent / "fixtures" / "detectron2-detr" / "d2-r50" / "config.yaml"
    load_config(fixture)  # a real detectron2 dump: every key known
    text = fixture.read_text()
    for wrong, right in (("ENC_LAYERS", "ENC_LAYRS"), ("MIN_SIZE_TEST", "MIN_SIZ_TEST"),
                         ("STRIDE_IN_1X1", "STRIDE_IN1X1")):
        assert wrong in text
        bad = tmp_path / f"{right}.yaml"
        bad.write_text(text.replace(f"{wrong}:", f"{right}:", 1))
        with pytest.raises(ConfigError, match=rf"unknown config key \S*{right}; did you mean \S*{wrong}\?"):
            load_config(bad)
    # keys outside the checked sections (other detectron2 versions, solver settings) are left alone
    extra = tmp_path / "extra.yaml"
    extra.write_text(text + "SOLVER_EXTRA: 1\nMY_PROJECT:\n  KEY: 2\n")
    load_config(extra)
    assert "MODEL.DETR" in CHECKED_SECTIONS
