"""`trace --dump-bpf FAMILY` prints the program the running kernel would load, with the
method and the exact flags: compiled on its own with those flags, it loads."""

import re

import pytest

from stallscope.tracer import kernel
from stallscope.tracer.families import ALL_FAMILIES
from tests.bpf.tracerun import run_cli

pytestmark = pytest.mark.bpf

#: families whose probe points this host has (tracepoints only; NFS and RDMA need the VM)
HERE = {"vfs", "tcp", "block", "sched", "http"}


def _dump(family, *args):
    r = run_cli("trace", "--dump-bpf", family, *args)
    assert r.returncode == 0, r.stderr
    head, headers, cflags, body = r.stdout.split("\n", 3)
    return head, headers, cflags, body


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dumped_program_compiles_with_its_own_flags(family):
    from bcc import BPF
    head, headers, cflags, body = _dump(family)
    m = re.match(rf"// {family}: (method (\w+)|no method loads on this kernel \((.+)\))", head)
    assert m, head
    assert headers.startswith("// headers: ") and cflags.startswith("// cflags: -I")
    if family not in HERE and m.group(3):
        assert "kprobe" in m.group(3)            # why not, per method
        return
    assert m.group(2), head
    kernel.ensure_headers()                       # what the dump's headers line says
    flags = cflags[len("// cflags: "):].split()
    assert "-DSS_MIN_NS=10000000ULL" in flags
    b = BPF(text=body.encode(), cflags=flags)    # on its own: the family's flags are all there
    b.cleanup()


def test_dump_follows_the_options_and_the_attach_method():
    head, _, cflags, _ = _dump("vfs", "--min-latency-ms", "25", "--attach", "tracepoint")
    assert head == "// vfs: method tracepoint"
    flags = cflags.split()
    assert "-DSS_MIN_NS=25000000ULL" in flags
    assert any(f.startswith("-DSS_TP_") for f in flags)     # the extra syscalls this kernel has
