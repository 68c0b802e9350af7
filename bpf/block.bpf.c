/* block.bpf.c: block request latency by device, issue -> complete (device time, as
 * biolatency). Requests shorter than the threshold only feed the per-op histogram.
 *
 * Two variants, the first where the running kernel's BTF allows it (SS_BLK_RAW):
 *
 * raw tracepoints block_rq_issue, block_rq_complete, block_getrq, block_rq_requeue, keyed
 * by the request itself (struct request *). A requeued request keeps its first issue
 * time. Device, sector, size and op are read from the request at offsets from BTF
 * (OFF_RQ_*), as the block tracepoints compute them. Requests in flight together at one
 * sector (an O_DIRECT and a buffered read of one block; cache flushes, which carry no data
 * and name sector 0, of a multi-queue device's queues) are each reported. The submitter is
 * noted at block_getrq keyed by its bio, found again at issue as the request's first bio.
 *
 * tracepoints block:block_rq_issue and block:block_rq_complete, keyed by (dev, sector) as
 * they name requests; the submitter noted at block:block_getrq keyed by sector (on 5.12+
 * getrq's dev is a partition's while issue names the whole disk; both carry the remapped,
 * whole-disk sector). Two requests in flight at one (dev, sector) share a slot: one of the
 * two is lost, and counted (lost_inflight_collision).
 *
 * The task is the submitter's, because the issue may run later from kblockd (a kworker): on
 * 5.10 with null_blk every O_DIRECT read was issued so. Where getrq was not seen for the
 * request (a front merge, a request the block layer made itself, a flush), the issuing
 * task. For writeback the submitter is a kworker too, which is why block stalls are blamed
 * through the VFS op that waited on them (fsync) rather than by pid alone.
 */
#include "common.bpf.h"

/* comm 8-byte aligned: BCC 0.18's clang (Debian 11) turned the copy of a comm at an odd
 * offset into code 5.10's verifier refused ("unknown opcode 00") */
struct blk_start { u64 ts; u64 sector; char comm[SS_COMM_LEN]; u32 dev; u32 pid; u32 tid; u32 bytes;
		   u8 op; u8 requeued; };
struct blk_who { u32 pid; u32 tid; char comm[SS_COMM_LEN]; };

/* request -> its submitter, noted at getrq: keyed by bio (raw) or sector (tracepoints). An
 * LRU map, so notes never consumed (a request whose key changed before issue) age out. */
BPF_TABLE("lru_hash", u64, struct blk_who, blk_who, 16384);

/* Note the current task as the submitter of the request allocated for ``key``. */
static __always_inline void blk_note(u64 key)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!ss_wanted(id))
		return;
	struct blk_who w = {};
	w.pid = id >> 32;
	w.tid = (u32)id;
	bpf_get_current_comm(w.comm, sizeof(w.comm));
	blk_who.update(&key, &w);
}

/* The start of a request issued now: its submitter from the note ``w`` (deleted by the
 * caller) when there is one, else the issuing task when it passes the filters. 0: skip. */
static __always_inline int blk_fill(struct blk_start *s, struct blk_who *w)
{
	if (w) {
		s->pid = w->pid;
		s->tid = w->tid;
		__builtin_memcpy(s->comm, w->comm, SS_COMM_LEN);
	} else {
		u64 id = bpf_get_current_pid_tgid();
		if (!ss_wanted(id))
			return 0;
		s->pid = id >> 32;
		s->tid = (u32)id;
		bpf_get_current_comm(s->comm, sizeof(s->comm));
	}
	s->ts = bpf_ktime_get_ns();
	return 1;
}

