"""RDMA port counters from sysfs, as deltas: the "rdma_counter" table.

On RDMA NICs the data path never enters the kernel, so retransmissions, packet
sequence errors, receiver-not-ready NAKs and congestion notifications are only
visible as counters the driver exports per port:

* ``/sys/class/infiniband/<dev>/ports/<port>/hw_counters/*``: driver counters
  (mlx5: ``out_of_sequence``, ``packet_seq_err``, ``local_ack_timeout_err``,
  ``rnr_nak_retry_err``, ``np_cnp_sent``, ``rp_cnp_handled``, ...; soft-RoCE:
  ``completer_retry_err``, ``rcvd_seq_err``, ``out_of_seq_request``,
  ``duplicate_request``, ``rcvd_rnr_err``, ``send_rnr_err``, ...);
* ``/sys/class/infiniband/<dev>/ports/<port>/counters/*``: the IB port (PMA)
  counters (``port_xmit_wait``, ``symbol_error``, ``port_rcv_errors``, ...).

Each poll reads every counter file and yields one row per counter whose value
moved since the previous poll: ``ts_ns`` (previous poll, wall clock), ``dur_ns``
(the interval), ``device``, ``port``, ``counter`` (``hw_counters/<name>`` or
``counters/<name>``) and ``delta``. The first poll of a counter only sets its
baseline. A counter that went backwards (reset, 32-bit PMA wrap) restarts its
baseline without a row. Devices and ports that appear later are picked up.

``root`` is a parameter so tests can point the sampler at a fixture tree.
"""

from __future__ import annotations

import os
import time

import numpy as np

ROOT = "/sys/class/infiniband"
GROUPS = ("hw_counters", "counters")
# not counters: hw_counters/lifespan is the driver's refresh period (ms)
NOT_COUNTERS = {"lifespan"}


class RdmaCounterSampler:
    """Reads RDMA port counters and returns the deltas since the last poll."""

    def __init__(self, root: str = ROOT):
        self.root = root
        self.last: dict = {}          # (device, port, counter) -> value
        self.last_ns: int | None = None
        self.errors = 0

    @classmethod
    def open(cls, root: str = ROOT):
        """A sampler, or None where the node has no RDMA subsystem (no ``root``)."""
        return cls(root) if os.path.isdir(root) else None

    def read(self) -> dict:
        """{(device, port, counter): value} for every readable counter file now."""
        out = {}
        try:
            devices = sorted(os.listdir(self.root))
        except OSError:
            return out
        for dev in devices:
            ports_dir = os.path.join(self.root, dev, "ports")
            try:
                ports = sorted(os.listdir(ports_dir), key=lambda p: int(p) if p.isdigit() else 0)
            except OSError:
                continue
            for port in ports:
                if not port.isdigit():
                    continue
                for group in GROUPS:
                    gdir = os.path.join(ports_dir, port, group)
                    try:
                        names = os.listdir(gdir)
                    except OSError:
                        continue
                    for name in names:
                        if name in NOT_COUNTERS:
                            continue
                        try:
                            with open(os.path.join(gdir, name)) as f:
                                value = int(f.read().split()[0])
                        except (OSError, ValueError, IndexError):
                            self.errors += 1       # unreadable or not a number: skip
                            continue
                        out[(dev, int(port), f"{group}/{name}")] = value
        return out

    def poll(self, now_ns: int | None = None) -> dict | None:
        """{"rdma_counter": table} of the counters that moved, or None."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        cur = self.read()
        prev_ns = self.last_ns
        rows = []
        for key, value in cur.items():
            old = self.last.get(key)
            if old is not None and value > old and prev_ns is not None:
                rows.append((key, value - old))
        self.last = cur
        self.last_ns = now_ns
        if not rows or prev_ns is None:
            return None
        n = len(rows)
        return {"rdma_counter": {
            "ts_ns": np.full(n, prev_ns, dtype=np.uint64),
            "dur_ns": np.full(n, now_ns - prev_ns, dtype=np.uint64),
            "device": np.array([k[0] for k, _ in rows], dtype=object),
            "port": np.array([k[1] for k, _ in rows], dtype=np.uint64),
            "counter": np.array([k[2] for k, _ in rows], dtype=object),
            "delta": np.array([d for _, d in rows], dtype=np.uint64),
        }}
