"""Compiled key shapes: the fast path for keys that differ only in their values.

Kernel upcall keys come in few shapes (the same attributes, in the same order, with
the same lengths) while their values change with every new flow. The first time a
shape repeats, its plan is compiled into two Python functions: one `struct` unpack per
byte order for every fixed field, and one f-string with the plan's literal text around
the values. A later key of that shape is recognised with one more unpack, of its
attribute headers, compared with the shape's.

A storm's new flows differ in some attributes (addresses, ports, eth()) and share
others (priority, in_port, mark, conntrack state, the tunnel's endpoints). A run of
shared attributes is printed once for each distinct run of bytes, and looked up after
that: in the benchmark's storm of new flows a key's text took 2.1 µs instead of 2.6.

Everything here is bounded: compiled shapes, candidates per key length, the count of
shapes seen once, and the runs' texts kept (RunTexts).
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from upcall_capture.flowkey import layouts as lay
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
    Piece,
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


# Layouts whose values a storm's flows share more often than not: an upcall's metadata
# and the tunnel's endpoints. Not dp_hash, the tunnel's UDP source port, the conntrack
# tuple or eth(), which follow the flow or the pair of hosts (in the benchmark's mix of
# 4,000 flows, 3,660 eth() and 444 tp_src; 38 tunnel sources, 10 VLANs, 5 in_ports): a
# run with one of them would miss nearly every time.
SHARED = frozenset({
    lay.RECIRC_ID, lay.PRIORITY, lay.SKB_MARK, lay.IN_PORT, lay.CT_STATE, lay.CT_ZONE,
    lay.CT_MARK, lay.CT_LABELS, lay.PACKET_TYPE, lay.VLAN, lay.ETHERTYPE,
    lay.TUN_ID, lay.TUN_IPV4_SRC, lay.TUN_IPV4_DST, lay.TUN_IPV6_SRC, lay.TUN_IPV6_DST,
    lay.TUN_TOS, lay.TUN_TTL, lay.TUN_TP_DST,
})
# Shared layouts in a row worth a look-up: a look-up costs about what printing two or
# three values does.
MIN_RUN = 3
# Texts kept for the runs of all the shapes of a ShapeCache, some 400 bytes each: in the
# benchmark's storm of new flows (16 shapes), 7% of look-ups missed at 64 a run, 2% at
# 256 and 1,024.
MAX_RUN_TEXTS = 4096


def _runs(pieces: Sequence[Piece]) -> list[range]:
    """The runs of shared layouts in a plan's pieces (with the literals between them),
    MIN_RUN layouts long at least, as ranges of piece indexes."""
    runs: list[range] = []
    first = last = None
    count = 0
    for index, piece in enumerate([*pieces, (CALL,)]):  # a sentinel ends the last run
        if piece[0] == LAYOUT and piece[1] in SHARED:
            first = index if first is None else first
            last, count = index, count + 1
        elif piece[0] not in (LITERAL, CONST):  # nothing printed between: still a run
            if count >= MIN_RUN:
                runs.append(range(first, last + 1))
            first, count = None, 0
    return runs


def _source(pieces: Sequence[tuple[int, Piece]], namespace: dict[str, Any],
            with_fields: bool, name: str, captured: int) -> tuple[list[str], str]:
    """Python source that prints the (index, piece) given, for a key of `captured` bytes
    in `data`: the statements (unindented) that unpack the values (and with_fields,
    fill the fields dict `f`), and the f-string of the text. Objects it needs go into
    `namespace`, under names made with `name`. A piece `(_TEXT, source)` is an
    f-string's part, as is."""
    entries: dict[str, list[tuple[int, str, str]]] = {"<": [], ">": []}
    body: list[str] = []
    text: list[str] = []
    fields_arg = "f" if with_fields else "None"
    for index, piece in pieces:
        kind = piece[0]
        if kind == _TEXT:
            text.append(piece[1])
        elif kind == LITERAL:
            literal = piece[1]
            if any(c in literal for c in '"\\\n'):
                namespace[f"_k{index}"] = literal
                text.append(f"{{_k{index}}}")
            else:
                text.append(_escape(literal))
        elif kind == LAYOUT:
            layout, offset = piece[1], piece[2]
            prefix = f"v{index}_"
            for value, code, rel in layout.values:
                entries[layout.order].append((offset + rel, code, prefix + value))
            text.append(expand(layout.text, prefix))
            if with_fields:
                body += [f"f[{field!r}] = {expand(e, prefix)}" for field, e in layout.fields]
        elif kind == CALL:
            namespace[f"_c{index}"] = piece[1]
            call = f"_c{index}(data, {fields_arg}, {', '.join(map(repr, piece[2]))})"
            if with_fields:
                body.append(f"t{index} = {call}")
                text.append(f"{{t{index}}}")
            else:
                text.append(f"{{{call}}}")
        elif kind == CONST:
            if with_fields:
                body.append(f"f[{piece[1]!r}] = {piece[2]!r}")
        else:
            text.append(f"{{_marker({captured}, full_len)}}")
    statements = []
    for order, unpack_name in (("<", f"_host_{name}"), (">", f"_net_{name}")):
        if entries[order]:
            fmt, targets = _gather(entries[order], order)
            namespace[unpack_name] = struct.Struct(fmt).unpack_from
            statements.append(f"({targets}) = {unpack_name}(data)")
    return statements + (["f = {}", *body] if with_fields else body), \
        fstring("".join(text))


