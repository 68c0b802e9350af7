/* common.bpf.h: maps and helpers shared by every probe family (BCC).
 *
 * Each family is compiled as its own BPF object with:
 *   events    ring buffer of struct ss_event, submitted with BPF_RB_NO_WAKEUP
 *             (user space drains it on a timer; no wakeup per event)
 *   counters  per-CPU counters (lost, emitted, below threshold, ...)
 *   hist      per-CPU log2(us) latency histograms of ops below the threshold
 * Configuration arrives as -D flags (tracer/probes.py):
 *   SS_MIN_NS          latency threshold; shorter ops only feed hist
 *   SS_FILTER_PID      only this tgid (0: all)
 *   SS_FILTER_CGROUP   only this cgroup v2 id (0: all)
 *   SS_RINGBUF_PAGES   ring size in pages
 *   OFF_*              struct member offsets from the running kernel's BTF
 */
#ifndef SS_COMMON_BPF_H
#define SS_COMMON_BPF_H

/* Only what the programs use: fixed-width types and struct pt_regs. Kernel structs are
 * read at offsets from the running kernel's BTF (OFF_*), never through the headers, so
 * <linux/sched.h> (which drags in most of include/linux) only cost compile time: 2-3x a
 * small family's BCC compile (6.12 guest: tcp 21 -> 10 s, block 24 -> 9 s, rdma 24 -> 8 s,
 * VFS fentry 111 -> 60 s; on this host tcp 0.76 -> 0.30 s). */
#include <linux/types.h>
#include <asm/ptrace.h>
#include "stallscope.h"

#ifndef SS_MIN_NS
#define SS_MIN_NS 10000000ULL
#endif
#ifndef SS_FILTER_PID
#define SS_FILTER_PID 0
#endif
#ifndef SS_FILTER_CGROUP
#define SS_FILTER_CGROUP 0
#endif
#ifndef SS_RINGBUF_PAGES
#define SS_RINGBUF_PAGES 4096
#endif

#define SS_MAX_DEPTH 16

BPF_RINGBUF_OUTPUT(events, SS_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, u64, SS_NCOUNTERS);
BPF_PERCPU_ARRAY(hist, u64, SS_NOPS * SS_HIST_SLOTS);
/* overload shedding: [0] = a raised threshold (ns, 0 = none) that user space sets when the
 * ring fills faster than it drains (tracer/ring.py Shedder) */
BPF_ARRAY(shed, u64, 1);
/* scratch for the path walk: twice SS_PATH_LEN so a bounded write at any
 * offset below SS_PATH_LEN stays inside the buffer (keeps the verifier happy) */
struct ss_scratch { char buf[2 * SS_PATH_LEN]; };
BPF_PERCPU_ARRAY(scratch, struct ss_scratch, 1);

#define ss_read(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(src))

static __always_inline void ss_count(int idx)
{
	u64 *c = counters.lookup(&idx);
	if (c)
		(*c)++;
}

/* true when the current task passes the pid and cgroup filters */
static __always_inline int ss_wanted(u64 pid_tgid)
{
#if SS_FILTER_PID
	if ((pid_tgid >> 32) != SS_FILTER_PID)
		return 0;
#endif
#if SS_FILTER_CGROUP
	if (bpf_get_current_cgroup_id() != SS_FILTER_CGROUP)
		return 0;
#endif
	return 1;
}

static __always_inline u32 ss_log2(u64 v)
{
	u32 r = 0;
#pragma unroll
	for (int i = 5; i >= 0; i--) {
		u32 shift = 1 << i;
		if (v >= (1ULL << shift)) {
			v >>= shift;
			r += shift;
		}
	}
	return r;
}

/* slot k (floor(log2(x)) of x = (ns >> 10) + 1: a shift, not a division) counts ops with
 * ns >> 10 in [2^k - 1, 2^(k+1) - 1), i.e. below (2^(k+1) - 1) * 1.024 us; the last slot is open */
static __always_inline void ss_hist_add(u32 op, u64 dur_ns)
{
	u32 slot = ss_log2((dur_ns >> 10) + 1);
	if (slot >= SS_HIST_SLOTS)
		slot = SS_HIST_SLOTS - 1;
	int idx = (op & (SS_NOPS - 1)) * SS_HIST_SLOTS + slot;
	u64 *c = hist.lookup(&idx);
	if (c)
		(*c)++;
}

/* Start a record: type and op stamped, every type-specific field (stallscope.h)
 * zeroed; the family sets what it uses after this. */
static __always_inline void ss_init(struct ss_event *e, u8 type, u8 op)
{
	e->cgroup_id = 0;
	e->ret = 0;
	e->ino = 0;
	e->key = 0;
	e->dev = 0;
	e->fs_magic = 0;
	e->type = type;
	e->op = op;
	e->state = 0;
	e->flags = 0;
	e->sport = e->dport = e->family = e->segs = 0;
	e->aux = 0;
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
}

/* An op at or above SS_MIN_NS that the raised threshold sheds: counted, not emitted. Only
 * ops past the compile-time threshold pay this lookup. */
static __always_inline int ss_shed(u64 dur)
{
	int zero = 0;
	u64 *t = shed.lookup(&zero);
	if (t && dur < *t) {
		ss_count(SS_C_SHED);
		return 1;
	}
	return 0;
}

