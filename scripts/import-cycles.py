#!/usr/bin/env python3
"""Circles of files that import each other, per crate of the workspace.

Reads every crate's src/ tree, maps each file to its module path (lib.rs/main.rs are
the root, a/mod.rs and a.rs are `a`), and draws an edge from a file to every module
of its own crate it names (`crate::a::b`, `super::x`, `self::y`, and `use` lists).
Prints each strongly connected component of more than one file, then the count.
Usage: scripts/import-cycles.py [ROOT]   (exit status 1 when there is a circle)
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")


def modules(src):
    out = {}
    for d, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(d, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            if len(rel) == 1 and rel[0] in ("lib", "main"):
                rel = []
            if rel and rel[0] == "bin":
                continue
            out[tuple(rel)] = os.path.join(d, f)
    return out


PATH = re.compile(r"\b(crate|super|self)((?:::\w+)+)")
USE_LIST = re.compile(r"use\s+(crate|super|self)::\{([^;]*)\};", re.S)


def targets(mod, text, known):
    """Modules of the crate that `text` (the file of `mod`) names."""
    names = []
    for m in USE_LIST.finditer(text):
        base, inner = m.group(1), m.group(2)
        for part in re.split(r",(?![^{]*\})", inner):
            part = part.strip().split(" as ")[0]
            head = re.split(r"::\{", part)[0]
            if head:
                names.append((base, head.split("::")))
    for m in PATH.finditer(text):
        names.append((m.group(1), m.group(2).strip(":").split("::")))
    out = set()
    for base, parts in names:
        if base == "crate":
            start = []
        elif base == "super":
            start = list(mod[:-1])
        else:
            start = list(mod)
        path = start + [p for p in parts if p and p != "self"]
        # The longest prefix that is a file of the crate.
        for n in range(len(path), 0, -1):
            t = tuple(path[:n])
            if t in known and t != mod:
                out.add(t)
                break
    return out


def sccs(graph):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


total = 0
for crate in sorted(os.listdir(root)):
    src = os.path.join(root, crate, "src")
    if not os.path.isfile(os.path.join(root, crate, "Cargo.toml")) or not os.path.isdir(src):
        continue
    known = modules(src)
    graph = {}
    for mod, path in known.items():
        text = open(path, encoding="utf-8").read()
        # Tests inside a file may reach anywhere; they are not the house's structure.
        text = re.split(r"#\[cfg\(test\)\]", text)[0]
        # Comments name modules without importing them.
        text = re.sub(r"//[^\n]*", "", text)
        graph[mod] = targets(mod, text, known) - {()} if mod != () else set()
    for comp in sccs(graph):
        if len(comp) > 1:
            total += 1
            names = sorted("::".join(c) or "lib" for c in comp)
            print(f"{crate}: {' <-> '.join(names)}")
print(f"{total} circle(s)")
sys.exit(1 if total else 0)
