"""The http family's user-space half without BPF: uprobe sites in libssl, /proc maps, decoding."""

import os
import struct

import numpy as np
import pytest

from stallscope.tracer import uprobe_sites
from stallscope.tracer.families import http
from stallscope.wire.schema import DEFINES, ENUMS, RECORD_DTYPE, T_HTTP

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.mark.parametrize("code,kind,length", [
    (b"\x55", "push", 1), (b"\x41\x57", "push", 2), (b"\x53", "push", 1),
    (b"\xf3\x0f\x1e\xfa", "endbr64", 4), (b"\x48\x83\xec\x08", "other", 4),
    (b"\xe8\x10\x00\x00\x00", "call", 5), (b"\xe9\xf0\xff\xff\xff", "jmp", 5), (b"\x90", "nop", 1),
    (b"\x64\x48\x8b\x04\x25\x28\x00\x00\x00", "other", 9), (b"\x0f\x1f\x44\x00\x00", "nop", 5),
])
def test_decode_first_instruction(code, kind, length):
    k, n, _d = uprobe_sites.decode_one(code + b"\xcc" * 8)
    assert (k, n) == (kind, length)


def _tiny_elf(path, text: bytes, syms: dict):
    """An ELF64 x86-64 shared object: one PT_LOAD at vaddr 0x1000 (file offset 0x1000) holding
    ``text``, and a .dynsym/.dynstr with ``syms`` {name: vaddr}."""
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in syms)
    symtab = b"\0" * 24
    off = 1
    for name, va in syms.items():
        symtab += struct.pack("<IBBHQQ", off, 0x12, 0, 1, va, 16)
        off += len(name) + 1
    text_off, dynsym_off = 0x1000, 0x1000 + len(text)
    dynstr_off = dynsym_off + len(symtab)
    sh_off = dynstr_off + len(strtab)
    eh = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, 3, 62, 1, 0,
                     64, sh_off, 0, 64, 56, 1, 64, 4, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, text_off, 0x1000, 0x1000, len(text), len(text), 0x1000)
    sh = b"\0" * 64
    sh += struct.pack("<IIQQQQIIQQ", 0, 1, 6, 0x1000, text_off, len(text), 0, 0, 16, 0)
    sh += struct.pack("<IIQQQQIIQQ", 0, 11, 2, 0, dynsym_off, len(symtab), 3, 1, 8, 24)
    sh += struct.pack("<IIQQQQIIQQ", 0, 3, 2, 0, dynstr_off, len(strtab), 0, 0, 1, 0)
    data = eh + ph
    data += b"\0" * (text_off - len(data)) + text + symtab + strtab + sh
    with open(path, "wb") as f:
        f.write(data)


def test_wrapper_starting_with_sub_is_followed_to_its_pushing_callee(tmp_path):
    # 0x1000 SSL_write_ex: sub $8,%rsp; call 0x1020        0x1020 internal: push %r14
    text = bytearray(b"\xcc" * 0x40)
    text[0:4] = b"\x48\x83\xec\x08"
    text[4:9] = b"\xe8" + struct.pack("<i", 0x1020 - 0x1009)
    text[0x20:0x22] = b"\x41\x56"
    text[0x30:0x34] = b"\xf3\x0f\x1e\xfa"       # SSL_other: endbr64, then nothing it calls
    p = str(tmp_path / "libssl.so.3")
    _tiny_elf(p, bytes(text), {"SSL_write_ex": 0x1000, "SSL_push": 0x1020, "SSL_other": 0x1030})
    elf = uprobe_sites.Elf(p)
    site = uprobe_sites.emulated_site(elf, "SSL_write_ex")
    assert (site.vaddr, site.insn, site.how) == (0x1020, "push", "callee of SSL_write_ex")
    assert uprobe_sites.emulated_site(elf, "SSL_push").how == "symbol"
    with pytest.raises(uprobe_sites.SiteError, match="endbr64"):
        uprobe_sites.emulated_site(elf, "SSL_other")
    with pytest.raises(uprobe_sites.SiteError, match="no symbol"):
        uprobe_sites.emulated_site(elf, "SSL_read_ex")


