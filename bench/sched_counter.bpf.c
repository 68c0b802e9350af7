/* The sched family's benchmark baseline: a bare sched_switch raw tracepoint that only
 * counts into an array map. The family's cost is reported as a ratio to it. */
BPF_ARRAY(switches, u64, 1);

RAW_TRACEPOINT_PROBE(sched_switch)
{
	int k = 0;
	u64 *c = switches.lookup(&k);
	if (c)
		__sync_fetch_and_add(c, 1);
	return 0;
}
