"""Untrusted files through the CLI: checkpoints and YAML never run code that came with them.

(Image names cannot make output paths escape OUT: ``test_reliability_inputs``; local Ray listens on
127.0.0.1 only: ``test_reliability_faults::test_soak_memory_stays_flat_and_ray_listens_on_loopback``.)
"""

from __future__ import annotations

import os
import re

import torch

from lrp_ray.sweep.cli import main


class _RunsACommand:
    """Unpickling this would run a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_crafted_checkpoint_is_refused_without_running_it(tiny_images, tiny_config, tmp_path, capsys, no_ray):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_final.pth"
    payload = {"model": {"detr.query_embed.weight": torch.zeros(5, 32)}, "hook": _RunsACommand(marker)}
    torch.save(payload, evil)
    out = tmp_path / "out"
    code = main(["--config", str(tiny_config), "--weights", str(evil), "--images", str(tiny_images),
                 "--out", str(out)])
    err = _one_error_line(capsys)
    assert code == 2 and not marker.exists() and not out.exists()
    assert re.search(r"--weights: .*model_final\.pth: .*weights_only=True\) refused for safety", err), err


def test_yaml_object_tags_are_refused_in_spec_and_config(tiny_images, tiny_config, tmp_path, capsys, no_ray):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"module: encoder\nlayers: {tag}\n")
    config = tmp_path / "config.yaml"
    config.write_text(tiny_config.read_text() + f"EXTRA: {tag}\n")
    base = ["--images", str(tiny_images), "--out", str(tmp_path / "out")]
    assert main(["--spec", str(spec), "--config", str(tiny_config), *base]) == 2
    err = _one_error_line(capsys)
    assert re.search(r"--spec .*job\.yaml: refused a Python object tag "
                     r".*python/object/apply:os\.system.*safe loader", err), err
    assert main(["--config", str(config), *base]) == 2
    err = _one_error_line(capsys)
    assert re.search(r"--config: .*config\.yaml: refused a Python object tag .*python/object/apply:os\.sys",
                     err), err
    assert not marker.exists() and not (tmp_path / "out").exists()
