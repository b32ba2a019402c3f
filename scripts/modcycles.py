#!/usr/bin/env python3
"""Import circles between the top-level modules of each library crate.

    scripts/modcycles.py [CRATE_DIR ...]     default: every workspace member with a src/lib.rs
    cargo modules dependencies --lib -p ftvm-ft --no-externs --no-sysroot \
        | scripts/modcycles.py --dot -        the same question answered from cargo-modules'
                                            item graph ("uses" edges folded to top-level modules)

A module `a` depends on a module `b` of the same crate when code of `a` (its file and every
file below it) names `crate::b` or, from the top level of `a`, `super::b` (`super::super::b`
one level down, and so on). Doc comments, comments, string literals and `#[cfg(test)]` items
are not code the crate is built from, so they are left out (cargo-modules' default, without
`--cfg-test`). Prints each circle found and exits 1 when there is one that KNOWN below does
not list (with its reason), or when a KNOWN one is gone; 0 otherwise.

Why a script and not `cargo modules dependencies --lib --acyclic` (which answers the same
question from rust-analyzer's view of the crate): installing cargo-modules builds
rust-analyzer's crates, minutes of a CI host's time for a check this one does in a fraction
of a second (the numbers are in the commit that added it). The two were compared once on
this workspace; they agreed.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Circles known and not yet broken, each with the reason: the check fails on any other circle,
# on a known one that grew, and on an entry here that no longer matches (remove it then).
KNOWN: dict = {}

# `#[cfg(test)]` followed by an item: `mod name { ... }`, `mod name;` or `use ...;`.
CFG_TEST = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?(mod\s+\w+\s*[{;]|use\s[^;]*;|fn\s)")


def strip_code(text: str) -> str:
    """`text` without comments, string and char literals, and #[cfg(test)] items."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    # Drop #[cfg(test)] items: a braced module up to its matching brace, else to the `;`.
    while True:
        m = CFG_TEST.search(code)
        if not m:
            return code
        start = m.start()
        if m.group(1).startswith("mod") and m.group(1).endswith("{") or m.group(1).startswith("fn"):
            j = code.find("{", m.end() - 1)
            depth, k = 0, j
            while k < len(code):
                if code[k] == "{":
                    depth += 1
                elif code[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            code = code[:start] + code[k + 1:]
        else:
            code = code[:start] + code[m.end():]


def top_modules(src: Path) -> dict:
    """Top-level module name -> its files (the module file and everything below it)."""
    mods = {}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix == ".rs" and p.stem not in ("lib", "main"):
            mods.setdefault(p.stem, []).append((p, 0))
        elif p.is_dir():
            for f in sorted(p.rglob("*.rs")):
                rel = f.relative_to(src)
                depth = len(rel.parts) - 1  # throttle/mod.rs: 1, throttle/pace.rs: 1
                if f.name == "mod.rs":
                    depth -= 1
                mods.setdefault(p.name, []).append((f, depth))
    # foo.rs with foo/ beside it (the 2018 layout): the files below belong to foo.
    return mods


def edges(src: Path) -> dict:
    mods = top_modules(src)
    names = set(mods)
    graph = {m: set() for m in names}
    for m, files in mods.items():
        for f, depth in files:
            code = strip_code(f.read_text())
            for target in re.findall(r"\bcrate::(\w+)", code):
                if target in names and target != m:
                    graph[m].add(target)
            # super::x from depth d: d+1 `super::` reach the crate root.
            sup = r"\b" + r"super::" * (depth + 1) + r"(\w+)"
            for target in re.findall(sup, code):
                if target in names and target != m:
                    graph[m].add(target)
            # `use super::{a, b}` / `use crate::{a::X, b}` groups at the root.
            root = r"(?:crate|" + "::".join(["super"] * (depth + 1)) + r")::\{([^}]*)\}"
            for group in re.findall(root, code):
                for item in re.split(r"[,\s]+", group):
                    head = item.split("::")[0]
                    if head in names and head != m:
                        graph[m].add(head)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def dot_graph(text: str) -> dict:
    """Top-level module graph from cargo-modules' `dependencies` output (its "uses" edges)."""
    graph = {}
    for a, b in re.findall(r'"([\w:]+)" -> "([\w:]+)" \[label="uses"', text):
        pa, pb = a.split("::"), b.split("::")
        if len(pa) < 2 or len(pb) < 2 or pa[0] != pb[0]:
            continue
        graph.setdefault(pa[1], set())
        graph.setdefault(pb[1], set())
        if pa[1] != pb[1]:
            graph[pa[1]].add(pb[1])
    # Items at the crate root (re-exports, functions of lib.rs) are not a module.
    return {m: {t for t in ts if t[:1].islower()} for m, ts in graph.items() if m[:1].islower()}


def report(name: str, graph: dict, known: dict) -> int:
    """Prints the circles of crate `name`; returns how many are not in `known` (which loses
    the entries seen)."""
    found = 0
    for comp in cycles(graph):
        why = known.pop((name, tuple(comp)), None)
        inner = {m: sorted(graph[m] & set(comp)) for m in comp}
        tag = f" (known: {why})" if why else ""
        print(f"{name}: import circle between {', '.join(comp)}{tag}")
        for m in comp:
            print(f"  {m} -> {', '.join(inner[m])}")
        found += why is None
    return found


def main(argv: list) -> int:
    if argv[:1] == ["--dot"]:
        text = sys.stdin.read() if argv[1:] in ([], ["-"]) else Path(argv[1]).read_text()
        found = report("cargo-modules graph", dot_graph(text), {})
        print(f"{found} import circle(s)" if found else "no import circles")
        return 1 if found else 0
    crates = [Path(a) for a in argv] or sorted(p.parent.parent for p in ROOT.glob("*/src/lib.rs"))
    known = {k: v for k, v in KNOWN.items() if ROOT / k[0] in [c.resolve() for c in crates]}
    found = 0
    for crate in crates:
        found += report(crate.resolve().name, edges(crate / "src"), known)
    for (name, comp), why in known.items():
        found += 1
        print(f"{name}: the known circle between {', '.join(comp)} is gone: remove it from KNOWN")
    if found:
        print(f"{found} import circle(s) not known (or known ones gone)")
        return 1
    but = " but the known ones" if KNOWN else ""
    print(f"no import circles between the top-level modules of {len(crates)} crate(s){but}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
