"""The C that reads recv_upcall's six arguments, from the probe site's argument spec.

bcc's bpf_usdt_readarg() reads each memory operand with a bpf_probe_read_user() of its
own, and each such call costs the traced program some 70 ns here. A probe site's spec
often places several arguments in one struct (the replay's: "8@(%rdi) 4@8(%rdi) ...";
OVS's -O2 build: "... 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)"). For a single x86-64 site we
write the reader ourselves: registers are read from pt_regs, and memory operands on the
same base register within MAX_SPAN bytes of each other are fetched with one read. Any
other case (several sites, other machines, operand forms we do not parse) gets bcc's
readarg.

Pure: spec text in, C text out. recv_upcall.c calls read_upcall_args(ctx, arg, mem) with
MAX_SPAN bytes of scratch memory (ARG_SPAN_MAX in the C) and gets arg[0..5] as u64 values,
or a non-zero return when memory could not be read. bcc's readarg calls stay in
recv_upcall.c itself: bcc rewrites them for the function they appear in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A read costs the traced program some 65 ns however little it copies; a few hundred bytes
# more in one read cost less. So OVS's 4@12(%rbx) and 8@568(%rbx) are read as one: with
# the replay built with OVS's layout (make bench's second probe-overhead column), the BPF
# program ran some 75 ns less a hit (kernel.bpf_stats_enabled). Not over a page: each page
# such a read touches then holds an operand, which the reads apart would have touched too.
MAX_SPAN = 1024

ARG_COUNT = 6

_REGISTERS = {
    **{name: "ax" for name in ("rax", "eax", "ax", "al")},
    **{name: "bx" for name in ("rbx", "ebx", "bx", "bl")},
    **{name: "cx" for name in ("rcx", "ecx", "cx", "cl")},
    **{name: "dx" for name in ("rdx", "edx", "dx", "dl")},
    **{name: "si" for name in ("rsi", "esi", "si", "sil")},
    **{name: "di" for name in ("rdi", "edi", "di", "dil")},
    **{name: "bp" for name in ("rbp", "ebp", "bp", "bpl")},
    **{name: "sp" for name in ("rsp", "esp", "sp", "spl")},
    **{f"r{n}{suffix}": f"r{n}" for n in range(8, 16) for suffix in ("", "d", "w", "b")},
}
_OPERAND = re.compile(
    r"^(?P<signed>-?)(?P<size>1|2|4|8)@(?:%(?P<reg>\w+)|\$(?P<const>-?\d+)"
    r"|(?P<offset>-?\d*)\(%(?P<base>\w+)\))$")


@dataclass(frozen=True)
class Operand:
    size: int
    signed: bool
    register: str | None = None  # pt_regs member, for a register or a memory base
    offset: int | None = None  # set for memory operands
    constant: int | None = None


def parse_spec(spec: str) -> list[Operand] | None:
    """The operands of an x86-64 stapsdt argument spec, or None if any is of a form we
    leave to bcc (index registers, %rip-relative, segment prefixes, high-byte registers)."""
    operands = []
    for token in spec.split():
        found = _OPERAND.match(token)
        if not found:
            return None
        size, signed = int(found["size"]), found["signed"] == "-"
        if found["const"] is not None:
            operands.append(Operand(size, signed, constant=int(found["const"])))
            continue
        register = _REGISTERS.get(found["reg"] or found["base"])
        if register is None:
            return None
        offset = None if found["reg"] else int(found["offset"] or 0)
        operands.append(Operand(size, signed, register, offset))
    return operands


def _typed(value: str, operand: Operand) -> str:
    """value (a u64 expression) cut to the operand's size and extended to 64 bits."""
    if operand.size == 8:
        return value
    bits = operand.size * 8
    return f"(u64)(s64)(s{bits})({value})" if operand.signed else f"(u64)(u{bits})({value})"


def _memory_groups(operands: list[Operand]) -> list[list[int]]:
    """Indexes of the memory operands, grouped so that each group is one read: same base
    register, spanning at most MAX_SPAN bytes."""
    memory = sorted((i for i, o in enumerate(operands) if o.offset is not None),
                    key=lambda i: (operands[i].register, operands[i].offset))
    groups: list[list[int]] = []
    for i in memory:
        if groups:
            first = operands[groups[-1][0]]
            this = operands[i]
            if (this.register == first.register
                    and this.offset + this.size - first.offset <= MAX_SPAN):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def direct_reader(spec: str) -> str | None:
    """read_upcall_args() for one site's spec, or None where bcc's readarg must do."""
    operands = parse_spec(spec)
    if operands is None or len(operands) != ARG_COUNT:
        return None
    lines = [f"/* Written for the site's spec: {spec} */",
             "static __always_inline int read_upcall_args(struct pt_regs *ctx, u64 *arg,",
             "                                            u8 *mem)",
             "{"]
    # Each group is read into `mem` and taken out of it before the next is read.
    for group in _memory_groups(operands):
        base = operands[group[0]]
        span = max(operands[i].offset + operands[i].size for i in group) - base.offset
        lines += [f"    if (bpf_probe_read_user(mem, {span}, "
                  f"(void *)(ctx->{base.register} + ({base.offset}))))",
                  "        return -1;"]
        for i in group:
            operand = operands[i]
            lines += [f"    u64 v{i} = 0;",
                      f"    __builtin_memcpy(&v{i}, mem + {operand.offset - base.offset}, "
                      f"{operand.size});",
                      f"    arg[{i}] = {_typed(f'v{i}', operand)};"]
    for i, operand in enumerate(operands):
        if operand.constant is not None:
            lines.append(f"    arg[{i}] = {_typed(f'{operand.constant}LL', operand)};")
        elif operand.offset is None:
            lines.append(f"    arg[{i}] = {_typed(f'ctx->{operand.register}', operand)};")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def args_reader(specs: list[str], machine: str) -> str | None:
    """read_upcall_args() for the sites' specs: our own for one x86-64 site, else None:
    recv_upcall.c then calls bcc's readarg (compiled with -DBCC_READARG)."""
    if machine == "x86_64" and len(specs) == 1:
        return direct_reader(specs[0])
    return None
