"""Compiled key shapes: the fast path for keys that differ only in their values.

Kernel upcall keys come in few shapes (the same attributes, in the same order, with
the same lengths) while their values change with every new flow. The first time a
shape repeats, its plan is compiled into two Python functions: one `struct` unpack per
byte order for every fixed field, and one f-string with the plan's literal text around
the values. A later key of that shape is recognised with one more unpack, of its
attribute headers, compared with the shape's.

Everything here is bounded: compiled shapes, candidates per key length, and the count
of shapes seen once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from upcall_capture.flowkey.layouts import (
    ETHERNET,
    IN_PORT,
    TEMPLATE_GLOBALS,
    Fields,
    expand,
    fstring,
)
from upcall_capture.flowkey.walk import (
    CALL,
    CONST,
    LAYOUT,
    LITERAL,
    Plan,
    plan_key,
    render,
    truncation_marker,
)

# Plans longer than this (e.g. keys stuffed with MPLS labels) are not worth compiling.
MAX_COMPILED_PIECES = 400

TextFn = Callable[[bytes, int], str]
_U32 = struct.Struct("<I").unpack_from
DecodeFn = Callable[[bytes, int], tuple[str, Fields]]


def _gather(entries: list[tuple[int, str, str]], order: str) -> tuple[str, str]:
    """(struct format, target list) that unpacks (offset, code, name) entries at once."""
    fmt, names, cursor = [order], [], 0
    for offset, code, name in sorted(entries):
        if offset > cursor:
            fmt.append(f"{offset - cursor}x")
        fmt.append(code)
        names.append(name)
        cursor = offset + struct.calcsize(order + code)
    return "".join(fmt), "".join(f"{name}, " for name in names)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _compile(plan: Plan, with_fields: bool) -> Callable[..., Any]:
    """Python source for one shape; `with_fields` also builds the fields dict."""
    namespace: dict[str, Any] = dict(TEMPLATE_GLOBALS)
    namespace["_marker"] = truncation_marker
    entries: dict[str, list[tuple[int, str, str]]] = {"<": [], ">": []}
    body: list[str] = []
    text: list[str] = []
    fields_arg = "f" if with_fields else "None"
    for index, piece in enumerate(plan.pieces):
        kind = piece[0]
        if kind == LITERAL:
            literal = piece[1]
            if any(c in literal for c in '"\\\n'):
                namespace[f"_k{index}"] = literal
                text.append(f"{{_k{index}}}")
            else:
                text.append(_escape(literal))
        elif kind == LAYOUT:
            layout, offset = piece[1], piece[2]
            prefix = f"v{index}_"
            for name, code, rel in layout.values:
                entries[layout.order].append((offset + rel, code, prefix + name))
            text.append(expand(layout.text, prefix))
            if with_fields:
                body += [f"    f[{name!r}] = {expand(e, prefix)}" for name, e in layout.fields]
        elif kind == CALL:
            namespace[f"_c{index}"] = piece[1]
            call = f"_c{index}(data, {fields_arg}, {', '.join(map(repr, piece[2]))})"
            if with_fields:
                body.append(f"    t{index} = {call}")
                text.append(f"{{t{index}}}")
            else:
                text.append(f"{{{call}}}")
        elif kind == CONST:
            if with_fields:
                body.append(f"    f[{piece[1]!r}] = {piece[2]!r}")
        else:
            text.append(f"{{_marker({plan.captured}, full_len)}}")
    lines = ["def shape(data, full_len):"]
    for order, unpack_name in (("<", "_host"), (">", "_net")):
        if entries[order]:
            fmt, targets = _gather(entries[order], order)
            namespace[unpack_name] = struct.Struct(fmt).unpack_from
            lines.append(f"    ({targets}) = {unpack_name}(data)")
    if with_fields:
        lines += ["    f = {}", *body, f"    return {fstring(''.join(text))}, f"]
    else:
        lines.append(f"    return {fstring(''.join(text))}")
    exec("\n".join(lines), namespace)  # noqa: S102 - source built only from our own tables
    return namespace.pop("shape")  # the namespace must not hold its function: no cycle


class CompiledShape:
    """One key shape: how to recognise it, and its text (and decode) functions."""

    __slots__ = ("headers", "check", "text", "port_at", "has_eth", "_plan", "_decode")

    def __init__(self, plan: Plan) -> None:
        fmt, _ = _gather([(offset, "I", "h") for offset, _ in plan.headers], "<")
        self.check = struct.Struct(fmt).unpack_from
        self.headers = tuple(header for _, header in plan.headers)
        self.text: TextFn = _compile(plan, with_fields=False)
        # Where the text's in_port() is printed from (the last one, as in the fields),
        # and whether it has an eth(): the same at every key of the shape.
        layouts = [(piece[1], piece[2]) for piece in plan.pieces if piece[0] == LAYOUT]
        self.port_at = next((offset for layout, offset in reversed(layouts)
                             if layout is IN_PORT), None)
        self.has_eth = any(layout is ETHERNET for layout, _ in layouts)
        self._plan = plan
        self._decode: DecodeFn | None = None

    def port(self, data: bytes | memoryview) -> int | None:
        """The in_port of a key of this shape, as its text would show it."""
        return None if self.port_at is None else _U32(data, self.port_at)[0]

    def decode(self, data: bytes, full_len: int) -> tuple[str, Fields]:
        if self._decode is None:
            self._decode = _compile(self._plan, with_fields=True)
        return self._decode(data, full_len)


def _matching(shapes: Sequence[CompiledShape], data: bytes | memoryview) -> CompiledShape | None:
    for shape in shapes:
        if shape.check(data) == shape.headers:
            return shape
    return None


class ShapeCache:
    """Compiled shapes by captured key length, and the general walk for the rest."""

    def __init__(self, max_shapes: int = 256, per_length: int = 16, compile_after: int = 2) -> None:
        self.max_shapes = max_shapes
        self.per_length = per_length
        self.compile_after = compile_after
        self._whole: dict[int, list[CompiledShape]] = {}
        self._truncated: dict[int, list[CompiledShape]] = {}
        self._count = 0
        # Sightings by signature hash: a collision only compiles a shape one sighting early.
        self._seen: dict[int, int] = {}

    def __len__(self) -> int:
        """The number of compiled shapes held."""
        return self._count

    def _find(self, data: bytes, full_len: int) -> CompiledShape | None:
        if full_len > len(data):
            return _matching(self._truncated.get(len(data), ()), data)
        return self.whole(data)

    def whole(self, data: bytes | memoryview) -> CompiledShape | None:
        """The compiled shape of a whole key, or None. (_matching's loop, written out: in
        a storm too big to decode this runs for every upcall, and a call is a sixth of
        it.)"""
        for shape in self._whole.get(len(data), ()):
            if shape.check(data) == shape.headers:
                return shape
        return None

    def text(self, data: bytes, full_len: int) -> str:
        shape = self._find(data, full_len)
        if shape is not None:
            return shape.text(data, full_len)
        plan = plan_key(data, full_len)
        self._learn(plan)
        return render(plan, data, full_len, None)

    def decode(self, data: bytes, full_len: int) -> tuple[str, Fields]:
        shape = self._find(data, full_len)
        if shape is not None:
            return shape.decode(data, full_len)
        plan = plan_key(data, full_len)
        self._learn(plan)
        fields: Fields = {}
        return render(plan, data, full_len, fields), fields

    def _learn(self, plan: Plan) -> None:
        """Compile a shape on its `compile_after`-th sighting; one-off shapes stay walked."""
        if len(plan.pieces) > MAX_COMPILED_PIECES:
            return
        signature = hash(plan.signature)
        seen = self._seen.get(signature, 0) + 1
        if seen < self.compile_after:
            if len(self._seen) >= 4 * self.max_shapes:
                self._seen.clear()
            self._seen[signature] = seen
            return
        self._seen.pop(signature, None)
        if self._count >= self.max_shapes:
            self._whole.clear()
            self._truncated.clear()
            self._count = 0
        table = self._truncated if plan.truncated else self._whole
        shapes = table.setdefault(plan.captured, [])
        shapes.insert(0, CompiledShape(plan))
        self._count += 1
        if len(shapes) > self.per_length:
            shapes.pop()
            self._count -= 1
