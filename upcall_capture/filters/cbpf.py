"""Classic BPF programs (what libpcap's pcap_compile makes): run them in Python, or turn them
into C for the probe.

Both follow libpcap's own interpreter (bpf_filter.c, as pcap_offline_filter runs it): A, X and
sixteen scratch words start at zero; a load that does not fit inside the captured bytes ends
the program with 0 (no match); so does a division or modulo by X = 0; a shift by X >= 32
gives 0; `len` is the packet's original length. The result is the value of the RET that
ends the program: non-zero means the packet matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from upcall_capture.filters.errors import FilterError

# Instruction classes, sizes, modes and operations (pcap/bpf.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
SIZES = {0x00: 4, 0x08: 2, 0x10: 1}  # W, H, B
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
SRC_X = 0x08
RET_A = 0x10
TAX, TXA = 0x00, 0x80
MEMWORDS = 16
U32 = 0xFFFFFFFF

# Linux's socket-filter extensions are loads at offsets from SKF_AD_OFF (-0x1000) on: the
# packet's direction, interface, VLAN metadata. libpcap emits them for `inbound`, `outbound`
# and `ifindex`; an upcall has none of that metadata.
SKF_AD_OFF = 0xFFFFF000

# libpcap implements `protochain` with backward jumps, and a crafted chain of headers can
# make them loop. libpcap 1.10's interpreter would spin for ever; its development tree gives
# up after this many backward jumps, and so does run().
MAX_BACKWARD_JUMPS = 64

_VALID_CODES = frozenset(
    [RET, RET | RET_A]
    + [LD | size | mode for size in SIZES for mode in (ABS, IND)]
    + [LD | IMM, LD | MEM, LD | LEN, LDX | IMM, LDX | MEM, LDX | LEN, LDX | MSH | 0x10]
    + [ST, STX, MISC | TAX, MISC | TXA, ALU | NEG]
    + [ALU | op | src for op in (ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, MOD, XOR)
       for src in (0, SRC_X)]
    + [JMP | JA] + [JMP | op | src for op in (JEQ, JGT, JGE, JSET) for src in (0, SRC_X)]
)


@dataclass(frozen=True, slots=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


def signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


class Program:
    """A checked cBPF program: every opcode known, every jump inside the program."""

    def __init__(self, insns: Sequence[Insn]) -> None:
        if not insns:
            raise FilterError("libpcap returned an empty filter program")
        for pc, insn in enumerate(insns):
            if insn.code not in _VALID_CODES:
                raise FilterError(f"libpcap returned an unknown BPF opcode {insn.code:#x}")
            if _reads_packet(insn) and insn.k >= SKF_AD_OFF:
                raise FilterError("the packet filter uses Linux socket metadata (inbound, "
                                  "outbound, ifindex...), which upcalls do not have")
            if _uses_scratch(insn) and insn.k >= MEMWORDS:
                raise FilterError(f"libpcap returned a scratch word {insn.k} out of range")
            # As libpcap's own validator: no constant that would make the C undefined.
            op = insn.code & 0xF0
            if insn.code & 7 == ALU and not insn.code & SRC_X and (
                    (op in (DIV, MOD) and insn.k == 0) or (op in (LSH, RSH) and insn.k >= 32)):
                raise FilterError(f"libpcap returned a bad constant operand at {pc}")
            for target in self._targets(pc, insn):
                if not 0 <= target < len(insns):
                    raise FilterError(f"libpcap returned a program that leaves its end at {pc}")
        self.insns = tuple(insns)

    @staticmethod
    def _targets(pc: int, insn: Insn) -> tuple[int, ...]:
        if insn.code & 7 != JMP:
            return (pc + 1,) if insn.code & 7 != RET else ()
        if insn.code == JMP | JA:
            return (pc + 1 + signed32(insn.k),)
        return (pc + 1 + insn.jt, pc + 1 + insn.jf)

    @property
    def loops(self) -> bool:
        """True when a jump goes backward (protochain): such a program cannot be made into
        C for the probe, whose verifier wants a bound on every loop."""
        return any(target <= pc for pc, insn in enumerate(self.insns)
                   for target in self._targets(pc, insn))

    def run(self, packet: bytes, wirelen: int) -> int:
        """The program's result over the captured bytes of a packet of wirelen bytes."""
        insns = self.insns
        buflen = len(packet)
        a = x = 0
        mem = [0] * MEMWORDS
        pc = 0
        backward_jumps = 0
        while True:
            insn = insns[pc]
            pc += 1
            code, k = insn.code, insn.k
            cls = code & 7
            if cls == RET:
                return a if code & RET_A else k
            if cls == LD or cls == LDX:
                mode = code & 0xE0
                if mode == IMM:
                    value = k
                elif mode == MEM:
                    value = mem[k]
                elif mode == LEN:
                    value = wirelen & U32
                elif mode == MSH:
                    if k >= buflen:
                        return 0
                    value = (packet[k] & 0xF) << 2
                else:
                    offset = k if mode == ABS else x + k
                    size = SIZES[code & 0x18]
                    if offset + size > buflen:
                        return 0
                    value = int.from_bytes(packet[offset:offset + size], "big")
                if cls == LD:
                    a = value
                else:
                    x = value
            elif cls == ST:
                mem[k] = a
            elif cls == STX:
                mem[k] = x
            elif cls == ALU:
                a = _alu(code & 0xF0, a, x if code & SRC_X else k)
                if a is None:
                    return 0
            elif cls == JMP:
                op = code & 0xF0
                if op == JA:
                    step = signed32(k)
                    if step < 0:
                        backward_jumps += 1
                        if backward_jumps > MAX_BACKWARD_JUMPS:
                            return 0
                    pc += step
                else:
                    pc += insn.jt if _test(op, a, x if code & SRC_X else k) else insn.jf
            elif code & 0xF8 == TAX:
                x = a
            else:
                a = x

    def to_c(self, name: str) -> str:
        """A C function `u32 name(u8 *pkt, u32 len, u32 wirelen)` that returns what run() does,
        to follow C_PRELUDE.

        pkt points into the probe's record, where SNAPLEN bytes are always addressable; len is
        the captured length (at most SNAPLEN).
        """
        if self.loops:
            raise ValueError("a program with backward jumps has no C form")
        targets = {t for pc, insn in enumerate(self.insns) if insn.code & 7 == JMP
                   for t in self._targets(pc, insn)}
        slots = sorted({insn.k for insn in self.insns if _uses_scratch(insn)})
        used = {register for insn in self.insns for register in _registers(insn)}
        lines = [f"static __always_inline u32 {name}(u8 *pkt, u32 len, u32 wirelen)", "{"]
        lines += [f"    u32 {register} = 0;" for register in sorted(used)]
        if any(_reads_packet(insn) for insn in self.insns):
            lines.append("    u64 at;")
        if slots:
            lines.append("    u32 " + ", ".join(f"M{slot} = 0" for slot in slots) + ";")
        for pc, insn in enumerate(self.insns):
            if pc in targets:
                lines.append(f"L{pc}:")
            lines.append(f"    {_c_statement(pc, insn)}")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _uses_scratch(insn: Insn) -> bool:
    cls = insn.code & 7
    return cls in (ST, STX) or (cls in (LD, LDX) and insn.code & 0xE0 == MEM)


