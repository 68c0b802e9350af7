/* The benchmark baseline: a bare pread64 enter/exit tracepoint pair that only
 * counts into an array map. The tracer's own cost is reported as a ratio to it. */
BPF_ARRAY(calls, u64, 2);

TRACEPOINT_PROBE(syscalls, sys_enter_pread64)
{
	int k = 0;
	u64 *c = calls.lookup(&k);
	if (c)
		__sync_fetch_and_add(c, 1);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_pread64)
{
	int k = 1;
	u64 *c = calls.lookup(&k);
	if (c)
		__sync_fetch_and_add(c, 1);
	return 0;
}
