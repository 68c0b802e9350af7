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


class _Attached:
    """What BCC's BPF object records of the fentry/fexit programs it attached while loading."""

    def __init__(self, entry, exit_, module=""):
        # BCC 0.18 keeps kfunc__vfs_read; later versions kfunc__vmlinux__vfs_read
        m = f"{module}__" if module else ""
        self.kfunc_entry_fds = {f"kfunc__{m}{n}".encode(): 3 for n in entry}
        self.kfunc_exit_fds = {f"kretfunc__{m}{n}".encode(): 4 for n in exit_}
        self.cleaned = False

    def detach_kfunc(self, fn_name):
        del self.kfunc_entry_fds[fn_name]

    def detach_kretfunc(self, fn_name):
        del self.kfunc_exit_fds[fn_name]

    def cleanup(self):
        self.cleaned = True


def _fentry_method(monkeypatch, attached):
    from stallscope.tracer.families import vfs
    monkeypatch.setattr(vfs, "fentry_works", lambda: (True, ""))
    monkeypatch.setattr(vfs, "fentry_targets", lambda names: (list(names), {}))
    monkeypatch.setattr(vfs, "load_and_attach", lambda cflags, syscalls: attached)
    monkeypatch.setattr(vfs, "extra_ops", lambda tracefs: ([], [], ""))
    from stallscope.tracer.probes import ProbeConfig
    monkeypatch.setattr(vfs, "base_cflags", lambda cfg: [])
    return dict(vfs.methods(ProbeConfig(), "/sys/kernel/tracing"))["fentry"]


@pytest.mark.parametrize("module", ["", "vmlinux"])
def test_an_optional_target_with_only_its_entry_attached_is_detached_and_reported(monkeypatch, module):
    # BCC 0.18 (Debian 11) attached the fentry program of a pair and not its fexit
    b = _Attached(["vfs_read", "vfs_write", "vfs_readv", "vfs_writev"], ["vfs_read", "vfs_write", "vfs_writev"],
                  module)
    obj, detail = _fentry_method(monkeypatch, b)()
    assert obj is b and not b.cleaned
    assert detail.startswith("fentry/fexit vfs_read vfs_write vfs_writev (not attached: vfs_readv: BCC attached "
                             "fentry only)"), detail
    m = f"{module}__" if module else ""
    assert f"kfunc__{m}vfs_readv".encode() not in b.kfunc_entry_fds      # no entry left without its return
    assert f"kfunc__{m}vfs_writev".encode() in b.kfunc_entry_fds


@pytest.mark.parametrize("module", ["", "vmlinux"])
def test_every_pair_attached_is_reported_attached(monkeypatch, module):
    # BCC 0.26+ (Debian 12, 13) keeps kfunc__vmlinux__<name>: read as attached (6.12 guest run)
    names = ["vfs_read", "vfs_write", "vfs_readv", "vfs_writev"]
    obj, detail = _fentry_method(monkeypatch, _Attached(names, names, module))()
    assert detail.startswith("fentry/fexit vfs_read vfs_write vfs_readv vfs_writev") and "not attached" not in detail


def test_a_bcc_that_keeps_no_record_of_its_links_is_not_second_guessed():
    from stallscope.tracer.bpfload import kfuncs_unattached
    assert kfuncs_unattached(object(), ["vfs_read"]) == {}


def test_a_base_target_without_its_exit_fails_the_method_so_the_next_one_is_tried(monkeypatch):
    from stallscope.tracer.bpfload import ProbeError
    b = _Attached(["vfs_read", "vfs_write"], ["vfs_write"])
    with pytest.raises(ProbeError, match="vfs_read: BCC attached fentry only"):
        _fentry_method(monkeypatch, b)()
    assert b.cleaned