def _registers(insn: Insn) -> set[str]:
    """The registers, A and X, an instruction reads or writes."""
    cls, code = insn.code & 7, insn.code
    if cls == RET:
        return {"A"} if code & RET_A else set()
    if cls == MISC:
        return {"A", "X"}
    used = {"X"} if cls in (LDX, STX) or (cls == LD and code & 0xE0 == IND) else set()
    if cls in (LD, ST, ALU) or (cls == JMP and code & 0xF0 != JA):
        used.add("A")
    if cls in (ALU, JMP) and code & SRC_X:
        used.add("X")
    return used


def _reads_packet(insn: Insn) -> bool:
    return insn.code & 7 in (LD, LDX) and insn.code & 0xE0 in (ABS, IND, MSH)


def _alu(op: int, a: int, operand: int) -> int | None:
    """A op operand in 32 bits, or None where libpcap ends the program with 0."""
    if op == ADD:
        return (a + operand) & U32
    if op == SUB:
        return (a - operand) & U32
    if op == MUL:
        return (a * operand) & U32
    if op == DIV:
        return a // operand if operand else None
    if op == MOD:
        return a % operand if operand else None
    if op == OR:
        return a | operand
    if op == AND:
        return a & operand
    if op == XOR:
        return a ^ operand
    if op == LSH:
        return (a << operand) & U32 if operand < 32 else 0
    if op == RSH:
        return a >> operand if operand < 32 else 0
    return -a & U32  # NEG


