/* block.bpf.c: block request latency by device, issue -> complete.
 *
 * Stable tracepoints block:block_rq_issue and block:block_rq_complete, keyed
 * by (dev, sector); latency is issue -> complete (device time, as biolatency).
 * The task is the submitter's, taken at block:block_getrq (request allocation,
 * in the context of the task that submitted the bio), because the issue may run
 * later from kblockd (a kworker): on 5.10 with null_blk every O_DIRECT read was
 * issued so. Where getrq was not seen for the sector (a front merge, a request
 * the block layer made itself), the issuing task. Two requests in flight at one
 * (dev, sector) share a slot: one of the two is lost, and counted
 * (lost_inflight_collision). For writeback the submitter is
 * a kworker too, which is why block stalls are blamed through the VFS op that
 * waited on them (fsync) rather than by pid alone. Requests shorter than the
 * threshold only feed the per-op histogram.
 */
#include "common.bpf.h"

struct blk_key { u32 dev; u32 pad; u64 sector; };
struct blk_start { u64 ts; u32 pid; u32 tid; u32 bytes; u8 op; char comm[SS_COMM_LEN]; };
BPF_HASH(blk_start, struct blk_key, struct blk_start, 16384);

static __always_inline u8 rwbs_op(const char *rwbs)
{
	char c0 = rwbs[0];
	char c1 = rwbs[1];
	if (c0 == 'F' || c1 == 'F')
		return SS_OP_BLK_FLUSH;
	if (c0 == 'R')
		return SS_OP_BLK_READ;
	if (c0 == 'W')
		return SS_OP_BLK_WRITE;
	if (c0 == 'D')
		return SS_OP_BLK_DISCARD;
	return SS_OP_BLK_OTHER;
}

/* The submitter of the request starting at a sector, from getrq to issue. Keyed by
 * the sector alone: on 5.12+ getrq's dev is a partition's while issue names the
 * whole disk; both carry the remapped (whole-disk) sector. An LRU map, so the
 * entries of requests whose sector changed before issue age out. */
struct blk_who { u32 pid; u32 tid; char comm[SS_COMM_LEN]; };
BPF_TABLE("lru_hash", u64, struct blk_who, blk_who, 16384);

TRACEPOINT_PROBE(block, block_getrq)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!ss_wanted(id))
		return 0;
	u64 sector = args->sector;
	struct blk_who w = {};
	w.pid = id >> 32;
	w.tid = (u32)id;
	bpf_get_current_comm(w.comm, sizeof(w.comm));
	blk_who.update(&sector, &w);
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
	u64 sector = args->sector;
	struct blk_start s = {};
	struct blk_who *w = blk_who.lookup(&sector);
	if (w) {
		s.pid = w->pid;
		s.tid = w->tid;
		__builtin_memcpy(s.comm, w->comm, SS_COMM_LEN);
		blk_who.delete(&sector);
	} else {
		u64 id = bpf_get_current_pid_tgid();
		if (!ss_wanted(id))
			return 0;
		s.pid = id >> 32;
		s.tid = (u32)id;
		bpf_get_current_comm(s.comm, sizeof(s.comm));
	}
	struct blk_key k = {.dev = args->dev, .sector = sector};
	s.ts = bpf_ktime_get_ns();
	s.bytes = args->bytes;
	char rwbs[4] = {};
	bpf_probe_read_kernel(rwbs, sizeof(rwbs), args->rwbs);
	s.op = rwbs_op(rwbs);
	/* Two requests in flight at one (dev, sector): a buffered read and an O_DIRECT read
	 * of the same block, say. The newer takes the slot; the first completion reports it
	 * (with the older one's latency) and the second finds none: one event lost, counted. */
	if (blk_start.lookup(&k))
		ss_count(SS_C_INFLIGHT_COLLISION);
	blk_start.update(&k, &s);
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
	struct blk_key k = {.dev = args->dev, .sector = args->sector};
	struct blk_start *s = blk_start.lookup(&k);
	if (!s)
		return 0;
	u64 dur = bpf_ktime_get_ns() - s->ts;
	if (ss_below(dur)) {
		ss_hist_add(s->op, dur);
		ss_count(SS_C_BELOW);
		blk_start.delete(&k);
		return 0;
	}
	struct ss_event *e = ss_reserve();
	if (e) {
		__builtin_memset(e, 0, sizeof(*e));
		e->ts_ns = s->ts;
		e->dur_ns = dur;
		e->ret = args->error;
		e->key = args->sector;
		e->pid = s->pid;
		e->tid = s->tid;
		e->dev = args->dev;
		e->type = SS_T_BLOCK;
		e->op = s->op;
		e->aux = s->bytes;
		__builtin_memcpy(e->comm, s->comm, SS_COMM_LEN);
		ss_submit(e);
	}
	blk_start.delete(&k);
	return 0;
}