@pytest.mark.skipif(not os.path.exists(LIBSSL), reason="no system libssl.so.3")
def test_system_libssl_sites_are_emulated():
    elf = uprobe_sites.Elf(LIBSSL)
    syms = elf.symbols()
    for name in ("SSL_read_ex", "SSL_write_ex"):
        assert uprobe_sites.emulated_site(elf, name, syms).emulated


def test_mapped_libs_reads_a_fixture_proc(tmp_path):
    d = tmp_path / "42"
    d.mkdir()
    (d / "maps").write_text(
        "7f00-7f10 r--p 00000000 fe:00 339900 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
        "7f10-7f20 r-xp 0001f000 fe:00 339900 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
        "7f30-7f40 r-xp 0001f000 fe:00 111 /opt/conda/lib/libssl.so.3\n"
        "7f50-7f60 r-xp 0001f000 fe:00 222 /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n"
        "7f70-7f80 r-xp 00000000 00:00 0 [vdso]\n")
    got = uprobe_sites.mapped_libs(42, http.LIBSSL, str(tmp_path))
    assert [(m.path, m.inode) for m in got] == [("/usr/lib/x86_64-linux-gnu/libssl.so.3", 339900),
                                                ("/opt/conda/lib/libssl.so.3", 111)]
    assert uprobe_sites.mapped_libs(43, http.LIBSSL, str(tmp_path)) == []
    assert uprobe_sites.host_path(42, "/opt/x.so", "/proc") == "/proc/42/root/opt/x.so"


def test_decode_records():
    r = np.zeros(2, dtype=RECORD_DTYPE)
    r["type"] = T_HTTP
    r["op"] = [ENUMS["SS_OP_HTTP_PUT"], ENUMS["SS_OP_HTTP_POST"]]
    r["ret"] = [503, 0]
    r["flags"] = [DEFINES["SS_F_HTTP_TLS"], DEFINES["SS_F_HTTP_NOANSWER"]]
    r["key"] = [0x7f00, 5]
    for i, (host, path, reason) in enumerate([(b"s3.local:9000", b"/ckpt/step-900", b"Slow Down"),
                                              (b"api.local", b"/v1/chat/completions", b"")]):
        raw = bytearray(128)
        raw[0:len(host)] = host
        raw[48:48 + len(path)] = path
        raw[112:112 + len(reason)] = reason
        r["path"][i] = bytes(raw)
    base = {"ts_ns": np.array([1, 2], dtype=np.uint64), "dur_ns": np.array([5, 6], dtype=np.uint64),
            "pid": np.array([7, 8], dtype=np.uint64), "tid": np.array([7, 8], dtype=np.uint64),
            "comm": np.array(["a", "b"], dtype=object)}
    t = http.decode(T_HTTP, r, base, "tracepoint")["http"]
    assert list(t["op"]) == ["PUT", "POST"]
    assert list(t["host"]) == ["s3.local:9000", "api.local"]
    assert list(t["path"]) == ["/ckpt/step-900", "/v1/chat/completions"]
    assert list(t["reason"]) == ["Slow Down", ""]
    assert list(t["status"]) == [503, 0] and list(t["statuses"]) == ["503", "0"]
    assert list(t["tls"]) == [1, 0] and list(t["count"]) == [1, 1]


def test_http_family_is_opt_in():
    """Its plaintext path hooks every read/write of every process: not loaded by default
    until its cost is shown within the goal (README, "API calls")."""
    from stallscope.options import TraceOptions
    from stallscope.tracer.families import ALL_FAMILIES, DEFAULT_FAMILIES

    assert "http" in ALL_FAMILIES and "http" not in DEFAULT_FAMILIES
    assert "http" not in TraceOptions().families.split(",")