/* below the threshold in force: the compile-time one, or the one overload raised */
#define ss_below(dur) ((dur) < SS_MIN_NS || ss_shed(dur))

/* A record in the ring, or 0 (counted lost). A refused reservation is retried once (one
 * retry, not a loop: every call site pays its branches in the verifier, which on 5.10 under
 * emulation is slow enough already): on
 * kernels whose ring lock is the resilient spinlock (struct bpf_ringbuf's spinlock is an
 * rqspinlock_t, 6.15+ where it was not reverted; this host's 6.18 is one), the lock can give
 * up with room in the ring, and single records went missing at 5-22% fill. A full ring
 * refuses the retry too, so the retry costs nothing unless the ring refused. */
static __always_inline struct ss_event *ss_reserve(void)
{
	struct ss_event *e = events.ringbuf_reserve(sizeof(struct ss_event));
	if (e)
		return e;
	e = events.ringbuf_reserve(sizeof(struct ss_event));
	if (e) {
		ss_count(SS_C_RETRY_SAVED);
		return e;
	}
	ss_count(SS_C_LOST_RINGBUF);
	return 0;
}

static __always_inline void ss_submit(struct ss_event *e)
{
	ss_count(SS_C_EMITTED);
	events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* The current task's struct file for fd (0 if none): task->files->fdt->fd[fd]. */
#ifdef OFF_TASK_FILES
static __always_inline void *ss_fd_to_file(u64 fd)
{
	void *task = (void *)bpf_get_current_task();
	void *files = 0, *fdt = 0, **fdarr = 0, *file = 0;
	unsigned int max_fds = 0;
	ss_read(files, task + OFF_TASK_FILES);
	if (!files)
		return 0;
	ss_read(fdt, files + OFF_FILES_FDT);
	if (!fdt)
		return 0;
	ss_read(max_fds, fdt + OFF_FDT_MAX_FDS);
	if (fd >= max_fds)
		return 0;
	ss_read(fdarr, fdt + OFF_FDT_FD);
	if (!fdarr)
		return 0;
	ss_read(file, fdarr + fd);
	return file;
}
#endif

/* Fill inode/fs fields and the path (leaf first, NUL separated) of a struct file.
 * Returns the inode mode (0 when the file could not be read). */
#ifdef OFF_FILE_PATH_DENTRY
static __always_inline u32 ss_fill_file(struct ss_event *e, void *file)
{
	void *inode = 0, *sb = 0, *dentry = 0, *vfsmnt = 0;
	u16 mode = 0;
	ss_read(inode, file + OFF_FILE_INODE);
	ss_read(dentry, file + OFF_FILE_PATH_DENTRY);
	ss_read(vfsmnt, file + OFF_FILE_PATH_MNT);
	if (!inode)
		return 0;
	ss_read(mode, inode + OFF_INODE_MODE);
	ss_read(e->ino, inode + OFF_INODE_INO);
	ss_read(sb, inode + OFF_INODE_SB);
	if (sb) {
		unsigned long magic = 0;
		ss_read(magic, sb + OFF_SB_MAGIC);
		e->fs_magic = magic;
		ss_read(e->dev, sb + OFF_SB_DEV);
	}
	int zero = 0;
	struct ss_scratch *s = scratch.lookup(&zero);
	if (!s)
		return mode;
	void *mnt = vfsmnt - OFF_MOUNT_MNT;   /* container_of(vfsmnt, struct mount, mnt) */
	u32 off = 0;
	int complete = 0;
#pragma unroll
	for (int i = 0; i < SS_MAX_DEPTH; i++) {
		void *parent = 0, *mnt_root = 0;
		ss_read(parent, dentry + OFF_DENTRY_PARENT);
		ss_read(mnt_root, vfsmnt + OFF_VFSMOUNT_ROOT);
		if (dentry == mnt_root || dentry == parent) {
			void *mnt_parent = 0;
			ss_read(mnt_parent, mnt + OFF_MOUNT_PARENT);
			if (mnt_parent == mnt || !mnt_parent) {
				complete = 1;           /* the root of the mount tree */
				break;
			}
			ss_read(dentry, mnt + OFF_MOUNT_MOUNTPOINT);
			mnt = mnt_parent;
			vfsmnt = mnt + OFF_MOUNT_MNT;
			continue;
		}
		const char *name = 0;
		ss_read(name, dentry + OFF_DENTRY_NAME);
		if (off >= SS_PATH_LEN) {
			e->flags |= SS_F_PATH_TRUNC;
			break;
		}
		int n = bpf_probe_read_kernel_str(&s->buf[off & (SS_PATH_LEN - 1)], SS_PATH_LEN, name);
		if (n <= 0)
			break;
		off += n;
		dentry = parent;
	}
	if (!complete || off > SS_PATH_LEN)
		e->flags |= SS_F_PATH_TRUNC;
	if (off < SS_PATH_LEN)
		s->buf[off & (SS_PATH_LEN - 1)] = 0;   /* empty component ends the list */
	bpf_probe_read_kernel(e->path, SS_PATH_LEN, s->buf);
	return mode;
}
#endif

#endif
