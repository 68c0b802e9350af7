"""The probe families, one module each (plus its bpf/<name>.bpf.c).

A family module declares:
  NAME            the family name (``--families``) and its BPF source, bpf/<NAME>.bpf.c
  RECORD_TYPES    the ``enum ss_type`` values its records carry
  methods(cfg, tracefs) -> [(method, fn)]   attach methods, best first; fn() returns
                  (BPF object, one-line detail) or raises ProbeError
  decode(rtype, records, base, method) -> {table: columns}   its records as event tables
                  (``base`` holds the common columns ts_ns, dur_ns, pid, tid, comm)
  sweep(bpf) -> records   optional: records the family finishes in user space, added to
                  every drain (vfs: the last part of a storm whose thread went quiet)
  DEFAULT         optional, False: loaded only when asked for (``--families ...,NAME``)

Adding a family: write its two files and list it here.
"""

from . import block, http, nfs, rdma, sched, tcp, vfs

REGISTRY = (vfs, tcp, block, nfs, rdma, sched, http)
BY_NAME = {f.NAME: f for f in REGISTRY}
ALL_FAMILIES = tuple(f.NAME for f in REGISTRY)
#: what `trace`/`watch` load without --families: every family whose cost is measured within goal
DEFAULT_FAMILIES = tuple(f.NAME for f in REGISTRY if getattr(f, "DEFAULT", True))
BY_RECORD_TYPE = {t: f for f in REGISTRY for t in f.RECORD_TYPES}
