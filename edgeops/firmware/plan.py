"""The static memory plan: every intermediate tensor at a fixed offset in one arena.

Tensors joined by a renaming operator (RESHAPE, SQUEEZE, EXPAND_DIMS) share one buffer. The
model's input is read where the caller keeps it and its output is written straight into the
caller's buffer, so neither takes arena space. Every other buffer lives from the step that
writes it to the last step that reads it; buffers are placed largest first at the lowest
offset that overlaps no buffer alive at the same time (greedy by size), 4-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeops.firmware.graph import Graph
from edgeops.firmware.lower import Step

__all__ = ["ALIGNMENT", "MemoryPlan", "plan_memory"]

ALIGNMENT = 4


@dataclass(frozen=True)
class Buffer:
    root: int
    size: int
    first: int
    last: int


@dataclass
class MemoryPlan:
    arena_bytes: int
    offsets: dict[int, int]
    """Arena offset of every tensor kept in the arena."""
    places: dict[int, str]
    """``input`` or ``output`` for the tensors that live in the caller's buffers."""
    buffers: list[Buffer]

    def ref(self, tensor: int) -> str:
        if tensor in self.places:
            return self.places[tensor]
        return f"(eo_arena + {self.offsets[tensor]})"


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_memory(graph: Graph, steps: list[Step]) -> MemoryPlan:
    """Decide where each tensor lives; alias steps that cannot alias turn into copies."""
    parent: dict[int, int] = {}

    def find(t: int) -> int:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    model_in, model_out = set(graph.inputs), set(graph.outputs)

    def holds(root: int, special: set[int]) -> bool:
        return any(find(t) == root for t in special)

    constant = {t.index for t in graph.tensors if t.is_constant}
    for step in steps:
        if not step.alias:
            continue
        if step.inputs[0] in constant:
            step.alias = False
            continue
        a, b = find(step.inputs[0]), find(step.outputs[0])
        clash = (holds(a, model_in) and holds(b, model_out)) or (
            holds(a, model_out) and holds(b, model_in)
        )
        if clash:
            step.alias = False  # written as a copy into the caller's output
            continue
        parent[b] = a
    members: dict[int, list[int]] = {}
    for step in steps:
        for t in step.inputs + step.outputs:
            if t in constant:
                continue
            members.setdefault(find(t), [])
            if t not in members[find(t)]:
                members[find(t)].append(t)
    places: dict[int, str] = {}
    for tensors in members.values():
        where = None
        if any(t in model_in for t in tensors):
            where = "input"
        elif any(t in model_out for t in tensors):
            where = "output"
        if where is not None:
            for t in tensors:
                places[t] = where
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for n, step in enumerate(steps):
        if step.alias:
            continue
        for t in step.outputs:
            root = find(t)
            first[root] = min(first.get(root, n), n)
            last[root] = max(last.get(root, n), n)
        for t in step.inputs:
            if t in constant:
                continue
            root = find(t)
            first[root] = min(first.get(root, n), n)
            last[root] = max(last.get(root, n), n)
    buffers = [
        Buffer(root, max(graph.tensor(t).size for t in tensors), first[root], last[root])
        for root, tensors in members.items()
        if tensors[0] not in places and root in first
    ]
    placed: list[tuple[Buffer, int]] = []
    for buffer in sorted(buffers, key=lambda b: (-b.size, b.first, b.root)):
        busy = sorted(
            (offset, offset + other.size)
            for other, offset in placed
            if other.first <= buffer.last and buffer.first <= other.last
        )
        offset = 0
        for start, end in busy:
            if offset + buffer.size <= start:
                break
            offset = max(offset, _align(end))
        placed.append((buffer, offset))
    root_offset = {buffer.root: offset for buffer, offset in placed}
    offsets = {
        t: root_offset[root]
        for root, tensors in members.items()
        if root in root_offset
        for t in tensors
    }
    arena = max((offset + buffer.size for buffer, offset in placed), default=0)
    return MemoryPlan(_align(arena), offsets, places, [b for b, _ in placed])
