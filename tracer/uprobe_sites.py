"""Where to put a uprobe so that it is cheap: the libraries a process maps, their symbols, and
an attach address whose first instruction the kernel emulates.

A uprobe replaces the first byte of an instruction with int3. On a hit the kernel either
emulates the original instruction (x86-64: ``push``, ``call``, ``jmp``, ``nop``; ~0.4 us a
hit) or single-steps a copy of it out of line (``sub``, ``mov``, ``endbr64``: ~14 us a hit on
a VM). Debian's ``SSL_read_ex``/``SSL_write_ex`` start with ``sub $8,%rsp`` and call the
internal ``ssl_read_internal``/``ssl_write_internal``, which start with ``push``: so
:func:`emulated_site` follows a wrapper's first ``call``/``jmp`` to its callee when the
wrapper itself does not start with an emulated instruction.

Only what is needed is decoded here: ELF64 little-endian program headers and symbol tables
(``.dynsym`` and, where not stripped, ``.symtab``), and the x86-64 instructions that open a
compiled function (push, endbr64, sub/mov/lea/xor with a ModRM byte, call/jmp rel32).
Functions take a ``proc`` root so tests can point them at a fixture tree.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import struct

#: the first-instruction kinds the x86-64 kernel emulates for uprobes (arch/x86/kernel/uprobes.c
#: branch_setup_xol_ops / push_setup_xol_ops): no single-step, no trap back
EMULATED = ("push", "call", "jmp", "nop")


class SiteError(RuntimeError):
    """No usable attach address; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One file a process maps executable: its path (as the process sees it) and identity."""

    path: str
    dev: str
    inode: int


@dataclasses.dataclass(frozen=True)
class Site:
    """An attach address: ``vaddr`` in ``path`` (ELF virtual address, what BCC takes), the
    instruction found there, and how it was found (``symbol`` or ``callee of symbol``)."""

    path: str
    symbol: str
    vaddr: int
    insn: str
    how: str

    @property
    def emulated(self) -> bool:
        return self.insn in EMULATED


# ------------------------------------------------------------------ /proc/PID/maps

_MAPS_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) [0-9a-f]+ (\S+) (\d+)\s+(.*)$")


def mapped_libs(pid: int, pattern: str, proc: str = "/proc") -> list:
    """Executable file mappings of ``pid`` whose base name matches ``pattern`` (a regex, e.g.
    ``r"libssl\\.so"``), one per file, in map order. [] when the process is gone."""
    rx = re.compile(pattern)
    out, seen = [], set()
    try:
        with open(os.path.join(proc, str(pid), "maps")) as f:
            for line in f:
                m = _MAPS_RE.match(line.rstrip("\n"))
                if not m or "x" not in m.group(1):
                    continue
                path = m.group(4).strip()
                if not path.startswith("/") or path.endswith(" (deleted)"):
                    continue
                if not rx.search(os.path.basename(path)):
                    continue
                key = (m.group(2), int(m.group(3)))
                if key not in seen:
                    seen.add(key)
                    out.append(Mapping(path, m.group(2), int(m.group(3))))
    except OSError:
        return []
    return out


def host_path(pid: int, path: str, proc: str = "/proc") -> str:
    """The file a process maps as ``path``, reachable from here (a container's root too)."""
    return os.path.join(proc, str(pid), "root") + path


# ------------------------------------------------------------------ ELF


class Elf:
    """The parts of an ELF64 little-endian file needed to place a uprobe."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
            raise SiteError(f"{path}: not an ELF64 little-endian file")
        (self.e_type, self.e_machine, _v, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
         shentsize, shnum, _shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", d, 16)
        self.loads = []      # (vaddr, offset, filesz)
        for i in range(phnum):
            p_type, _pf, off, vaddr, _pa, filesz, _memsz, _al = struct.unpack_from(
                "<IIQQQQQQ", d, phoff + i * phentsize)
            if p_type == 1:
                self.loads.append((vaddr, off, filesz))
        self.sections = []   # (type, offset, size, link, entsize)
        for i in range(shnum):
            (_name, sh_type, _fl, _addr, off, size, link, _info, _al, entsize) = struct.unpack_from(
                "<IIQQQQIIQQ", d, shoff + i * shentsize)
            self.sections.append((sh_type, off, size, link, entsize))

    def symbols(self) -> dict:
        """name -> (vaddr, size) of every defined function in .symtab and .dynsym."""
        out = {}
        for sh_type, off, size, link, entsize in self.sections:
            if sh_type not in (2, 11) or not entsize:        # SHT_SYMTAB, SHT_DYNSYM
                continue
            str_off = self.sections[link][1]
            for j in range(size // entsize):
                name, info, _other, shndx, value, sz = struct.unpack_from("<IBBHQQ", self.data, off + j * entsize)
                if (info & 0xF) != 2 or not shndx or not value:  # STT_FUNC, defined
                    continue
                end = self.data.index(b"\0", str_off + name)
                out.setdefault(self.data[str_off + name:end].decode(errors="replace"), (value, sz))
        return out

    def read(self, vaddr: int, n: int) -> bytes:
        """``n`` bytes at a virtual address (from the PT_LOAD segment holding it)."""
        for va, off, filesz in self.loads:
            if va <= vaddr < va + filesz:
                start = off + (vaddr - va)
                return self.data[start:start + min(n, va + filesz - vaddr)]
        raise SiteError(f"{self.path}: address {vaddr:#x} is in no loaded segment")


# ------------------------------------------------------------------ x86-64 prologues


def _modrm_len(code: bytes, i: int) -> int:
    """Bytes of a ModRM operand (ModRM, SIB, displacement) starting at code[i]."""
    modrm = code[i]
    mod, rm = modrm >> 6, modrm & 7
    n = 1
    if mod != 3 and rm == 4:
        n += 1                                   # SIB
        if mod == 0 and (code[i + 1] & 7) == 5:
            n += 4
    if mod == 1:
        n += 1
    elif mod == 2 or (mod == 0 and rm == 5):
        n += 4
    return n


def decode_one(code: bytes) -> tuple:
    """(kind, length, branch displacement or None) of the instruction at code[0]. Kinds:
    push, call, jmp, nop, endbr64, other (a known non-emulated opcode), unknown."""
    if len(code) >= 4 and code[:4] == b"\xf3\x0f\x1e\xfa":
        return "endbr64", 4, None
    i = 0
    while i < len(code) and code[i] in (0x66, 0x2E, 0x3E, 0x64, 0x65):   # prefixes (nopw, %fs:)
        i += 1
    rex = 0
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    if i >= len(code):
        return "unknown", 1, None
    op = code[i]
    if 0x50 <= op <= 0x57:
        return "push", i + 1, None
    if op == 0x90 and not rex:
        return "nop", i + 1, None
    if op == 0xE8 and i + 5 <= len(code):
        return "call", i + 5, struct.unpack_from("<i", code, i + 1)[0]
    if op == 0xE9 and i + 5 <= len(code):
        return "jmp", i + 5, struct.unpack_from("<i", code, i + 1)[0]
    if op == 0xEB and i + 2 <= len(code):
        return "jmp", i + 2, struct.unpack_from("<b", code, i + 1)[0]
    if op == 0x0F and i + 2 < len(code) and code[i + 1] == 0x1F:           # multi-byte nop
        return "nop", i + 2 + _modrm_len(code, i + 2), None
    if 0x70 <= op <= 0x7F and i + 2 <= len(code):                          # jcc short
        return "other", i + 2, None
    if op in (0x01, 0x03, 0x29, 0x2B, 0x31, 0x33, 0x39, 0x3B, 0x63, 0x85, 0x89, 0x8B, 0x8D) and i + 1 < len(code):
        return "other", i + 1 + _modrm_len(code, i + 1), None
    if op == 0x83 and i + 1 < len(code):                                   # sub/add imm8
        return "other", i + 2 + _modrm_len(code, i + 1), None
    if op == 0x81 and i + 1 < len(code):                                   # sub/add imm32
        return "other", i + 5 + _modrm_len(code, i + 1), None
    if 0xB8 <= op <= 0xBF:                                                  # mov imm32/64
        return "other", i + 1 + (8 if rex & 8 else 4), None
    return "unknown", i + 1, None


def emulated_site(elf: Elf, symbol: str, syms: dict | None = None, scan: int = 48) -> Site:
    """An attach address for ``symbol`` whose first instruction is emulated: the symbol
    itself, or else the target of its first ``call``/``jmp`` within ``scan`` bytes (the
    internal function an exported wrapper calls; it takes the same first arguments).
    Raises SiteError when neither qualifies (the caller warns and may attach anyway)."""
    if elf.e_machine != 62:
        raise SiteError(f"{elf.path}: not x86-64 (emulation check is x86-64 only)")
    syms = elf.symbols() if syms is None else syms
    if symbol not in syms:
        raise SiteError(f"{elf.path}: no symbol {symbol}")
    start, _size = syms[symbol]
    code = elf.read(start, scan)
    kind, _n, _d = decode_one(code)
    if kind in EMULATED:
        return Site(elf.path, symbol, start, kind, "symbol")
    first = kind
    i = 0
    while i < len(code):
        kind, n, disp = decode_one(code[i:])
        if kind == "unknown":
            break
        if kind in ("call", "jmp") and disp is not None:
            target = start + i + n + disp
            tkind, _tn, _td = decode_one(elf.read(target, 16))
            if tkind in EMULATED:
                return Site(elf.path, symbol, target, tkind, f"callee of {symbol}")
            raise SiteError(f"{elf.path}: {symbol} starts with {first} and its callee at "
                            f"{target:#x} with {tkind}")
        i += n
    raise SiteError(f"{elf.path}: {symbol} starts with {first} (single-stepped) and calls nothing "
                    f"in its first {scan} bytes")


def is_x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")
