#!/usr/bin/env python3
"""Module import graph of one Rust crate's src/ tree (node-engine by default).

Reads every `.rs` file under SRC, finds the `crate::a::b` paths it names (in `use` trees,
braces included, and inline paths) and `super::` paths, and folds each to a node: the module
path cut to DEPTH segments (default 2, e.g. `roles::reader`). Prints the edges between
different nodes, then the cycles (strongly connected components) and any arrow from one
`roles::X` to another `roles::Y`. Exits 1 when there is a cycle or a role->role arrow.

Usage: import_graph.py [SRC] [--depth N] [--dot]
"""

import re
import sys
from pathlib import Path


def module_of(src: Path, f: Path) -> list[str]:
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def expand_use(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]"""
    tree = tree.strip()
    i = tree.find("{")
    if i < 0:
        return [tree.split(" as ")[0].strip()]
    prefix = tree[:i]
    body = tree[i + 1 : tree.rfind("}")]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    out = []
    for it in items:
        if it.strip():
            out += [prefix + p for p in expand_use(it)]
    return out


def main() -> int:
    args = sys.argv[1:]
    depth, dot = 2, False
    if "--depth" in args:
        k = args.index("--depth")
        depth = int(args[k + 1])
        del args[k : k + 2]
    if "--dot" in args:
        dot = True
        args.remove("--dot")
    src = Path(args[0] if args else "node-engine/src")
    edges: set[tuple[str, str]] = set()
    nodes: set[str] = set()
    for f in sorted(src.rglob("*.rs")):
        mod = module_of(src, f)
        me = "::".join(mod[:depth]) or "crate"
        nodes.add(me)
        text = strip_comments(f.read_text())
        # Drop unit-test modules: they may reach anywhere inside the crate.
        m = re.search(r"#\[cfg\(test\)\]\s*mod \w+\s*\{", text)
        if m:
            text = text[: m.start()]
        paths = []
        for u in re.finditer(r"\buse\s+(\w+::[^;]*);", text, flags=re.S):
            first = u.group(1).split("::")[0]
            child = src / Path(*mod, first) if mod else src / first
            if first in ("crate", "super", "self"):
                paths += expand_use(" ".join(u.group(1).split()))
            elif child.with_suffix(".rs").exists() or child.is_dir():
                # `use child::x` (2018 paths): a submodule of this module.
                paths += ["self::" + p for p in expand_use(" ".join(u.group(1).split()))]
        paths += re.findall(r"(?<![\w:])((?:crate|super)(?:::\w+)+)", text)
        for p in paths:
            segs = [s for s in p.split("::") if s]
            base = mod
            if segs[0] == "crate":
                target = segs[1:]
            elif segs[0] == "super":
                cur = base[:]
                while segs and segs[0] == "super":
                    cur = cur[:-1]
                    segs = segs[1:]
                target = cur + segs
            else:  # self::
                target = base + segs[1:]
                segs = segs[1:]
            # Keep only segments that are modules (lower-case names).
            tmods = []
            for s in target:
                if not re.fullmatch(r"[a-z_][a-z0-9_]*", s):
                    break
                tmods.append(s)
            # The last lower-case segment may be a function: keep it only if it is a module.
            while tmods and not (
                (src / Path(*tmods)).with_suffix(".rs").exists() or (src / Path(*tmods)).is_dir()
            ):
                tmods.pop()
            node = "::".join(tmods[:depth]) or "crate"
            if node != me and node != "crate":
                edges.add((me, node))
                nodes.add(node)
    adj: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        adj[a].add(b)
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                strong(w)
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
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    role_arrows = sorted(
        (a, b)
        for a, b in edges
        if a.startswith("roles::") and b.startswith("roles::") and a.split("::")[1] != b.split("::")[1]
    )
    if dot:
        print("digraph imports {")
        for a, b in sorted(edges):
            print(f'  "{a}" -> "{b}";')
        print("}")
    else:
        for a in sorted(adj):
            if adj[a]:
                print(f"{a} -> {', '.join(sorted(adj[a]))}")
    print(f"# {len(nodes)} modules, {len(edges)} edges", file=sys.stderr)
    for c in cycles:
        print("# cycle: " + " <-> ".join(c), file=sys.stderr)
    for a, b in role_arrows:
        print(f"# role -> role: {a} -> {b}", file=sys.stderr)
    if not cycles and not role_arrows:
        print("# no cycles, no role->role arrows", file=sys.stderr)
    return 1 if cycles or role_arrows else 0


if __name__ == "__main__":
    sys.exit(main())
