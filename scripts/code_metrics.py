"""The code's shape in figures, for before/after tables of structural work (issue 31): lines and methods per
class, the longest functions, import edges between top-level folders, and repeated blocks.

    python scripts/code_metrics.py            # markdown to stdout
    python scripts/code_metrics.py --json     # the same as JSON
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("trainer", "demo", "nodes", "research", "benchmarks", "scripts")
BLOCK = 6  # lines: a repeated block is this many identical (stripped, non-blank) lines in a row


def python_files(folders=FOLDERS) -> list[str]:
    out = []
    for folder in folders:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            out += [os.path.join(base, n) for n in names if n.endswith(".py")]
    return sorted(out)


def measure(paths: list[str]) -> dict:
    classes, functions, edges = [], [], collections.Counter()
    lines_per_folder = collections.Counter()
    for path in paths:
        relative = os.path.relpath(path, ROOT)
        folder = relative.split(os.sep)[0]
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        lines_per_folder[folder] += len(source.splitlines())
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                classes.append({"name": f"{relative}:{node.name}", "lines": node.end_lineno - node.lineno + 1,
                                 "methods": len(methods)})
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append({"name": f"{relative}:{node.name}", "lines": node.end_lineno - node.lineno + 1})
            elif isinstance(node, ast.ImportFrom) and node.level:
                parts = relative.split(os.sep)[:-1]
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = (base + (node.module or "").split("."))[0] if base else (node.module or "").split(".")[0]
                if target in FOLDERS and target != folder:
                    edges[f"{folder} -> {target}"] += 1
    return {"lines_per_folder": dict(lines_per_folder),
            "classes": sorted(classes, key=lambda c: -c["lines"])[:10],
            "functions": sorted(functions, key=lambda f: -f["lines"])[:10],
            "import_edges": dict(sorted(edges.items())), "repeated_blocks": repeated_blocks(paths)}


def repeated_blocks(paths: list[str], size: int = BLOCK) -> dict:
    """Windows of `size` identical stripped lines (imports and blanks left out) found in more than one place."""
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            lines = [(i + 1, line.strip()) for i, line in enumerate(handle)
                     if line.strip() and not line.strip().startswith(("import ", "from ", "#", '"""'))]
        for start in range(len(lines) - size + 1):
            window = "\n".join(text for _, text in lines[start:start + size])
            seen[hashlib.sha1(window.encode()).hexdigest()].append(f"{os.path.relpath(path, ROOT)}:{lines[start][0]}")
    repeats = {key: places for key, places in seen.items() if len(places) > 1}
    return {"windows": len(repeats), "places": sum(len(p) for p in repeats.values())}


def markdown(figures: dict) -> str:
    out = ["| folder | lines |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in sorted(figures["lines_per_folder"].items())]
    out += ["", "| largest classes | lines | methods |", "| --- | --- | --- |"]
    out += [f"| {c['name']} | {c['lines']} | {c['methods']} |" for c in figures["classes"]]
    out += ["", "| longest functions | lines |", "| --- | --- |"]
    out += [f"| {f['name']} | {f['lines']} |" for f in figures["functions"]]
    out += ["", "| import edge (relative imports) | count |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in figures["import_edges"].items()]
    blocks = figures["repeated_blocks"]
    out += ["", f"Repeated blocks of {BLOCK} lines: {blocks['windows']} distinct, in {blocks['places']} places."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    figures = measure(python_files())
    sys.stdout.write(json.dumps(figures, indent=1) + "\n" if "--json" in sys.argv else markdown(figures))
