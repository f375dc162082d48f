"""Image discovery (folder searched recursively, or a glob) and per-image validation.

Image names are paths relative to the images root with ``/`` separators. They are only ever stored as
column values: no output path is built from an image name, so a name cannot make a write escape OUT.
Files that cannot be used become :class:`ImageError` rows (errors.csv) and the sweep goes on without them.
Byte-identical images under different names are all processed (each name is its own row set); the
manifest lists them under ``duplicate_images``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrp_ray.results import image_path, image_text

from . import interrupts
from .spec import BadRequest
from .writer import atomic_path

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "ImageInfo", "ImageError", "discover", "validate",
           "write_synthetic_images", "DEMO_IMAGES"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEMO_IMAGES = Path(__file__).resolve().parent.parent / "assets" / "demo" / "images"


@dataclass(frozen=True)
class ImageSet:
    root: Path
    names: list[str]
    source: str

    def path(self, name: str) -> Path:
        """The file of a (stored, text-form) image name."""
        return image_path(self.root, name)


@dataclass(frozen=True)
class ImageInfo:
    name: str
    height: int
    width: int
    sha1: str
    nbytes: int


@dataclass(frozen=True)
class ImageError:
    name: str
    reason: str


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


def _under(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        Path(os.path.abspath(path)).relative_to(folder)
        return True
    except ValueError:
        return False


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a relative glob (``**`` any folders, ``*``/``?`` within a name, ``[...]`` classes)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _walk(root: Path, exclude: Path | None) -> list[str]:
    """Image names under ``root`` (relative, posix), following folder links but entering every real
    folder once (a link loop such as ``sub/up -> ..`` ends there) and naming every real file once (its
    first name in sorted order)."""
    seen_dirs: set[tuple[int, int]] = set()
    found: list[tuple[str, tuple[int, int]]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _under(Path(dirpath) / d, exclude))
        for f in sorted(filenames):
            if not _is_image_name(f):
                continue
            path = Path(dirpath) / f
            try:
                fst = os.stat(path)
                key = (fst.st_dev, fst.st_ino)
            except OSError:  # a dangling link: kept, validation reports it
                key = (-1, len(found))
            found.append((image_text(path.relative_to(root).as_posix()), key))
            interrupts.check()
    names: list[str] = []
    seen_files: set[tuple[int, int]] = set()
    for name, key in sorted(found):
        if key not in seen_files:
            seen_files.add(key)
            names.append(name)
    return names


def discover(images: str, exclude: Path | None = None) -> ImageSet:
    """Images of a folder (recursive), a glob (``**`` recursive) or a single file; sorted by name.

    Folder and glob modes walk the same way: folder links are followed, every real folder is entered
    once (link loops end) and every real file is named once. Files under ``exclude`` (the output folder:
    heatmaps, cached images) are never inputs. Raises :class:`BadRequest` for a missing folder, a glob
    matching nothing, or no image files.
    """
    exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
    text = os.path.expanduser(str(images))
    exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
    if _has_magic(text):
        parts = Path(text).parts
        static: list[str] = []
        for part in parts:
            if _has_magic(part):
                break
            static.append(part)
        root = Path(*static) if static else Path(".")
        rest = Path(*parts[len(static):]).as_posix()
        try:
            pattern = _glob_regex(rest)
        except re.error as exc:
            raise BadRequest(f"--images {images}: not a valid glob ({exc})") from None
        names = [n for n in _walk(root, exclude) if pattern.fullmatch(n)] if root.is_dir() else []
        if not names:
            raise BadRequest(f"--images {images}: the glob matches no image files ({exts})")
        return ImageSet(root.resolve(), names, str(images))
    p = Path(text)
    if p.is_file() or (p.is_symlink() and not p.exists()):
        if not _is_image_name(p.name):
            raise BadRequest(f"--images {images}: not an image file name ({exts})")
        return ImageSet(p.parent.resolve(), [image_text(p.name)], str(images))
    if not p.exists():
        raise BadRequest(f"--images {images}: no such folder or file")
    if not p.is_dir():
        raise BadRequest(f"--images {images}: not a folder, file or glob")
    names = _walk(p, exclude)
    if not names:
        raise BadRequest(f"--images {images}: the folder holds no image files ({exts}, searched recursively)")
    return ImageSet(p.resolve(), names, str(images))


def _check_one(image_set: ImageSet, name: str) -> ImageInfo | ImageError:
    from lrp_ray.models.preprocess import ImageReadError, read_image

    path = image_set.path(name)
    try:
        if path.is_file() and path.stat().st_size == 0:
            return ImageError(name, "empty file (0 bytes)")
        arr = read_image(path)
        data = path.read_bytes()
    except ImageReadError as exc:
        return ImageError(name, exc.reason)
    except Exception as exc:  # anything else a reader can raise: keep going, record it
        return ImageError(name, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return ImageInfo(name, int(arr.shape[0]), int(arr.shape[1]), hashlib.sha1(data).hexdigest(), len(data))


def validate(image_set: ImageSet, threads: int = 4) -> tuple[list[ImageInfo], list[ImageError]]:
    """Read every image once; usable ones (with size and content hash) and the ones that failed."""
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    results = []
    try:
        for r in pool.map(lambda n: _check_one(image_set, n), image_set.names):
            results.append(r)
            interrupts.check()  # a stop request (Ctrl-C, SIGTERM) is honoured between images
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ok = [r for r in results if isinstance(r, ImageInfo)]
    bad = [r for r in results if isinstance(r, ImageError)]
    return ok, bad


def duplicate_groups(infos: list[ImageInfo]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = {}
    for info in infos:
        by_hash.setdefault(info.sha1, []).append(info.name)
    return [names for names in by_hash.values() if len(names) > 1]


def write_synthetic_images(folder: Path, n: int = 4) -> Path:
    """Deterministic synthetic scenes (rectangles and discs on gradients) as PNGs; returns ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(120, 160), (160, 120), (128, 128), (96, 200), (144, 176), (112, 144)]
    for i in range(n):
        path = folder / f"synthetic_{i:03d}.png"
        if path.is_file():
            continue
        rng = np.random.default_rng(1000 + i)
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 200, size=3)
        img = np.stack([base[c] + 40 * np.sin((xx * (c + 1) + yy) / (17 + 5 * c)) for c in range(3)], -1)
        for _ in range(3):
            color = rng.uniform(0, 255, size=3)
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
            if rng.random() < 0.5:
                sel = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            else:
                sel = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[sel] = color
        arr = np.clip(img, 0, 255).astype(np.uint8)
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    return folder