def _test(op: int, a: int, operand: int) -> bool:
    if op == JEQ:
        return a == operand
    if op == JGT:
        return a > operand
    if op == JGE:
        return a >= operand
    return bool(a & operand)  # JSET


_C_ALU = {ADD: "+", SUB: "-", MUL: "*", OR: "|", AND: "&", XOR: "^"}
_C_TEST = {JEQ: "==", JGT: ">", JGE: ">="}


def _c_load(size: int) -> str:
    """Big-endian bytes at pkt[at], as libpcap's EXTRACT macros read them."""
    parts = [f"(u32)pkt[at + {i}] << {8 * (size - 1 - i)}" for i in range(size)]
    return " | ".join(parts).replace(" << 0", "").replace("pkt[at + 0]", "pkt[at]")


# to_c()'s programs check each load with this; emit it once before them. The test against
# len is libpcap's; the one against SNAPLEN, on a copy the compiler cannot see through, is
# for the verifier (len is never above SNAPLEN, so it changes nothing).
C_PRELUDE = """\
#define PCAP_LOAD_CHECK(size) do { if (at + (size) > len) return 0; \\
    asm volatile("" : "+r"(at)); \\
    if (SNAPLEN < (size) || at > SNAPLEN - (size)) return 0; } while (0)
"""


def _c_bounded(offset: str, size: int) -> str:
    return f"at = {offset}; PCAP_LOAD_CHECK({size});"


def _c_statement(pc: int, insn: Insn) -> str:
    code, k = insn.code, insn.k
    cls = code & 7
    if cls == RET:
        return "return A;" if code & RET_A else f"return {k:#x};"
    if cls in (LD, LDX):
        register = "A" if cls == LD else "X"
        mode = code & 0xE0
        if mode == IMM:
            return f"{register} = {k:#x};"
        if mode == MEM:
            return f"{register} = M{k};"
        if mode == LEN:
            return f"{register} = wirelen;"
        if mode == MSH:
            return f"{_c_bounded(f'{k:#x}', 1)} X = (pkt[at] & 0xf) << 2;"
        size = SIZES[code & 0x18]
        offset = f"{k:#x}" if mode == ABS else f"(u64)X + {k:#x}"
        return f"{_c_bounded(offset, size)} A = {_c_load(size)};"
    if cls == ST:
        return f"M{k} = A;"
    if cls == STX:
        return f"M{k} = X;"
    if cls == ALU:
        op = code & 0xF0
        operand = "X" if code & SRC_X else f"{k:#x}"
        if op in _C_ALU:
            return f"A = A {_C_ALU[op]} {operand};"
        if op in (DIV, MOD):
            sign = "/" if op == DIV else "%"
            guard = "if (X == 0) return 0; " if code & SRC_X else ""
            return f"{guard}A = A {sign} {operand};"
        if op in (LSH, RSH):
            sign = "<<" if op == LSH else ">>"
            if code & SRC_X:
                return f"A = X < 32 ? A {sign} X : 0;"
            return f"A = A {sign} {operand};"  # libpcap refuses constant shifts above 31
        return "A = 0 - A;"  # NEG
    if cls == JMP:
        op = code & 0xF0
        if op == JA:
            return f"goto L{pc + 1 + signed32(k)};"
        operand = "X" if code & SRC_X else f"{k:#x}"
        test = f"(A & {operand})" if op == JSET else f"A {_C_TEST[op]} {operand}"
        taken, not_taken = pc + 1 + insn.jt, pc + 1 + insn.jf
        if taken == not_taken:
            return f"goto L{taken};"
        return f"if ({test})\n        goto L{taken};\n    goto L{not_taken};"
    return "X = A;" if code & 0xF8 == TAX else "A = X;"