/* A request completed: an event when it took the threshold or more, else the histogram. */
static __always_inline void blk_done(struct blk_start *s, int error)
{
	u64 dur = bpf_ktime_get_ns() - s->ts;
	if (ss_below(dur)) {
		ss_hist_add(s->op, dur);
		ss_count(SS_C_BELOW);
		return;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = s->ts;
	e->dur_ns = dur;
	e->ret = error;
	e->key = s->sector;
	e->pid = s->pid;
	e->tid = s->tid;
	e->dev = s->dev;
	e->type = SS_T_BLOCK;
	e->op = s->op;
	e->aux = s->bytes;
	__builtin_memcpy(e->comm, s->comm, SS_COMM_LEN);
	ss_submit(e);
}

#ifdef SS_BLK_RAW
/* the request's fields at BTF offsets; op, flag bits and the dev_t encoding as the
 * tracepoints' blk_fill_rwbs and disk_devt have them */
BPF_HASH(blk_start, u64, struct blk_start, 16384);

#define BLK_OP_MASK ((1U << SS_REQ_OP_BITS) - 1)

static __always_inline u8 blk_op(u32 opf)
{
	u32 op = opf & BLK_OP_MASK;
	if ((opf & (1U << SS_REQ_PREFLUSH)) || (opf & (1U << SS_REQ_FUA)) || op == 2 /* FLUSH */)
		return SS_OP_BLK_FLUSH;
	if (op == 0)
		return SS_OP_BLK_READ;
	if (op == 1)
		return SS_OP_BLK_WRITE;
	if (op == 3 || op == 5)         /* DISCARD, SECURE_ERASE */
		return SS_OP_BLK_DISCARD;
	return SS_OP_BLK_OTHER;
}

RAW_TRACEPOINT_PROBE(block_getrq)
{
	blk_note(ctx->args[SS_BLK_GETRQ_ARG]);      /* the bio */
	return 0;
}

RAW_TRACEPOINT_PROBE(block_rq_issue)
{
	u64 rq = ctx->args[SS_BLK_ISSUE_ARG];
	u64 sector = 0, bio = 0, disk = 0;
	u32 bytes = 0, opf = 0;
	ss_read(sector, rq + OFF_RQ_SECTOR);
	ss_read(bytes, rq + OFF_RQ_DATA_LEN);
	ss_read(opf, rq + OFF_RQ_CMD_FLAGS);
	ss_read(bio, rq + OFF_RQ_BIO);
	if (sector == (u64)-1)          /* a flush: no position, which block_rq_issue names 0 */
		sector = 0;
#ifdef OFF_RQ_DISK
	ss_read(disk, rq + OFF_RQ_DISK);
#else
	u64 q = 0;
	ss_read(q, rq + OFF_RQ_Q);
	if (q)
		ss_read(disk, q + OFF_Q_DISK);
#endif
	u32 dev = 0;
	if (disk) {
		int major = 0, minor = 0;
		ss_read(major, disk + OFF_DISK_MAJOR);
		ss_read(minor, disk + OFF_DISK_FIRST_MINOR);
		dev = ((u32)major << 20) | (u32)minor;
	}
	struct blk_start *old = blk_start.lookup(&rq);
	if (old) {
		/* issued again without a completion between: requeued (the wait began at its
		 * first issue), or a completion this program never saw (counted; timed anew) */
		if (old->requeued) {
			old->requeued = 0;
			return 0;
		}
		ss_count(SS_C_INFLIGHT_COLLISION);
	}
	struct blk_start s = {};
	struct blk_who *w = bio ? blk_who.lookup(&bio) : 0;
	if (!blk_fill(&s, w))
		return 0;
	if (w)
		blk_who.delete(&bio);
	s.sector = sector;
	s.dev = dev;
	s.bytes = bytes;
	s.op = blk_op(opf);
	blk_start.update(&rq, &s);
	return 0;
}

RAW_TRACEPOINT_PROBE(block_rq_requeue)
{
	u64 rq = ctx->args[SS_BLK_REQUEUE_ARG];
	struct blk_start *s = blk_start.lookup(&rq);
	if (s)
		s->requeued = 1;
	return 0;
}

RAW_TRACEPOINT_PROBE(block_rq_complete)
{
	u64 rq = ctx->args[SS_BLK_COMPLETE_ARG];
	struct blk_start *s = blk_start.lookup(&rq);
	if (!s)
		return 0;
	blk_done(s, (int)ctx->args[SS_BLK_COMPLETE_ARG + 1]);
	blk_start.delete(&rq);
	return 0;
}

#else /* tracepoints */
struct blk_key { u32 dev; u32 pad; u64 sector; };
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

TRACEPOINT_PROBE(block, block_getrq)
{
	blk_note(args->sector);
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
	u64 sector = args->sector;
	struct blk_start s = {};
	struct blk_who *w = blk_who.lookup(&sector);
	if (!blk_fill(&s, w))
		return 0;
	if (w)
		blk_who.delete(&sector);
	struct blk_key k = {.dev = args->dev, .sector = sector};
	s.sector = sector;
	s.dev = args->dev;
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
	/* a flush's issue names sector 0 but its completion the request's unset position, -1
	 * (seen on 6.18): unmatched, every flush was lost and the next one counted a collision */
	u64 sector = args->sector;
	if (sector == (u64)-1)
		sector = 0;
	struct blk_key k = {.dev = args->dev, .sector = sector};
	struct blk_start *s = blk_start.lookup(&k);
	if (!s)
		return 0;
	/* free the slot before the (slower) report: a request issued at this sector on
	 * another CPU meanwhile takes a fresh slot instead of having its own deleted here */
	struct blk_start c = *s;
	blk_start.delete(&k);
	blk_done(&c, args->error);
	return 0;
}
#endif
