"""The optional-attach mechanism (tracer/bpfload.py) that gives the fentry VFS method
vfs_readv/vfs_writev where a kernel has them: checked on the host without loading BPF
(the guest tests load it on each kernel of the matrix)."""

from __future__ import annotations

import os

import pytest

from stallscope.tracer import btf
from stallscope.tracer.bpfload import fentry_targets, load_optional

needs_btf = pytest.mark.skipif(not os.path.exists(btf.BTF_PATH) and os.environ.get("STALLSCOPE_REQUIRE_BPF") != "1",
                               reason="kernel without BTF")


@needs_btf
def test_a_function_missing_from_btf_or_kallsyms_costs_that_function_only(tmp_path):
    kallsyms = tmp_path / "kallsyms"
    # vfs_read as the kernel lists it; vfs_write left out (as if inlined: BTF may still name it)
    kallsyms.write_text("ffffffff81000000 T vfs_read\nffffffff81000100 t vfs_fsync_range\n")
    present, missing = fentry_targets(["vfs_read", "vfs_write", "ss_no_such_function"], kallsyms=str(kallsyms))
    assert present == ["vfs_read"]
    assert missing == {"vfs_write": "not in /proc/kallsyms (inlined)",
                       "ss_no_such_function": "not in the kernel's BTF (inlined or absent)"}


def test_unreadable_btf_makes_every_optional_target_missing_with_the_reason(tmp_path):
    present, missing = fentry_targets(["vfs_readv"], btf_path=str(tmp_path / "none"))
    assert present == [] and "cannot read kernel BTF" in missing["vfs_readv"]


def test_a_load_that_fails_with_optional_targets_is_retried_without_them():
    calls = []

    def load(flags):
        calls.append(list(flags))
        if flags:
            raise Exception("bpf: Failed to load program\nlibbpf: failed to find BTF ID for vfs_writev")
        return "bpf-object"

    obj, attached, missing = load_optional(load, lambda s: f"-DSS_FENTRY_{s}", ["vfs_readv", "vfs_writev"],
                                           {"x": "absent"})
    assert obj == "bpf-object" and attached == []
    assert calls == [["-DSS_FENTRY_vfs_readv", "-DSS_FENTRY_vfs_writev"], []]
    assert missing == {"x": "absent",
                       "vfs_readv": "attach failed: libbpf: failed to find BTF ID for vfs_writev",
                       "vfs_writev": "attach failed: libbpf: failed to find BTF ID for vfs_writev"}


def test_a_load_that_fails_without_optional_targets_fails_the_method():
    def load(flags):
        raise RuntimeError("no BTF")
    with pytest.raises(RuntimeError, match="no BTF"):
        load_optional(load, str, [], {})
