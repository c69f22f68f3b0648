#!/usr/bin/env python
"""Regenerate the embedded default corpus from the CPython standard library installed here.

Output: ``src/hybrid_distill/data/default_corpus/corpus.jsonl.gz`` (records
``{"text", "kind": "prose"|"code", "source"}``) and ``manifest.json`` beside it.

Everything comes from the standard library (PSF License): prose is the Python language
reference shipped as ``pydoc_data.topics`` plus the docstrings of a fixed list of modules
(one API-reference-style document per module); code is the source of those same modules.
The output is deterministic for a given Python version (fixed module list, sorted
records, gzip with mtime 0), so rebuilding with the same Python gives identical bytes.

    python scripts/build_default_corpus.py            # writes the files
    python scripts/build_default_corpus.py --check    # exits 1 if the shipped files differ
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import io
import json
import re
import sys
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "hybrid_distill" / "data" / "default_corpus"
BUILT_WITH = "3.11"

# Source files used as code documents: pure-Python modules of moderate size and varied style.
CODE_MODULES = [
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections", "colorsys",
    "configparser", "difflib", "enum", "ipaddress", "logging", "subprocess",
    "contextlib", "copy", "csv", "dataclasses", "fileinput", "fnmatch", "fractions", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "http.cookies",
    "json", "json.decoder", "json.encoder", "numbers", "operator", "os", "pathlib", "pprint",
    "queue", "random", "reprlib", "sched", "secrets", "selectors", "shlex", "socketserver",
    "statistics", "string", "tempfile", "textwrap", "timeit", "tokenize", "traceback", "types",
    "urllib.parse", "uuid", "warnings", "weakref", "zipapp", "asyncio.locks", "asyncio.queues",
    "concurrent.futures._base", "sqlite3.dump", "tomllib._parser",
]

# Docstrings of every module under these top-level names (packages walked recursively, tests
# skipped) become prose documents, one per module.
PROSE_ROOTS = [
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2", "calendar",
    "cgi", "cmd", "code", "codecs", "codeop", "collections", "colorsys", "compileall",
    "concurrent", "configparser", "contextlib", "copy", "copyreg", "csv", "ctypes",
    "dataclasses", "datetime", "dbm", "difflib", "dis", "doctest", "email", "encodings",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes",
    "modulefinder", "multiprocessing", "netrc", "numbers", "opcode", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tkinter", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "turtle",
    "types", "typing", "unittest", "urllib", "uuid", "venv", "warnings", "wave", "weakref",
    "webbrowser", "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zoneinfo",
]

# Plain-text and HTML documents shipped in the stdlib directory (IDLE's docs, the license).
PROSE_FILES = ["LICENSE.txt", "idlelib/README.txt", "idlelib/HISTORY.txt", "idlelib/NEWS.txt",
               "idlelib/help.html"]


def module_path(stdlib: Path, name: str) -> Path:
    base = stdlib.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"stdlib module {name!r} not found under {stdlib}")


def _doc(node) -> str | None:
    doc = ast.get_docstring(node, clean=True)
    return doc.strip() if doc and doc.strip() else None


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def module_prose(name: str, tree: ast.Module) -> str:
    """An API-reference-style document: the module docstring, then each public class/function."""
    parts = []
    if doc := _doc(tree):
        parts.append(f"{name}\n{'=' * len(name)}\n\n{doc}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if doc := _doc(node):
                parts.append(f"{name}.{node.name}{_signature(node)}\n\n{doc}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc := _doc(node):
                parts.append(f"class {name}.{node.name}({bases})\n\n{doc}")
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not sub.name.startswith("_") or sub.name == "__init__"
                ):
                    if doc := _doc(sub):
                        parts.append(f"{name}.{node.name}.{sub.name}{_signature(sub)}\n\n{doc}")
    return "\n\n\n".join(parts)


def prose_modules(stdlib: Path) -> list[tuple[str, Path]]:
    """(module name, file) for every module under PROSE_ROOTS, tests excluded, in sorted order."""
    out = []
    for root in PROSE_ROOTS:
        single = stdlib / f"{root}.py"
        if single.is_file():
            out.append((root, single))
            continue
        pkg = stdlib / root
        if not (pkg / "__init__.py").is_file():
            raise FileNotFoundError(f"stdlib module {root!r} not found under {stdlib}")
        for f in sorted(pkg.rglob("*.py")):
            rel = f.relative_to(stdlib).with_suffix("")
            if any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in rel.parts):
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append((".".join(parts), f))
    return out


class _HTMLText(HTMLParser):
    """Visible text of the main content of a Sphinx HTML page, one line per block element."""

    BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "tr", "br", "section"}

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self.depth = 0  # nesting depth inside <div role="main">; 0 = outside

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "div"
        elif tag == "div" and ("role", "main") in attrs:
            self.depth = 1
        if self.depth and tag in self.BLOCKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag):
        if self.depth and tag in self.BLOCKS:
            self.chunks.append("\n")
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.chunks.append(data.replace("\u00b6", ""))

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.chunks).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def file_prose(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".html":
        parser = _HTMLText()
        parser.feed(text)
        text = parser.text()
    return text.strip()


def build_records(stdlib: Path) -> list[dict]:
    records = []
    topics_src = module_path(stdlib, "pydoc_data.topics").read_text(encoding="utf-8")
    # Read the literal dict with ast rather than importing, so the file is the only input.
    tree = ast.parse(topics_src)
    topics = next(
        ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "topics"
    )
    for key in sorted(topics):
        text = inspect.cleandoc(topics[key]).strip()
        if text:
            records.append({"text": text, "kind": "prose", "source": f"pydoc_data.topics:{key}"})
    for rel in PROSE_FILES:
        records.append({"text": file_prose(stdlib / rel), "kind": "prose", "source": rel})
    for name, path in prose_modules(stdlib):
        prose = module_prose(name, ast.parse(path.read_text(encoding="utf-8")))
        if len(prose) >= 200:
            records.append({"text": prose, "kind": "prose", "source": name})
    for name in CODE_MODULES:
        records.append({"text": module_path(stdlib, name).read_text(encoding="utf-8"), "kind": "code",
                        "source": name})
    records.sort(key=lambda r: (r["kind"] != "prose", r["source"]))
    return records


def serialize(records: list[dict]) -> bytes:
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(raw)
    return buf.getvalue()


def manifest(records: list[dict], blob: bytes) -> dict:
    def stats(kind):
        sel = [r for r in records if kind is None or r["kind"] == kind]
        return {"documents": len(sel), "chars": sum(len(r["text"]) for r in sel)}

    return {
        "file": "corpus.jsonl.gz",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "compressed_bytes": len(blob),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "total": stats(None),
        "prose": stats("prose"),
        "code": stats("code"),
        "license": "PSF-2.0 (Python Software Foundation License Version 2)",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version != BUILT_WITH:
        print(f"warning: shipped corpus was built with Python {BUILT_WITH}, this is {version}; output will differ",
              file=sys.stderr)
    records = build_records(Path(sysconfig.get_paths()["stdlib"]))
    blob = serialize(records)
    man = manifest(records, blob)
    if args.check:
        same = (args.out / "corpus.jsonl.gz").is_file() and (args.out / "corpus.jsonl.gz").read_bytes() == blob
        print("up to date" if same else "differs")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.jsonl.gz").write_bytes(blob)
    (args.out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    print(json.dumps(man, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
