"""The embedded default corpus: docstrings of the Python standard library, so no download is needed.

Files are parsed with `ast` (never imported) in sorted order, so one Python version always gives a
byte-identical corpus. One document per module, class or function docstring of at least `min_chars`
characters, identical texts kept once.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
SKIP_DIRS |= {"turtledemo", "ensurepip", "venv", "__phello__"}
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_modules(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source file worth reading, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        parts = Path(dirpath).relative_to(stdlib).parts
        for name in sorted(f for f in filenames if f.endswith(".py")):
            module = parts + (() if name == "__init__.py" else (name[:-3],))
            if module:
                yield ".".join(module), Path(dirpath) / name


def docstrings(tree: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of a module and every class or function nested in it."""
    if isinstance(tree, ast.Module) and (doc := ast.get_docstring(tree, clean=True)):
        yield prefix, doc
    for node in ast.iter_child_nodes(tree):
        name = f"{prefix}.{node.name}" if isinstance(node, _DEFINITIONS) else prefix
        if isinstance(node, _DEFINITIONS) and (doc := ast.get_docstring(node, clean=True)):
            yield name, doc  # clean=True applies inspect.cleandoc
        yield from docstrings(node, name)


def write_corpus(out_path: str | Path, max_mb: float = 64.0, min_chars: int = 200) -> dict:
    """Write the corpus as JSONL {"text", "source"}, stopping before it would exceed `max_mb`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    budget, seen = int(max_mb * 1e6), set()
    stats = {"documents": 0, "bytes": 0, "files": 0, "unparsable_files": 0, "capped": False}
    with open(out_path, "wb") as out:
        for module, path in stdlib_modules(stdlib):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                    tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                stats["unparsable_files"] += 1
                continue
            stats["files"] += 1
            for source, text in docstrings(tree, module):
                digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
                if len(text) < min_chars or digest in seen:
                    continue
                line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
                data = line.encode("utf-8", "surrogatepass")
                if stats["bytes"] + len(data) > budget:
                    stats["capped"] = True
                    return stats
                seen.add(digest)
                out.write(data)
                stats["documents"] += 1
                stats["bytes"] += len(data)
    return stats
