"""YAML files from users (model configs, job files), read with a safe loader into a mapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_mapping"]


def load_mapping(path: Path, label: str, error: Callable[[str], Exception],
                 what: str = "a mapping") -> dict[str, Any]:
    """The mapping in ``path`` (empty file: ``{}``); anything else raises ``error`` with one line starting
    with ``label``. Object tags (``!!python/...``) are refused, never constructed."""
    if path.is_dir():
        raise error(f"{label}: is a folder, not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{label}: not UTF-8 text (YAML files are read as UTF-8)") from None
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or exc})") from None
    except yaml.constructor.ConstructorError as exc:
        tag = f" {exc.problem.split('tag', 1)[-1].strip()}" if exc.problem and "tag" in exc.problem else ""
        raise error(f"{label}: refused a Python object tag{tag}; YAML is read with a safe loader "
                    "(plain keys and values only)") from None
    except yaml.YAMLError as exc:
        raise error(f"{label}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{label}: top level must be {what}, got {type(data).__name__}")
    return data
