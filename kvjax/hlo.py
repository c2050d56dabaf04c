"""Reading compiled XLA HLO text: what a jitted decode loop does each step (tests and diagnosis)."""
from __future__ import annotations

import re


def while_body_ops(hlo: str) -> list[str]:
    """Instruction lines of every computation a compiled while loop's body reaches (its body, the
    fusions and calls inside it), from `jax.jit(f).lower(...).compile().as_text()`."""
    comps, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip())
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
            comps[name] = lines
        elif name is not None:
            lines.append(line)
    body = [re.search(r"body=%?([\w.\-]+)", l) for c in comps.values() for l in c if " while(" in l]
    todo = [m.group(1) for m in body if m]
    seen, out = set(), []
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        out += comps[c]
        for l in comps[c]:
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", l)
    return out
