"""Class names and label order, and plain image folders as users have them.

Label order is the one thing a user cannot see going wrong: a model trained with `zero, one, ..., nine` sorted
by hand but given folders sorted alphabetically (`eight, five, four, ...`) scores near chance before cleaning,
and a defense then "repairs" it into a model that is wrong for real. So labels come, in this order, from
1. an explicit class list (a `--classes` file, one name per line in label order; `class_names` in the spec or
   the job), which maps folder names / string labels to their index in that list;
2. folder names that are all integers (`0`, `1`, ...): the integer is the label;
3. otherwise the sorted folder names (printed, and stored in the report, so a wrong order is visible).

This module needs no torch and no numpy beyond what callers pass: the HTTP client uses `pack_folder`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DATA_INVALID, NBAError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLASS_NAMES_KEY = "class_names"  # in a spec, a job and a report
MAX_CLASS_NAME = 200


def check_class_names(names: Iterable[object], num_classes: int | None = None) -> list[str]:
    """Validate a class list: non-empty distinct strings, as many as the model has outputs (when known)."""
    out = [str(n).strip() for n in names]
    if not out or any(not n or len(n) > MAX_CLASS_NAME for n in out):
        raise NBAError(DATA_INVALID, f"class names must be non-empty strings of at most {MAX_CLASS_NAME} characters")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise NBAError(DATA_INVALID, f"class names repeat: {', '.join(dupes[:5])}")
    if num_classes is not None and len(out) != num_classes:
        raise NBAError(DATA_INVALID, f"{len(out)} class names given but the model has {num_classes} classes")
    return out


def read_class_file(path: str | os.PathLike) -> list[str]:
    """A text file with one class name per line, in label order (blank lines and `#` comments ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NBAError(DATA_INVALID, f"cannot read the class list {path}: {e}") from None
    return check_class_names(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def folder_labels(folders: Sequence[str], class_names: Sequence[str] | None = None) -> dict[str, int]:
    """{folder: label} by the rule in the module docstring."""
    folders = sorted(set(folders))
    if class_names:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise NBAError(DATA_INVALID, f"folder(s) {', '.join(map(repr, unknown[:5]))} are not in the class list "
                           f"({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''})")
        return {f: index[f] for f in folders}
    if all(f.isascii() and f.isdigit() for f in folders):
        return {f: int(f) for f in folders}
    return {f: i for i, f in enumerate(folders)}


def names_from_folders(labels: dict[str, int], num_classes: int | None = None) -> list[str] | None:
    """The class list implied by a {folder: label} map when it names every label (None if it does not)."""
    n = num_classes if num_classes is not None else (max(labels.values()) + 1 if labels else 0)
    by_label = {v: k for k, v in labels.items()}
    if n == 0 or set(by_label) != set(range(n)):
        return None
    return [by_label[i] for i in range(n)]


def labels_from_strings(values: Sequence[str], class_names: Sequence[str] | None) -> list[int]:
    """String labels (an npz `y` of str) -> indices into `class_names`; without a class list there is no order."""
    if not class_names:
        raise NBAError(DATA_INVALID, "y holds class names (strings): give the class list in label order (an npz "
                       "array 'classes', a --classes file, or class_names in the spec) or store integer labels")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise NBAError(DATA_INVALID, f"label(s) {', '.join(map(repr, unknown[:5]))} are not in the class list")
    return [index[v] for v in values]


def class_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for label in labels:
        if 0 <= int(label) < num_classes:
            counts[int(label)] += 1
    return counts


def class_warnings(counts: Sequence[int], class_names: Sequence[str] | None = None, tiny: int = 5) -> list[str]:
    """Human-readable warnings for classes with no images or fewer than `tiny`."""
    def name(i: int) -> str:
        return f"{i} ({class_names[i]})" if class_names and i < len(class_names) else str(i)

    missing = [name(i) for i, c in enumerate(counts) if c == 0]
    small = [f"{name(i)}: {c}" for i, c in enumerate(counts) if 0 < c < tiny]
    out = []
    if missing:
        out.append(f"no clean images for class(es) {', '.join(missing)}: the defense cannot preserve what it never "
                   f"sees, so accuracy on them may drop")
    if small:
        out.append(f"fewer than {tiny} clean images for class(es) {', '.join(small)}")
    return out


# ------------------------------------------------------------------------------------------- plain folders

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_folder(root: str | os.PathLike) -> dict[str, list[Path]]:
    """{class folder name: sorted image paths} for a folder of class subfolders (`root/<class>/<image>`)."""
    root = Path(root)
    classes: dict[str, list[Path]] = {}
    stray: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            images = sorted(p for p in entry.iterdir() if p.is_file() and _is_image(p))
            if images:
                classes[entry.name] = images
        elif _is_image(entry):
            stray.append(entry.name)
    if stray:
        raise NBAError(DATA_INVALID, f"{root} holds images outside class folders (e.g. {stray[0]!r}): put each "
                       f"image in a subfolder named after its class, root/<class>/<image>.png")
    if not classes:
        raise NBAError(DATA_INVALID, f"{root} has no class subfolders with .png/.jpg images (expected "
                       f"root/<class>/<image>.png)")
    return classes


def pack_folder(root: str | os.PathLike, dest: str | os.PathLike) -> dict[str, int]:
    """Write the class folders under `root` into a zip at `dest` (`<class>/<image>` members, stored, not
    recompressed: images are compressed already). Returns {class folder: number of images}."""
    classes = scan_folder(root)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, images in classes.items():
            for image in images:
                zf.write(image, f"{name}/{image.name}")
    return {name: len(images) for name, images in classes.items()}
