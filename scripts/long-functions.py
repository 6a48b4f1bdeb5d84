#!/usr/bin/env python3
"""Functions longer than a limit outside tests, benchmarks, fuzz targets and the eBPF
program (the house rule: no function over ~120 lines).

Reads every `src/**/*.rs` of the workspace, skips `#[cfg(test)]` items, and measures
each `fn` from its signature to its closing brace (strings, characters and comments are
skipped while matching braces). Prints the longest ones; exit status 1 when any is over
the limit.
Usage: scripts/long-functions.py [--limit N] [--top N] [ROOT]
"""
import argparse
import pathlib
import re
import sys

SKIP_DIRS = {"tests", "benches", "target", "fuzz", "ebpf", "examples"}


def blank_literals(text):
    """The text with strings, chars and comments replaced by spaces (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = '"' + hashes
            j = text.find(end, i + len(hashes) + 2)
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i:j + 1])); i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x..'", text[i:i + 12]):
            m = re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x..'", text[i:i + 12])
            out.append(" " * len(m.group(0))); i += len(m.group(0))
        else:
            out.append(c); i += 1
    return "".join(out)


def closing(text, open_at):
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


def functions(path):
    text = blank_literals(path.read_text())
    skip = []
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text):
        skip.append((m.start(), closing(text, m.end() - 1)))
    for m in re.finditer(r"\bfn\s+(\w+)", text):
        if any(a <= m.start() <= b for a, b in skip):
            continue
        brace, semi = text.find("{", m.end()), text.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration without a body
        end = closing(text, brace)
        first = text.count("\n", 0, m.start()) + 1
        last = text.count("\n", 0, end) + 1
        yield last - first + 1, f"{path}:{first}", m.group(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=130)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("root", nargs="?", default=".")
    a = ap.parse_args()
    root = pathlib.Path(a.root)
    found = []
    for p in sorted(root.rglob("*.rs")):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or "src" not in rel.parts:
            continue
        found.extend(functions(rel if root == pathlib.Path(".") else p))
    found.sort(reverse=True)
    for lines, where, name in found[: a.top]:
        print(f"{lines:5} {name:30} {where}")
    over = [f for f in found if f[0] > a.limit]
    print(f"{len(over)} function(s) over {a.limit} lines")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
