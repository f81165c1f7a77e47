"""tnl_push(...): struct ovs_action_push_tnl and the tunnel header it carries
(format_odp_tnl_push_action). OVS reads the header's fixed parts whatever the
action's length."""

from __future__ import annotations

import socket
import struct

from upcall_capture.actions.masked import geneve_opts_text
from upcall_capture.actions.netlink import Attr, read
from upcall_capture.flowkey.layouts import hex_int

_GRE, _VXLAN, _GENEVE, _ERSPAN, _IP6ERSPAN, _IP6GRE, _GTPU = 3, 4, 5, 107, 108, 109, 110
_GRE_FLAG_FIELDS = ((0x8000, "csum", ">H"), (0x2000, "key", ">I"), (0x1000, "seq", ">I"))


def _udp(h: bytes, at: int) -> str:
    src, dst, _, csum = struct.unpack_from(">HHHH", h, at)
    return f"udp(src={src},dst={dst},csum=0x{csum:x}),"


def _gre(h: bytes, at: int) -> str:
    flags, proto = struct.unpack_from(">HH", h, at)
    text = f"gre((flags=0x{flags:x},proto=0x{proto:x})"
    option = at + 4
    for bit, name, code in _GRE_FLAG_FIELDS:
        if flags & bit:
            text += f",{name}=0x{struct.unpack_from(code, h, option)[0]:x}"
            option += 4
    return text + ")"


def _erspan(h: bytes, at: int) -> str:
    ersh = at + 8  # after ERSPAN's fixed 8-byte GRE header
    version, sid = h[ersh] >> 4, (h[ersh + 2] & 3) << 8 | h[ersh + 3]
    if version == 1:
        (index,) = struct.unpack_from(">I", h, ersh + 4)
        return f"erspan(ver=1,sid=0x{sid:x},idx=0x{index:x})"
    if version == 2:
        bits, low = h[ersh + 10], h[ersh + 11]
        hwid = (bits & 3) << 4 | low >> 4
        return f"erspan(ver=2,sid=0x{sid:x},dir={low >> 3 & 1},hwid=0x{hwid:x})"
    return ""  # OVS only logs a warning


def _vxlan(h: bytes, at: int) -> str:
    flags, vni = struct.unpack_from(">II", h, at + 8)
    return _udp(h, at) + f"vxlan(flags=0x{flags:x},vni=0x{vni >> 8:x})"


def _geneve(h: bytes, at: int) -> str:
    gnh = at + 8
    opt_len, bits = h[gnh] & 0x3F, h[gnh + 1]
    (vni,) = struct.unpack_from(">I", h, gnh + 4)
    text = (_udp(h, at) + "geneve(" + ("oam," if bits & 0x80 else "")
            + ("crit," if bits & 0x40 else "") + f"vni=0x{vni >> 8:x}")
    if opt_len:
        text += f",options({geneve_opts_text(h[gnh + 8 : gnh + 8 + opt_len * 4], None)})"
    return text + ")"


def _gtpu(h: bytes, at: int) -> str:
    flags, msgtype, _, teid = struct.unpack_from(">BBHI", h, at + 8)
    return _udp(h, at) + f"gtpu(flags=0x{flags:x},msgtype={msgtype},teid=0x{teid:x})"


_TUNNELS = {_VXLAN: _vxlan, _GENEVE: _geneve, _GRE: _gre, _IP6GRE: _gre, _ERSPAN: _erspan,
            _IP6ERSPAN: _erspan, _GTPU: _gtpu}


def _mac(b: bytes) -> str:
    return b.hex(":")


def tnl_push_text(data: bytes, attr: Attr) -> str:
    # 16 bytes of ports, length and type, then room for a 512-byte header.
    body = read(data, attr.offset, 16 + 512 + 64)
    tnl_port, out_port, header_len, tnl_type = struct.unpack_from("<IIII", body)
    h = body[16:]
    (eth_type,) = struct.unpack_from(">H", h, 12)
    text = (f"tnl_push(tnl_port({tnl_port}),header(size={header_len},type={tnl_type},"
            f"eth(dst={_mac(h[:6])},src={_mac(h[6:12])},dl_type=0x{eth_type:04x}),")
    if eth_type == 0x0800:
        tos, frag, ttl, proto = h[15], struct.unpack_from(">H", h, 20)[0], h[22], h[23]
        text += (f"ipv4(src={socket.inet_ntoa(h[26:30])},dst={socket.inet_ntoa(h[30:34])},"
                 f"proto={proto},tos={hex_int(tos)},ttl={ttl},frag=0x{frag:x}),")
        l4 = 34
    else:
        (flow,) = struct.unpack_from(">I", h, 14)
        src = socket.inet_ntop(socket.AF_INET6, h[22:38])
        dst = socket.inet_ntop(socket.AF_INET6, h[38:54])
        text += (f"ipv6(src={src},dst={dst},label={flow & 0xFFFFF},proto={h[20]},"
                 f"tclass=0x{flow >> 20 & 0xFF:x},hlimit={h[21]}),")
        l4 = 54
    tunnel = _TUNNELS.get(tnl_type)
    if tunnel is not None:
        text += tunnel(h, l4)
    return text + f"),out_port({out_port}))"
