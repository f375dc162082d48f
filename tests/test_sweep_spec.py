"""Sweep requests: spec parsing, job files, flag merge, and bad requests (exit 2 before anything starts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrp_ray.sweep.cli import build_parser, main, parse_request
from lrp_ray.sweep.spec import (
    BadRequest,
    SweepSpec,
    format_indices,
    load_spec,
    merge_flags,
    parse_index_list,
    parse_queries,
    resolve_indices,
)

from .conftest import REPO, TINY_OVERRIDES

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_index_lists():
    assert parse_index_list("all") is None
    assert parse_index_list("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_index_list("233,100") == [100, 233]
    assert parse_index_list(5) == [5]
    assert parse_index_list([3, 1, 3]) == [1, 3]
    for bad in ("5-2", "a", "-1", [], [-1], True, "1;2"):
        with pytest.raises(ValueError):
            parse_index_list(bad)
    assert format_indices([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert resolve_indices("all", 4, "layers") == [0, 1, 2, 3]
    with pytest.raises(BadRequest, match=r"layers 6-7 out of range.*0-5"):
        resolve_indices("0-7", 6, "layers")
    assert parse_queries("top5") == "top5" and parse_queries("ALL") == "all"
    assert parse_queries("0,3") == [0, 3]
    with pytest.raises(ValueError):
        parse_queries("best")


def test_job_files_are_valid_and_documented():
    names = {p.name for p in JOBS}
    assert {"thesis_sweep.yaml", "quick_demo.yaml", "decoder_queries.yaml"} <= names
    for path in JOBS:
        data = load_spec(path)
        spec = merge_flags(data, {})
        assert spec.description, f"{path.name} needs a description"
        assert path.read_text().lstrip().startswith("#"), f"{path.name} should start with a comment"
    thesis = merge_flags(load_spec(REPO / "jobs" / "thesis_sweep.yaml"), {})
    assert thesis.module == "both" and thesis.layers == "all" and thesis.features == "all"


def test_flags_override_spec(tmp_path):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("module: encoder\nlayers: 0-2\nbatch_size: 8\nout: from_spec\n")
    spec, _ = parse_request(["--spec", str(spec_file), "--layers", "1", "--out", "from_flag"])
    assert (spec.module, spec.layers, spec.batch_size, spec.out) == ("encoder", "1", 8, "from_flag")
    spec, _ = parse_request(["--feature-chunk", "16", "--actors", "auto", "--opt", "INPUT.MIN_SIZE_TEST=64"])
    assert spec.feature_chunk == 16 and spec.actors == "auto" and spec.overrides == ["INPUT.MIN_SIZE_TEST=64"]


def test_unknown_spec_key_is_refused(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("modul: encoder\n")
    with pytest.raises(BadRequest, match=r"modul: unknown key"):
        load_spec(p)
    p.write_text("layers: [0, 1\n")
    with pytest.raises(BadRequest, match="not valid YAML"):
        load_spec(p)
    with pytest.raises(BadRequest, match="batch_size"):
        merge_flags({}, {"batch_size": 0})


def test_help_documents_flags_defaults_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--spec", "--config", "--weights", "--images", "--module", "--layers", "--features",
                 "--queries", "--rules", "--out", "--batch-size", "--feature-chunk", "--actors",
                 "--gpus-per-actor", "--cpus-per-actor", "--device", "--precision", "--compile", "--address",
                 "--resume", "--overwrite", "--heatmaps"):
        assert flag in text
    assert "(default: 4)" in text and "Exit codes" in text
    for code in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {code}" in text


@pytest.fixture()
def wrong_weights(tmp_path):
    """A config file and a checkpoint of a different architecture."""
    from lrp_ray.models import build_model, load_config

    cfg = load_config(None, TINY_OVERRIDES)
    cfg.to_yaml(tmp_path / "config.yaml")
    other = cfg.with_overrides({"MODEL.DETR.HIDDEN_DIM": 48})
    torch.save({"model": build_model(other).state_dict()}, tmp_path / "other.pth")
    return tmp_path


BAD_REQUESTS = {
    "layer out of range": (["--layers", "0-9"], r"encoder layers 2-9 out of range.*\(encoder layers 0-1\)"),
    "feature out of range": (["--features", "30-40"], r"features 32-40 out of range.*\(features 0-31\)"),
    "query out of range": (["--module", "decoder", "--queries", "7"], r"queries 7 out of range.*\(0-4\)"),
    "too many top queries": (["--module", "decoder", "--queries", "top9"], r"queries top9.*\(top1-top5\)"),
    "unknown module": (["--module", "middle"],
                       r"invalid choice: 'middle' \(choose from 'encoder', 'decoder', 'both'\)"),
    "batch size 0": (["--batch-size", "0"], r"batch_size: must be >= 1, got 0"),
    "feature chunk 0": (["--feature-chunk", "0"], r"feature_chunk: must be >= 1 or 'auto', got 0"),
    "bad layers syntax": (["--layers", "x-y"], r"layers: cannot read 'x-y'; expected 'all', 'a-b', 'a,b,c'"),
    "unknown flag": (["--layer", "1", "--featurez", "2"], r"unrecognized arguments: --featurez 2"),
    "missing image folder": (["--images", "/nonexistent/images"], r"/nonexistent/\S+: no such folder"),
    "missing weights": (["--weights", "/nonexistent/model.pth"], r"--weights /\S+: file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_exit_2_before_anything_starts(case, tiny_images, tiny_config, tmp_path, capsys, no_ray):
    args, pattern = BAD_REQUESTS[case]
    out = tmp_path / "out"
    base = ["--images", str(tiny_images), "--out", str(out), "--config", str(tiny_config)]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


def test_more_bad_requests(tiny_images, tiny_config, tmp_path, wrong_weights, capsys, no_ray):
    opts = ["--config", str(tiny_config)]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    spec_bad = tmp_path / "bad.yaml"
    spec_bad.write_text("features: all\nfeaturez: 3\n")
    spec_values = tmp_path / "values.yaml"
    spec_values.write_text("module: middle\nbatch_size: 0\nlayers: [a, 1]\n")
    spec_broken = tmp_path / "broken.yaml"
    spec_broken.write_text("layers: [0, 1\n")
    spec_list = tmp_path / "list.yaml"
    spec_list.write_text("- module: encoder\n")
    cases = [
        (["--images", str(empty), "--out", str(tmp_path / "o1"), *opts], "holds no image files"),
        (["--images", str(tiny_images), "--out", str(a_file), *opts],
         "--out .*a_file: is a file; give a folder"),
        (["--images", str(tiny_images), "--out", str(a_file / "sub"), *opts],
         "a_file is a file, not a folder"),
        (["--spec", str(spec_bad), "--images", str(tiny_images)],
         r"featurez: unknown key \(valid keys: .*module"),
        (["--spec", str(spec_values), "--images", str(tiny_images)],
         r"module: must be 'encoder', 'decoder' or 'both'; layers: expected .*; batch_size: must be >= 1"),
        (["--spec", str(spec_broken)], "broken.yaml: not valid YAML"),
        (["--spec", str(spec_list)], "top level must be a mapping of spec keys, got list"),
        (["--spec", str(tmp_path / "missing.yaml")], "file not found"),
        (["--images", str(tiny_images), "--out", str(tmp_path / "o2"), "--config",
          str(wrong_weights / "config.yaml"), "--weights", str(wrong_weights / "other.pth")],
         r"--weights: .*(size mismatch|shape|HIDDEN_DIM)"),
        (["--images", str(tiny_images), "--out", str(tmp_path / "o3"),
          "--config", str(tmp_path / "nope.yaml")], "--config .*file not found"),
        (["--images", str(tiny_images), "--out", str(tmp_path / "o4"), "--opt", "MODEL.DETR.HIDDEN_DIMM=4"],
         "unknown config key"),
    ]
    import re

    for args, pattern in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), (args, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_nonempty_foreign_out_is_refused(tiny_images, tiny_config, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not touch")
    opts = ["--config", str(tiny_config)]
    assert main(["--images", str(tiny_images), "--out", str(out), *opts]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "do not touch"


def test_spec_defaults_are_the_documented_ones():
    s = SweepSpec()
    assert (s.module, s.layers, s.features, s.rules, s.batch_size, s.out) == ("both", "all", "all", "cp", 4,
                                                                            "lrp_out")
    assert Path(s.out).parts[0] == "lrp_out"


def test_model_errors_blame_the_right_flag(tmp_path, tiny_images, tiny_config, capsys):
    base = ["--images", str(tiny_images), "--out", str(tmp_path / "out")]
    assert main([*base, "--config", str(tiny_config), "--opt", "MODEL.DETR.ENC_LAYERS=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--opt: invalid override: --opt MODEL.DETR.ENC_LAYERS='abc'" in err, err
    assert main([*base, "--config", str(tiny_config), "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--weights {tmp_path}: is a folder, not a file" in err, err


def test_unreadable_requests_are_one_line(tmp_path, tiny_images, tiny_config, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_bytes(b'features: "0-3"\nout: \xff\xfe\n')
    glob = str(tiny_images / "[z-a]*.png")
    cases = [(["--spec", str(spec)], "not UTF-8 text"),
             (["--spec", str(tmp_path)], "is a folder, not a file"),
             (["--config", str(tiny_config), "--images", glob], "not a valid glob")]
    for argv, msg in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err and "Traceback" not in err, err
