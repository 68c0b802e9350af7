"""tracer.kernel.remove_stale_bcc_probes: probe events a killed BCC process left in tracefs."""

from stallscope.tracer.kernel import remove_stale_bcc_probes


def test_only_events_of_dead_bcc_processes_are_removed(tmp_path):
    (tmp_path / "kprobe_events").write_text(
        "r4096:kprobes/r_vfs_read_bcc_111 vfs_read\n"          # stallscope, SIGKILLed
        "p:kprobes/p_vfs_read_bcc_222 vfs_read\n"              # a BCC tool still running
        "r256:kprobes/r_nfs_file_read_bcc_111 nfs_file_read\n"
        "p:kprobes/myprobe do_sys_open\n")                     # someone's own, not BCC's
    (tmp_path / "uprobe_events").write_text("p:uprobes/p__usr_lib_libssl_so_3_0x1234_bcc_333 /usr/lib/libssl.so.3:0x1234\n")
    removed, failed = remove_stale_bcc_probes(str(tmp_path), alive=lambda pid: pid == 222)
    assert removed == ["kprobes/r_vfs_read_bcc_111", "kprobes/r_nfs_file_read_bcc_111",
                       "uprobes/p__usr_lib_libssl_so_3_0x1234_bcc_333"] and failed == []
    # tracefs takes "-:<group>/<event>" appended to the file to remove an event
    assert (tmp_path / "kprobe_events").read_text().splitlines()[-2:] == [
        "-:kprobes/r_vfs_read_bcc_111", "-:kprobes/r_nfs_file_read_bcc_111"]
    assert (tmp_path / "uprobe_events").read_text().splitlines()[-1] == \
        "-:uprobes/p__usr_lib_libssl_so_3_0x1234_bcc_333"


def test_a_kernel_without_probe_event_files_removes_nothing(tmp_path):
    assert remove_stale_bcc_probes(str(tmp_path)) == ([], [])
