"""Files that must survive a crash (written to a temporary sibling, then renamed into place); reading the
files a user writes (UTF-8 text, YAML mappings) with errors that name file, line and key; and
:class:`UserError`, the base of every error a user can fix.

Each error class of the package that a user can fix subclasses :class:`UserError` (and the builtin it
has always been, e.g. ``ValueError``), with a message that names what is wrong and how to fix it. The
command line prints one as a single line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """Something the user can fix (a config value, a file, a server, a run directory); the message names it
    (file, line, key, URL) and says how."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing an older one of the same name."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def cache_dir() -> Path:
    """Where generated data and converted models are cached: $LMDISTILL_CACHE, else ~/.cache/lmdistill."""
    return Path(os.environ.get("LMDISTILL_CACHE") or Path.home() / ".cache" / "lmdistill")


def utf8(data: bytes, path: str | Path, error: type[Exception], *, line: int | None = None) -> str:
    """`data` (the bytes of `path`, or of its line `line`) as text; `error` naming the file and line when it is
    not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{at}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _duplicate_key(node: yaml.Node, prefix: str = "", seen_nodes: set[int] | None = None) -> tuple[str, int, int] | None:
    """(dotted key, first line, second line) of the first key given twice in a mapping of the YAML tree, or None."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked
        return None
    seen_nodes.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if key.value in lines:
                return prefix + key.value, lines[key.value], key.start_mark.line + 1
            lines[key.value] = key.start_mark.line + 1
            children.append((f"{prefix}{key.value}.", value))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{prefix}[{i}].", item) for i, item in enumerate(node.value)]
    for child_prefix, child in children:
        found = _duplicate_key(child, child_prefix, seen_nodes)
        if found:
            return found
    return None


def read_yaml_mapping(path: Path, error: type[Exception], *, missing: str) -> dict[str, Any]:
    """The mapping a YAML file holds; raises `error` naming the file when it is absent (with `missing`),
    not UTF-8, not valid YAML (and the line), gives a key twice (the key and both lines), or is not a
    mapping at the top level. An empty file is an empty mapping."""
    path = Path(path)
    try:
        text = utf8(path.read_bytes(), path, error)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a YAML file") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader)) if text.strip() else None
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where}: not valid YAML ({what})") from None
    if duplicate:
        key, first, second = duplicate
        raise error(f"{path}:{second}: key {key} is given twice (first on line {first}); keep one")
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping")
    return data