_TEXT = -1  # a piece of _source's own: f-string source, as is


class _Table(dict):
    """A run's texts by its bytes: a dict that a WeakSet can hold, one table apart from
    another by identity."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


class RunTexts:
    """The texts of runs of shared layouts, by their bytes: a table for each run of each
    shape, MAX_RUN_TEXTS in all, every table emptied when they are full. A table goes
    with its shape's text function (nothing else holds it)."""

    def __init__(self) -> None:
        self._tables: weakref.WeakSet[_Table] = weakref.WeakSet()
        self._count = 0  # kept since the tables were last emptied, gone ones' included

    def table(self) -> dict[bytes, str]:
        table = _Table()
        self._tables.add(table)
        return table

    def keep(self, table: dict[bytes, str], run: bytes, text: str) -> str:
        if self._count >= MAX_RUN_TEXTS:
            for each in self._tables:
                each.clear()
            self._count = 0
        table[run] = text
        self._count += 1
        return text


def _compile(plan: Plan, with_fields: bool, runs: RunTexts | None = None
             ) -> Callable[..., Any]:
    """The text function of one shape, whose runs of shared layouts are looked up in
    `runs` by their bytes, and printed (and kept) when new; `with_fields`, its decode
    function (no runs: each key's fields are its own)."""
    namespace: dict[str, Any] = dict(TEMPLATE_GLOBALS, _marker=truncation_marker,
                                     _keep=None if runs is None else runs.keep)
    numbered = list(enumerate(plan.pieces))
    lines = ["def shape(data, full_len):"]
    for run in [] if runs is None else reversed(_runs(plan.pieces)):
        start, end = _span([numbered[i][1] for i in run])
        statements, text = _source(numbered[run.start:run.stop], namespace, False,
                                   f"run{run.start}", plan.captured)
        texts, found = f"_texts{run.start}", f"r{run.start}"
        namespace[texts] = runs.table()
        lines += [f"    {found} = {texts}.get(data[{start}:{end}])",
                  f"    if {found} is None:",
                  *(f"        {statement}" for statement in statements),
                  f"        {found} = _keep({texts}, data[{start}:{end}], {text})"]
        numbered[run.start:run.stop] = [(run.start, (_TEXT, f"{{{found}}}"))]
    statements, text = _source(numbered, namespace, with_fields, "shape", plan.captured)
    lines += [f"    {statement}" for statement in statements]
    lines.append(f"    return {text}, f" if with_fields else f"    return {text}")
    exec("\n".join(lines), namespace)  # noqa: S102 - source built only from our own tables
    return namespace.pop("shape")  # the namespace must not hold its function: no cycle


def _span(pieces: Sequence[Piece]) -> tuple[int, int]:
    """The bytes that a run's layouts print: from the first one's payload to the end of
    the last one's (the headers between are the shape's own)."""
    layouts = [(piece[2], piece[2] + piece[1].size) for piece in pieces if piece[0] == LAYOUT]
    return layouts[0][0], layouts[-1][1]


class CompiledShape:
    """One key shape: how to recognise it, and its text (and decode) functions."""

    __slots__ = ("headers", "check", "text", "port_at", "has_eth", "_plan", "_decode")

    def __init__(self, plan: Plan, runs: RunTexts) -> None:
        fmt, _ = _gather([(offset, "I", "h") for offset, _ in plan.headers], "<")
        self.check = struct.Struct(fmt).unpack_from
        self.headers = tuple(header for _, header in plan.headers)
        self.text: TextFn = _compile(plan, with_fields=False, runs=runs)
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
        self._runs = RunTexts()

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
        shapes.insert(0, CompiledShape(plan, self._runs))
        self._count += 1
        if len(shapes) > self.per_length:
            shapes.pop()
            self._count -= 1
