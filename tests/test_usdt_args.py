"""usdt_args: the C that reads recv_upcall's arguments from a probe site's spec.

The generated reader is compiled with gcc against a plain pt_regs and a
bpf_probe_read_user() that copies (and counts its calls), then run on known registers and
memory: each argument must come out with its size and sign, and operands close together
on one base register must take one read. The capture tests run it in real BPF.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import build_c

from upcall_capture.probe import usdt_args
from upcall_capture.probe.usdt_args import args_reader, direct_reader, parse_spec

OVS_SPEC = "8@%rdx 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)"
REPLAY_SPEC = "8@(%rdi) 4@8(%rdi) 8@16(%rdi) 4@24(%rdi) 8@32(%rdi) 8@40(%rdi)"

HARNESS = r"""
#include <stdio.h>
#include <string.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
#ifndef __always_inline
#define __always_inline inline
#endif
struct pt_regs { u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, ip, sp; };
static int reads;
static int bpf_probe_read_user(void *dst, u32 size, const void *src)
{ reads++; memcpy(dst, src, size); return 0; }
READER
int main(void)
{
    static u8 memory[2048];
    for (int i = 0; i < 2048; i++)
        memory[i] = (u8)(i * 7 + 1);
    struct pt_regs regs = {
        .ax = 0x1111222233334444ULL, .bx = (u64)memory, .cx = 0xaaaabbbbfffffffeULL,
        .dx = 0x5555666677778888ULL, .di = (u64)(memory + 64), .r9 = 0x0102030405060708ULL,
    };
    u64 arg[6];
    static u8 scratch[ARG_SPAN_MAX];
    int failed = read_upcall_args(&regs, arg, scratch);
    printf("%d %d", failed, reads);
    for (int i = 0; i < 6; i++)
        printf(" %llx", arg[i]);
    printf("\n");
    return 0;
}
"""


def run_reader(tmp_path, reader: str) -> tuple[int, int, list[int]]:
    binary = build_c(tmp_path, "reader", HARNESS.replace("READER", reader),
                     ("-O1", "-Wall", "-Werror", f"-DARG_SPAN_MAX={usdt_args.MAX_SPAN}"))
    failed, reads, *values = subprocess.run([str(binary)], check=True, capture_output=True,
                                            text=True).stdout.split()
    return int(failed), int(reads), [int(v, 16) for v in values]


def memory_value(offset: int, size: int, signed: bool = False) -> int:
    raw = bytes((i * 7 + 1) & 0xFF for i in range(offset, offset + size))
    return int.from_bytes(raw, "little", signed=signed) & (2**64 - 1)


def test_ovs_spec_registers_cut_to_size_and_its_memory_in_one_read(tmp_path):
    failed, reads, values = run_reader(tmp_path, direct_reader(OVS_SPEC))
    assert failed == 0
    assert reads == 1  # 12(%rbx) to 592(%rbx)
    assert values == [0x5555666677778888, 0xFFFFFFFE, 0x1111222233334444,
                      memory_value(12, 4), memory_value(576, 8), memory_value(584, 8)]


def test_replay_spec_is_one_read(tmp_path):
    failed, reads, values = run_reader(tmp_path, direct_reader(REPLAY_SPEC))
    assert (failed, reads) == (0, 1)
    assert values == [memory_value(64, 8), memory_value(72, 4), memory_value(80, 8),
                      memory_value(88, 4), memory_value(96, 8), memory_value(104, 8)]


def test_signed_operands_and_constants_are_sign_extended(tmp_path):
    spec = "-4@%ecx -1@5(%rbx) 8@$-3 -2@%r9w 4@$7 8@%rdx"
    failed, reads, values = run_reader(tmp_path, direct_reader(spec))
    assert (failed, reads) == (0, 1)
    assert values == [2**64 - 2, memory_value(5, 1, signed=True), 2**64 - 3, 0x0708, 7,
                      0x5555666677778888]


def test_far_apart_operands_are_read_apart_each_into_the_scratch_memory(tmp_path):
    # Memory on one base further apart than MAX_SPAN, and on another base: three reads,
    # each taken out of the scratch memory before the next overwrites it.
    far = usdt_args.MAX_SPAN + 100
    spec = f"8@0(%rbx) 4@8(%rbx) 8@{far}(%rbx) 4@%ecx 8@%rax 8@-8(%rdi)"
    failed, reads, values = run_reader(tmp_path, direct_reader(spec))
    assert (failed, reads) == (0, 3)
    assert values == [memory_value(0, 8), memory_value(8, 4), memory_value(far, 8),
                      0xFFFFFFFE, 0x1111222233334444, memory_value(56, 8)]


def test_one_read_never_spans_more_than_a_page():
    # Each page a read touches then holds an operand: it reads no memory that reads apart
    # would not have.
    assert usdt_args.MAX_SPAN <= 4096
    spec = f"8@0(%rbx) 8@{usdt_args.MAX_SPAN - 8}(%rbx) 8@{usdt_args.MAX_SPAN - 7}(%rbx) " \
        "4@%ecx 8@%rax 8@%rdx"
    assert direct_reader(spec).count("bpf_probe_read_user(") == 2


@pytest.mark.parametrize("spec", [
    "8@(%rax,%rbx,8) 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)",  # index register
    "8@foo(%rip) 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)",  # %rip-relative
    "8@%rdx 1@%ah 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)",  # high-byte register
    "8@%rdx 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx)",  # five arguments
    "8@%rdx 3@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)",  # no such size
])
def test_forms_we_do_not_read_are_left_to_bcc(spec):
    assert parse_spec(spec) is None or direct_reader(spec) is None
    assert args_reader([spec], "x86_64") is None


def test_bcc_reads_several_sites_and_other_machines():
    assert args_reader([OVS_SPEC, REPLAY_SPEC], "x86_64") is None
    assert args_reader([OVS_SPEC], "aarch64") is None
    assert args_reader([OVS_SPEC], "x86_64") == direct_reader(OVS_SPEC)
    assert usdt_args.ARG_COUNT == 6
