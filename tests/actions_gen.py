"""Seeded random netlink action lists for the conformance test against OVS's formatter.

Mostly well-formed actions of every kind, some malformed ones (bad lengths, unknown
types, broken nesting). Cases where OVS itself reads past its buffers in ways that
depend on memory (a set() key claiming more bytes than there are, a failed push_nsh
parse with MD type 2) are not generated.
"""

from __future__ import annotations

import random
import struct


def nla(attr_type: int, payload: bytes = b"") -> bytes:
    item = struct.pack("<HH", 4 + len(payload), attr_type) + payload
    return item + bytes(-len(item) % 4)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


class ActionGen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    # -- helpers ------------------------------------------------------------------------

    def bytes_(self, n: int) -> bytes:
        r = self.r
        style = r.random()
        if style < 0.2:
            return bytes(n)
        if style < 0.35:
            return b"\xff" * n
        return bytes(r.choice((0, 0xFF, r.randrange(256))) for _ in range(n))

    def small(self) -> int:
        return self.r.choice((0, 1, 2, 7, 255, 65535, 0xFFFFFFFF, self.r.randrange(1 << 32)))

    def bad(self, payload: bytes) -> bytes:
        """Sometimes the payload with a byte more or less."""
        r = self.r.random()
        if r < 0.04:
            return payload + b"\x01"
        if r < 0.08 and payload:
            return payload[:-1]
        return payload

    # -- flow key attributes ------------------------------------------------------------

    KEY_SIZES = {2: 4, 3: 4, 4: 12, 5: 2, 6: 2, 7: 12, 8: 40, 9: 4, 10: 4, 11: 2, 12: 2,
                 13: 24, 14: 28, 15: 4, 17: 4, 18: 2, 19: 4, 20: 4, 22: 4, 23: 2, 24: 4,
                 25: 16, 26: 16, 27: 40, 29: 4, 30: 8}

    def tunnel(self, depth: int = 0) -> bytes:
        r = self.r
        parts = []
        for t in r.sample(range(17), r.randrange(1, 8)):
            size = {0: 8, 1: 4, 2: 4, 3: 1, 4: 1, 9: 2, 10: 2, 12: 16, 13: 16}.get(t, 0)
            if t == 8:
                opts = b""
                for _ in range(r.randrange(0, 3)):
                    n = r.randrange(0, 3)
                    opts += struct.pack(">HBB", r.randrange(65536), r.randrange(256),
                                        n | r.choice((0, 0xE0))) + self.bytes_(4 * n)
                payload = opts
            elif t == 11:
                payload = nla(1, u32(self.small())) if r.random() < 0.8 else nla(8)
            elif t == 15:
                payload = u32(r.choice((1, 2, 3))) + self.bytes_(8)
            elif t == 16:
                payload = self.bytes_(2)
            else:
                payload = self.bytes_(size)
            parts.append(nla(t, self.bad(payload) if t not in (8, 11, 15) else payload))
        if r.random() < 0.05:
            parts.append(nla(r.randrange(17, 40), self.bytes_(r.randrange(0, 6))))
        return b"".join(parts)

    def nsh_key(self, masked: bool) -> bytes:
        r = self.r
        mult = 2 if masked else 1
        parts = [nla(1, self.bytes_(8 * mult))]
        if r.random() < 0.7:
            parts.append(nla(2, self.bytes_(16 * mult)))
        if not masked and r.random() < 0.1:
            parts.append(nla(3, self.bytes_(8)))
        r.shuffle(parts)
        return b"".join(parts)

    def key_attr(self, depth: int = 0) -> tuple[int, bytes]:
        """(type, payload) of one flow key attribute, for set()."""
        r = self.r
        t = r.choice(list(self.KEY_SIZES) + [16, 16, 21, 28, 1, 0, 31, 40])
        if t == 16:
            return t, self.tunnel()
        if t == 21:
            return t, self.bytes_(4 * r.randrange(1, 4)) if r.random() < 0.9 else b"\x01"
        if t == 28:
            return t, self.nsh_key(False)
        if t == 1:
            if depth > 1:
                return 5, self.bytes_(2)
            inner = b"".join(nla(*self.key_attr(depth + 1)) for _ in range(r.randrange(0, 3)))
            return t, inner
        if t in (0, 31):
            return t, b"" if r.random() < 0.8 else b"\x01"
        if t == 40:
            return t, self.bytes_(r.randrange(0, 6))
        payload = self.bytes_(self.KEY_SIZES[t])
        if t in (7, 8):  # frag values OVS knows, mostly
            payload = payload[:-1] + bytes([r.choice((0, 1, 2, payload[-1]))])
        return t, self.bad(payload)

    def masked_attr(self) -> tuple[int, bytes]:
        """(type, value+mask) for set_masked()."""
        r = self.r
        choice = r.random()
        if choice < 0.08:
            return 28, self.nsh_key(True)
        if choice < 0.12:
            key = self.tunnel()
            return 16, key + self.mask_like(key)
        if choice < 0.16:
            t, key = self.key_attr()
            if t == 1:
                return t, key + self.mask_like(key, nested=True)
        t = r.choice(list(self.KEY_SIZES) + [21, 21, 0, 40])
        size = self.KEY_SIZES.get(t, 4 * r.randrange(1, 4) if t == 21 else r.randrange(0, 5))
        value = self.bytes_(size)
        if t in (7, 8):
            value = value[:-1] + bytes([r.choice((0, 1, 2, value[-1]))])
        mask = self.bytes_(size)
        if t in (7, 8):
            mask = mask[:-1] + bytes([r.choice((0, 0xFF, mask[-1]))])
        if r.random() < 0.05:
            value, mask = value + b"\x00", mask + b"\x00"
        return t, value + mask

    def mask_like(self, key: bytes, nested: bool = False) -> bytes:
        """A mask list with the same attribute headers as `key`, random payloads."""
        out, pos = b"", 0
        while pos + 4 <= len(key):
            nla_len, t = struct.unpack_from("<HH", key, pos)
            if nla_len < 4:
                break
            payload = key[pos + 4 : pos + nla_len]
            if (nested and t in (1, 16)) or (not nested and t == 11):
                sub = self.mask_like(payload)
            else:
                sub = self.bytes_(len(payload))
            out += nla(t, sub)
            pos += (nla_len + 3) & ~3
        return out

    # -- actions ------------------------------------------------------------------------

    def cookie(self) -> bytes:
        r = self.r
        kind = r.choice((0, 1, 2, 3, 4, 5, 6))
        body = bytearray(self.bytes_(48))
        body[0:2] = u16(kind)
        if kind == 3:
            body[44:48] = u32(r.choice((0, 1, 2, 3)))
        return bytes(body)

    def userspace(self) -> bytes:
        r = self.r
        parts = [nla(1, u32(self.small()))] if r.random() < 0.95 else []
        if r.random() < 0.7:
            userdata = self.cookie() if r.random() < 0.7 else self.bytes_(r.randrange(0, 12))
            parts.append(nla(2, userdata))
        if r.random() < 0.3:
            parts.append(nla(3, self.bad(u32(self.small()))))
        if r.random() < 0.3:
            parts.append(nla(4))
        r.shuffle(parts)
        return nla(2, b"".join(parts))

    def string(self, longest: int) -> bytes:
        r = self.r
        n = r.randrange(0, longest + 2)
        text = bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz_-0123456789") for _ in range(n))
        if r.random() < 0.05:
            return text  # no NUL
        return text + b"\x00"

    def nat(self) -> bytes:
        r = self.r
        parts = []
        kind = r.random()
        if kind < 0.45:
            parts.append(nla(1))
        elif kind < 0.9:
            parts.append(nla(2))
        elif kind < 0.95:
            parts += [nla(1), nla(2)]
        size = r.choice((4, 4, 16, 16, 5))
        if r.random() < 0.7:
            lo = self.bytes_(size)
            parts.append(nla(3, lo))
            if r.random() < 0.5:
                hi = self.bytes_(size if r.random() < 0.9 else 4)
                parts.append(nla(4, max(lo, hi) if r.random() < 0.8 else hi))
        if r.random() < 0.5:
            lo = r.randrange(65536)
            parts.append(nla(5, u16(lo)))
            if r.random() < 0.5:
                parts.append(nla(6, u16(r.choice((lo, lo + 1 if lo < 65535 else lo,
                                                  r.randrange(65536))))))
        for t in (7, 8, 9):
            if r.random() < 0.25:
                parts.append(nla(t))
        if r.random() < 0.03:
            parts.append(nla(5, b"\x01"))
        return nla(6, b"".join(parts))

    def ct(self) -> bytes:
        r = self.r
        parts = []
        if r.random() < 0.5:
            parts.append(nla(1))
        if r.random() < 0.2:
            parts.append(nla(7))
        if r.random() < 0.5:
            parts.append(nla(2, self.bad(u16(r.choice((0, 1, r.randrange(65536)))))))
        if r.random() < 0.3:
            parts.append(nla(3, self.bytes_(r.choice((8, 8, 8, 7, 12)))))
        if r.random() < 0.3:
            parts.append(nla(4, self.bytes_(r.choice((32, 32, 32, 31)))))
        if r.random() < 0.2:
            parts.append(nla(5, self.string(16)))
        if r.random() < 0.2:
            parts.append(nla(9, self.string(32)))
        if r.random() < 0.1:
            parts.append(nla(8, u32(self.small())))
        if r.random() < 0.5:
            parts.append(self.nat())
        r.shuffle(parts)
        return nla(12, b"".join(parts))

    def push_nsh(self) -> bytes:
        r = self.r
        mdtype = r.choice((1, 2, 0, 3))
        base = bytes([r.randrange(256), r.randrange(256), mdtype, r.randrange(256)]) + \
            self.bytes_(4)
        parts = [nla(1, base)]
        ok = True
        if mdtype == 1:
            parts.append(nla(2, self.bytes_(16)))
        elif mdtype == 2:
            parts.append(nla(3, self.bytes_(r.randrange(0, 20))))
        if r.random() < 0.1 and mdtype != 2:
            parts.append(nla(r.choice((0, 4, 2)), self.bytes_(r.choice((0, 16, 3)))))
            ok = False
        if not ok and mdtype == 2:
            parts = parts[:2]
        return nla(17, nla(28, b"".join(parts)))

    def tnl_push(self) -> bytes:
        r = self.r
        tnl_type = r.choice((3, 4, 5, 107, 108, 109, 110, 1))
        ipv6 = r.random() < 0.4
        header = bytearray(self.bytes_(6 + 6)) + (b"\x86\xdd" if ipv6 else b"\x08\x00")
        header += self.bytes_(40 if ipv6 else 20)
        l4 = bytearray(self.bytes_(8 + 8 + 252))
        if tnl_type == 5:
            l4[8] = r.randrange(0, 4) | r.choice((0, 0x40))
            opts, n = b"", l4[8] & 0x3F
            while len(opts) < 4 * n:
                k = r.randrange(0, 2)
                opts += struct.pack(">HBB", r.randrange(65536), r.randrange(256), k)
                opts += self.bytes_(4 * k)
            l4[16 : 16 + len(opts)] = opts
        if tnl_type in (107, 108):
            l4[8] = r.choice((0x10, 0x20, 0x30)) | (l4[8] & 0xF)
        header += l4
        body = u32(self.small()) + u32(self.small()) + u32(len(header)) + u32(tnl_type)
        return nla(23, body + bytes(header))

    def actions(self, depth: int = 0, count: int | None = None) -> bytes:
        r = self.r
        n = r.choice((0, 1, 1, 2, 3, 4)) if count is None else count
        return b"".join(self.action(depth) for _ in range(n))

    def action(self, depth: int = 0) -> bytes:
        r = self.r
        kind = r.randrange(32)
        if depth > 2 and kind in (6, 20, 21):
            kind = 1
        if kind == 0 or kind >= 27:
            if r.random() < 0.5:
                return nla(r.choice((0, 27, 28, 50, 0x3FFF)), self.bytes_(r.randrange(0, 6)))
            kind = r.choice((1, 7, 19, 11, 3, 12))
        if kind == 1:
            return nla(1, self.bad(u32(self.small())))
        if kind == 2:
            return self.userspace()
        if kind == 3:
            t, payload = self.key_attr()
            return nla(3, nla(t, payload))
        if kind == 4:
            tpid = r.choice((0x8100, 0x88A8, r.randrange(65536)))
            return nla(4, self.bad(struct.pack(">HH", tpid, r.randrange(65536))))
        if kind in (5, 15, 16, 18):
            return nla(kind, b"" if r.random() < 0.9 else b"\x00")
        if kind == 6:
            parts = []
            if r.random() < 0.95:
                parts.append(nla(1, self.bad(u32(self.small()))))
            if r.random() < 0.95:
                parts.append(nla(2, self.actions(depth + 1)))
            r.shuffle(parts)
            return nla(6, b"".join(parts))
        if kind in (7, 13, 19, 24, 25, 26):
            return nla(kind, self.bad(u32(self.small())))
        if kind == 8:
            return nla(8, self.bad(u32(r.choice((0, 1, 2, 7))) + u32(self.small())))
        if kind in (9, 22):
            lse = self.small()
            eth = r.choice((0x8847, 0x8848, r.randrange(65536)))
            return nla(kind, self.bad(struct.pack(">IHH", lse, eth, r.randrange(65536))))
        if kind == 10:
            return nla(10, self.bad(struct.pack(">H", r.randrange(65536))))
        if kind == 11:
            t, payload = self.masked_attr()
            return nla(11, nla(t, payload))
        if kind == 12:
            return self.ct()
        if kind == 14:
            return nla(14, self.bad(self.bytes_(12)))
        if kind == 17:
            return self.push_nsh()
        if kind == 20:
            return nla(20, self.actions(depth + 1))
        if kind == 21:
            parts = []
            if r.random() < 0.95:
                parts.append(nla(1, self.bad(u16(r.randrange(65536)))))
            for t in (2, 3):
                if r.random() < 0.95:
                    parts.append(nla(t, self.actions(depth + 1)))
            r.shuffle(parts)
            return nla(21, b"".join(parts))
        if kind == 23:
            return self.tnl_push()
        return nla(1, u32(1))

    def case(self) -> bytes:
        data = self.actions(count=self.r.choice((0, 1, 1, 1, 2, 3, 5)))
        roll = self.r.random()
        if roll < 0.03 and data:
            data += b"\x01\x02"  # leftover bytes
        elif roll < 0.05:
            data = b"\x05\x00\x01\x00\x07\x00\x00\x00" + data  # an unaligned length
        elif roll < 0.07:
            data = nla(20, b"\x02\x00\x01\x00") + data  # a list of nothing but garbage
        return data


def generate(count: int, seed: int = 1) -> list[bytes]:
    gen = ActionGen(seed)
    return [gen.case() for _ in range(count)]
