#!/usr/bin/env python3
"""Checks the two structural rules of the workspace:

1. Crates depend only downward in the data flow. Each crate has a layer
   (below); a normal (non-dev) dependency on a crate of the same or a higher
   layer fails. Dev-dependencies are free: tests may use anything.
2. Inside each crate, the module import graph has no cycle. Module A imports
   B when A's source names `crate::B` (in a `use` or a path) or `super::B`
   from a top-level file. A cycle means two files that cannot be read or
   changed one without the other.

Exits non-zero with the offending edges or cycles. Run by scripts/test.sh.
"""
import os
import re
import sys
import tomllib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# The data flow, bottom up. A crate may depend on crates of lower layers only.
LAYERS = {
    "runcast-core": 0,
    "runcast-telemetry": 1,
    "runcast-bus": 2,
    "runcast-nats": 3,
    "runcast-worker": 3,
    "runcast-gateway": 3,
    "runcast-bridge": 3,
    "runcast-operator": 4,
    "runcast-cli": 5,
    "runcast-test-support": 6,
}


def crates():
    base = os.path.join(ROOT, "crates")
    for name in sorted(os.listdir(base)):
        manifest = os.path.join(base, name, "Cargo.toml")
        if os.path.exists(manifest):
            with open(manifest, "rb") as f:
                yield os.path.join(base, name), tomllib.load(f)


def check_crate_deps():
    errors = []
    for _, m in crates():
        name = m["package"]["name"]
        if name not in LAYERS:
            errors.append(f"{name}: no layer in scripts/check_layers.py; add one")
            continue
        for dep in m.get("dependencies", {}):
            if dep in LAYERS and LAYERS[dep] >= LAYERS[name] and dep != name:
                errors.append(
                    f"{name} (layer {LAYERS[name]}) depends on {dep} (layer {LAYERS[dep]}): "
                    "an arrow that does not point down"
                )
    return errors


def modules(src):
    """Top-level modules of a crate: file stem -> source text (a `foo/`
    directory's files count as module `foo`)."""
    mods = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs"):
            stem = entry[:-3]
            if stem in ("lib", "main"):
                continue
            mods.setdefault(stem, "")
            mods[stem] += open(path, encoding="utf-8").read()
        elif os.path.isdir(path):
            for dirpath, _, files in os.walk(path):
                for f in files:
                    if f.endswith(".rs"):
                        mods.setdefault(entry, "")
                        mods[entry] += open(os.path.join(dirpath, f), encoding="utf-8").read()
    return mods


def strip_tests_and_comments(text):
    # Unit tests may reach anywhere in their crate; they are not layering.
    cut = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests", text, re.M)
    if cut:
        text = text[: cut.start()]
    return re.sub(r"//[^\n]*", "", text)


def imports(mods):
    graph = {}
    names = set(mods)
    for mod, text in mods.items():
        text = strip_tests_and_comments(text)
        found = set()
        for m in re.finditer(r"\bcrate::(\w+)", text):
            found.add(m.group(1))
        # `use crate::{a, b::c, d}` names several modules at once.
        for m in re.finditer(r"\bcrate::\{([^;]*?)\};", text, re.S):
            for part in re.split(r",", m.group(1)):
                word = re.match(r"\s*(\w+)", part)
                if word:
                    found.add(word.group(1))
        graph[mod] = sorted((found & names) - {mod})
    return graph


def reexports(src):
    """Names lib.rs re-exports (`pub use module::Name`): `crate::Name` in
    another module is an import of `module`."""
    lib = os.path.join(src, "lib.rs")
    if not os.path.exists(lib):
        return {}
    out = {}
    text = open(lib, encoding="utf-8").read()
    for m in re.finditer(r"pub use (\w+)::\{?([\w, ]+)\}?;", text):
        for name in m.group(2).split(","):
            out[name.strip()] = m.group(1)
    return out


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, []):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def check_modules():
    errors = []
    for path, m in crates():
        src = os.path.join(path, "src")
        mods = modules(src)
        graph = imports(mods)
        names = reexports(src)
        for mod, text in mods.items():
            body = strip_tests_and_comments(text)
            for name, owner in names.items():
                if owner != mod and owner in mods and re.search(rf"\bcrate::{name}\b|\bcrate::\{{[^}}]*\b{name}\b", body):
                    graph[mod] = sorted(set(graph[mod]) | {owner})
        for c in cycles(graph):
            errors.append(f"{m['package']['name']}: import cycle " + " -> ".join(c))
    return errors


def main():
    errors = check_crate_deps() + check_modules()
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        sys.exit(1)
    print("layers: every crate depends downward; no module import cycles")


if __name__ == "__main__":
    main()
