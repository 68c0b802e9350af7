"""The RDMA probe family (bpf/rdma.bpf.c): attach methods and decoding.

``methods(cfg, tracefs)`` returns ``[(name, fn), ...]`` best
first; ``fn()`` returns ``(bpf_object, detail)``. Both methods time the same
thing, an event-driven verbs consumer waiting for completions
(``ibv_get_cq_event``), from two sides:

* ``kprobe``: kprobe/kretprobe on ``ib_uverbs_comp_event_read``, the kernel read
  behind it (any provider; needs the ib_uverbs module, i.e. RDMA devices in use).
* ``uprobe``: uprobe/uretprobe on libibverbs' ``ibv_get_cq_event`` (every symbol
  version the library exports), where kprobes are unavailable. Costlier per
  call (a uprobe pair traps twice into the kernel), harmless for blocking waits.

Port counters (retries, sequence errors, RNR, CNPs) are sampled by the agent
from sysfs with the rdma family (:mod:`stallscope.tracer.rdma_counters`), whichever method
loads. The Linux 6.1 RDMA tracepoints (``rdma_core:cq_*``, ``rdma_cma:*``,
``ib_mad:*``, ``rpcrdma:*``) describe kernel consumers (NFS/RDMA, iSER) and
connection management, not user-space verbs waits, so neither method uses them.
"""

from __future__ import annotations

import os

import numpy as np

from stallscope.tracer import btf, btf_modules, kernel
from stallscope.tracer.bpfload import ProbeError, base_cflags, kallsyms_present, load_bpf
from stallscope.tracer.decode import comm_str, ops, unique_map
from stallscope.wire.schema import T_RDMA

NAME = "rdma"
RECORD_TYPES = (T_RDMA,)

KPROBE_FN = "ib_uverbs_comp_event_read"
UPROBE_LIB = "ibverbs"
UPROBE_SYM = "ibv_get_cq_event"
KRETPROBE_MAXACTIVE = 256       # waits block; many threads may wait at once

RDMA_MODULES = ("ib_uverbs", "ib_core")
KPROBE_FIELDS = {
    "OFF_FILE_PRIVATE": ("file", "private_data", ()),
    "OFF_COMP_EV_FILE_UFILE": ("ib_uverbs_completion_event_file", "uobj.ufile", RDMA_MODULES),
    "OFF_UVERBS_FILE_DEVICE": ("ib_uverbs_file", "device", RDMA_MODULES),
    "OFF_UVERBS_DEVICE_IB_DEV": ("ib_uverbs_device", "ib_dev", RDMA_MODULES),
}


def _ib_device_name_cflags() -> list:
    """struct ib_device keeps its name as a char array (``name``) on current kernels;
    otherwise the driver-model name pointer (``dev.kobj.name``) is used."""
    try:
        if btf_modules.member_kind("ib_device", "name", RDMA_MODULES) == "array":
            off = btf_modules.offset("ib_device", "name", RDMA_MODULES)
            return [f"-DOFF_IB_DEVICE_NAME={off}", "-DIBDEV_NAME_IS_ARRAY"]
    except btf.BtfError:
        pass
    try:
        return [f"-DOFF_IB_DEVICE_NAME={btf_modules.offset('ib_device', 'dev.kobj.name', RDMA_MODULES)}"]
    except btf.BtfError as e:
        raise ProbeError(f"struct offsets unavailable: {e}") from e


def libibverbs_path() -> str:
    """The libibverbs.so.1 that programs load (via BCC's ld.so.cache lookup)."""
    from bcc import BPF
    found = BPF.find_library(UPROBE_LIB.encode())
    return found.decode() if isinstance(found, bytes) else (found or "")


def uprobe_addresses(lib: str) -> list:
    """File offsets of every exported version of ibv_get_cq_event (IBVERBS_1.0, 1.1)."""
    from bcc import BPF
    addrs = sorted({addr for _name, addr in BPF.get_user_functions_and_addresses(
        lib.encode(), f"^{UPROBE_SYM}$".encode())})
    return addrs


def methods(cfg, tracefs):
    def kprobe():
        if not kernel.has_kprobes(tracefs):
            raise ProbeError("kernel has no kprobes (CONFIG_KPROBES off)")
        if KPROBE_FN not in kallsyms_present([KPROBE_FN]):
            raise ProbeError(f"{KPROBE_FN} not in /proc/kallsyms (ib_uverbs not loaded: "
                             "no RDMA device in use)")
        try:
            fields = btf_modules.offset_cflags(KPROBE_FIELDS)
        except btf.BtfError as e:
            raise ProbeError(f"struct offsets unavailable: {e}") from e
        b = load_bpf("rdma", base_cflags(cfg) + fields + _ib_device_name_cflags())
        b.attach_kprobe(event=KPROBE_FN.encode(), fn_name=b"ss_kp_comp_event_read")
        b.attach_kretprobe(event=KPROBE_FN.encode(), fn_name=b"ss_kp_comp_event_read_ret",
                           maxactive=KRETPROBE_MAXACTIVE)
        return b, f"kprobe/kretprobe {KPROBE_FN} (verbs completion waits)"

    def uprobe():
        lib = libibverbs_path()
        if not lib or not os.path.exists(lib):
            raise ProbeError("libibverbs.so.1 not found (rdma-core's libibverbs1 not installed)")
        addrs = uprobe_addresses(lib)
        if not addrs:
            raise ProbeError(f"{lib} exports no {UPROBE_SYM}")
        b = load_bpf("rdma", base_cflags(cfg) + ["-DSS_RDMA_UPROBE"])
        for addr in addrs:
            b.attach_uprobe(name=lib.encode(), addr=addr, fn_name=b"ss_up_cq_event")
            b.attach_uretprobe(name=lib.encode(), addr=addr, fn_name=b"ss_up_cq_event_ret")
        return b, f"uprobe/uretprobe {os.path.basename(lib)}:{UPROBE_SYM} " \
                  f"({len(addrs)} symbol versions; verbs completion waits)"

    return [("kprobe", kprobe), ("uprobe", uprobe)]


def decode(rtype, r, base, method) -> dict:
    return {"rdma": {**base, "op": ops(r["op"]), "device": unique_map(r["path"], comm_str),
                     "qp": r["key"].astype(np.uint64), "bytes": r["ret"].astype(np.int64)}}
