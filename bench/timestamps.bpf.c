/* A second reference for the syscall-cost benchmark: the same pread64
 * enter/exit pair, taking one bpf_ktime_get_ns() on each side and nothing
 * else. Any latency tracer pays at least this; stallscope's hot path is
 * measured against both it and the bare counting pair (baseline.bpf.c). */
BPF_ARRAY(stamps, u64, 2);

TRACEPOINT_PROBE(syscalls, sys_enter_pread64)
{
	int k = 0;
	u64 *v = stamps.lookup(&k);
	if (v)
		*v = bpf_ktime_get_ns();
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_pread64)
{
	int k = 1;
	u64 *v = stamps.lookup(&k);
	if (v)
		*v = bpf_ktime_get_ns();
	return 0;
}
