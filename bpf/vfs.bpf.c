/* vfs.bpf.c: every way a thread waits on a file: read/write/fsync-family
 * calls, sendfile/splice/copy_file_range, open and stat, directory reads,
 * io_uring and AIO completion waits.
 *
 * Attach methods (chosen by tracer/families/vfs.py, best first):
 *   SS_VFS_FENTRY      fentry/fexit on vfs_read, vfs_write
 *                      (BTF trampolines, cheapest), plus vfs_readv and
 *                      vfs_writev where the kernel has them as functions
 *                      (SS_FENTRY_vfs_readv/_writev, set by vfs.py: static,
 *                      they may be inlined away; a missing one costs that op)
 *   SS_VFS_KPROBE      kprobe/kretprobe on vfs_read, vfs_write, vfs_readv,
 *                      vfs_writev
 *   (neither)          syscall tracepoints: sys_enter/exit_{read,write,pread64,
 *                      pwrite64,readv,writev}
 * With every method, the ops that no vfs_* function sees reliably come from syscall
 * tracepoints, each compiled only where tracefs has it (SS_TP_<syscall>, set by
 * vfs.py; a missing one loses that op only):
 *   fsync, fdatasync (see there why not vfs_fsync_range).
 *   close: regular files only (NFS writeback, FUSE FLUSH; the file taken at entry).
 *   sendfile64 (file = in_fd), splice (fd_in), copy_file_range (fd_in):
 *       regular files and block devices only. Their time includes waiting on
 *       the output side (a full pipe or socket), reported on the input file.
 *   openat, openat2: the new fd's file and path; a failed open reports the
 *       user's filename (SS_F_PATH_RAW). FIFOs, char devices and sockets, and
 *       opens ended by a signal, are not stalls.
 *   statx, newfstatat: the user's filename string (SS_F_PATH_RAW, relative
 *       names as given); with AT_EMPTY_PATH and an empty name (glibc's fstat)
 *       the dirfd's file and path.
 *   getdents64: the directory.
 *   io_uring_enter only when it waits (IORING_ENTER_GETEVENTS with
 *       min_complete > 0), io_getevents/io_pgetevents only with min_nr > 0:
 *       the file is unknown (empty raw path). Waits for socket completions
 *       look the same as file ones here.
 * Function probes see the struct file directly and also catch kernel-internal
 * callers of vfs_read/vfs_write; tracepoints see the fd and resolve the file
 * through task->files only for ops above the storm floor.
 *
 * Storms (SS_F_AGGREGATE): ops under the threshold that add up. An op counts
 * when it lasts at least SS_STORM_FLOOR_NS (threshold/16: 625 us at 10 ms, far
 * above page-cache hits) on a file it would be reported for. Counted ops of
 * one thread chain while they have the same op and filesystem (the file's
 * super_block, or ring fd / aio context for waits: many small files of one
 * folder are one storm) and each starts at most one threshold after the
 * previous one ended (an op above the threshold on that filesystem, an open
 * included, is reported alone and keeps the chain going; so do a counted
 * open and a close: each only while the storm is within that reach, so a
 * storm gone quiet is never revived by the next open; storm_keep). Opens
 * under the threshold add up beside that storm, in their own
 * (open_storm_add). `segs` counts the files a part's ops went to besides the one its path
 * names (by inode address: 0 for one file; a later part, its moves to another
 * file), so a storm's parts sum to its files less one. A storm is reported in parts: a part is emitted
 * when its summed latency reaches the threshold (ts_ns = first start, dur_ns =
 * last end - first start, aux = ops, key = summed latency, ret = bytes); the
 * part in progress after that (the tail, < one threshold) is emitted when the
 * thread's next counted op does not continue the storm, or else by the
 * tracer's sweep of `storms` (tracer/families/vfs.py) once no op can join it:
 * SS_STORM_HOLD_NS after its last op, i.e. at most 2 thresholds + 1 ms + one
 * ring poll (10-50 ms) after the thread went quiet. Parts of one storm are
 * consecutive and carry the same tid, op and path, so the analysis chains
 * them. A storm that never reaches the threshold is only in the histograms.
 * stat (no file at hand to chain on) does not form storms.
 *
 * Cost below the floor (page-cache hits, the common case): one array slot
 * write on entry; on exit one lookup, a histogram increment and one extra
 * compare. Counted ops (>= floor): the fd -> file walk and a few stores in the
 * same 64-byte slot; a part costs the path walk once per storm, one hash
 * update and a 256-byte ring record. Above the threshold: the path walk and a
 * 256-byte ring record. Stall events are emitted only for regular files and
 * block devices (plus the cases above): pipes, sockets, ttys and /dev/fuse
 * block by design (a FUSE daemon's own reads would otherwise look like stalls).
 * Caveat: with fentry/kprobes, a vfs_read inside a traced syscall would share
 * its thread's slot (none of the syscalls above call vfs_read/vfs_write).
 * Not covered: mmap page faults, the work io_uring/AIO do in their workers.
 */
#include "common.bpf.h"
#include <linux/aio_abi.h>     /* aio_context_t, in the io_getevents tracepoint args */

#define SS_STORM_FLOOR_NS (SS_MIN_NS / 16)
#define SS_STORM_HOLD_NS (2 * SS_MIN_NS + 1000000ULL)
#define SS_STORM_MAX_OPS 255
#define SS_STORMS 4096         /* threads with a storm in progress, node-wide */
#define SS_OPF_FD 0x40         /* slot op flag (stat): fd_or_file is a dirfd */

/* what the slot's fd_or_file is, per call site (a compile-time constant) */
#define K_FILE 0   /* struct file * (function probes) */
#define K_FD 1     /* fd of a regular file or block device */
#define K_DIR 2    /* fd of a directory (getdents64) */
#define K_OPEN 3   /* user pointer to the filename; ret is the new fd */
#define K_STAT 4   /* user pointer to the filename, or a dirfd (SS_OPF_FD) */
#define K_WAIT 5   /* io_uring fd / aio context: no file */
#define K_CLOSE 6  /* struct file * taken at close()'s entry (the fd is gone at its exit) */

#define SS_S_IFMT 0170000
#define SS_S_IFSOCK 0140000
#define SS_S_IFREG 0100000
#define SS_S_IFBLK 0060000
#define SS_S_IFDIR 0040000
#define SS_S_IFCHR 0020000
#define SS_S_IFIFO 0010000

struct ss_inflight {
	u32 tid;          /* thread that last used this slot (kept after its exit) */
	u8 op;
	u8 agg_op;        /* storm accumulator: op, ops in the part, template exists */
	u8 agg_count;
	u8 agg_live;
	u64 ts;           /* enter time; 0: no call in flight */
	u64 fd_or_file;   /* fd (tracepoints) or struct file * (function probes) */
	u64 agg_file;     /* storm identity: the file's super_block, ring fd or aio ctx */
	u64 agg_first;    /* the part's first start, last end, summed latency */
	u64 agg_end;
	u64 agg_sum;
	u32 agg_bytes;    /* bytes of the part (saturating) */
	u16 agg_files;    /* files of the part: 1 + switches between files */
	u16 agg_last;     /* hash of the last op's inode address */
};                        /* 64 bytes: one cache line */
/* indexed by tid % SS_INFLIGHT_SLOTS: an array lookup inlines to a few
 * instructions, a hash update/delete pair costs several times more */
BPF_ARRAY(inflight, struct ss_inflight, SS_INFLIGHT_SLOTS);

/* A storm that has emitted a part: its record, accumulating the next part
 * (e.aux ops so far), and when the tracer may flush it (bpf_ktime_get_ns). */
struct ss_storm {
	struct ss_event e;        /* e.segs: the part's moves to another file */
	u64 deadline;
	u64 last_file;            /* inode address of the storm's last op */
};
BPF_HASH(storms, u32, struct ss_storm, SS_STORMS);
BPF_PERCPU_ARRAY(storm_scratch, struct ss_storm, 1);

static __always_inline int vfs_enter(u32 op, u64 fd_or_file)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!ss_wanted(id))
		return 0;
	u32 tid = (u32)id;
	int slot = tid & (SS_INFLIGHT_SLOTS - 1);
	struct ss_inflight *f = inflight.lookup(&slot);
	if (!f)
		return 0;
	if (f->tid != tid) {
		if (f->ts)
			ss_count(SS_C_INFLIGHT_COLLISION);
		f->tid = tid;
		f->agg_file = 0;          /* another thread's storm: its template stays for the sweep */
		f->agg_op = 0;
		f->agg_live = 0;
	}
	f->op = op;
	f->ts = bpf_ktime_get_ns();
	f->fd_or_file = fd_or_file;
	return 0;
}

/* whether a wait on this file is a stall rather than blocking by design */
static __always_inline int file_wanted(void *file, const int kind)
{
	void *inode = 0;
	u16 mode = 0;
	ss_read(inode, file + OFF_FILE_INODE);
	if (inode)
		ss_read(mode, inode + OFF_INODE_MODE);
	u32 fmt = mode & SS_S_IFMT;
	if (kind == K_DIR)
		return fmt == SS_S_IFDIR;
	if (kind == K_STAT)
		return 1;                 /* stat never waits on the object itself */
	if (kind == K_OPEN)
		return fmt && fmt != SS_S_IFIFO && fmt != SS_S_IFCHR && fmt != SS_S_IFSOCK;
	return fmt == SS_S_IFREG || fmt == SS_S_IFBLK;
}

/* every field but ts_ns, dur_ns, ret, key, aux and the path */
static __always_inline void vfs_fill(struct ss_event *e, u64 id, u32 op, u8 flags)
{
	ss_init(e, SS_T_VFS, op & (SS_OPF_FD - 1));
	e->flags = flags;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (u32)id;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* a plain string path (SS_F_PATH_RAW): the user's argument, or empty */
static __always_inline void fill_raw(struct ss_event *e, u64 ustr)
{
	e->flags |= SS_F_PATH_RAW;
	__builtin_memset(e->path, 0, SS_PATH_LEN);
	if (ustr) {
		int n = bpf_probe_read_user_str(e->path, SS_PATH_LEN, (void *)ustr);
		if (n >= SS_PATH_LEN)
			e->flags |= SS_F_PATH_TRUNC;
		else if (n < 0)
			e->path[0] = 0;
	}
}

static __always_inline void copy_event(struct ss_event *dst, struct ss_event *src)
{
	__builtin_memcpy(dst, src, sizeof(*dst));
}

/* The tail of this thread's storm, if any: emitted unless the tracer's sweep
 * took it first (whoever deletes the entry reports it). */
static __always_inline void storm_flush(u32 tid)
{
	struct ss_storm *s = storms.lookup(&tid);
	if (!s)
		return;
	/* copy the tail out, then delete: no ring reservation is held across the
	 * delete (the 6.1 verifier loses track of it there) */
	int zero = 0;
	struct ss_storm *c = storm_scratch.lookup(&zero);
	if (!c)
		return;
	copy_event(&c->e, &s->e);
	if (storms.delete(&tid) != 0 || !c->e.aux)
		return;                   /* the tracer's sweep took it first, or nothing to report */
	struct ss_event *e = ss_reserve();
	if (!e)
		return;
	copy_event(e, &c->e);
	ss_submit(e);
}

/* Add a counted op (floor <= dur < threshold; ident: its filesystem, file: its
 * inode's address, to count files) to its thread's storm. A live
 * storm accumulates in its template and emits its parts from there. Returns 1
 * when the slot's part reached the threshold: the caller builds that record
 * (the storm's first part; the only path walk of the storm). */
static __always_inline int storm_add(struct ss_inflight *f, u32 tid, u32 op, u64 ident,
				     u64 file, u64 ts, u64 now, u64 dur, u64 bytes)
{
	u16 fh = (u16)(file >> 6) ^ (u16)(file >> 22);
	if (f->agg_file != ident || f->agg_op != op || ts - f->agg_end > SS_MIN_NS) {
		if (f->agg_live)
			storm_flush(tid);         /* the previous storm ended: its tail */
		f->agg_file = ident;
		f->agg_op = op;
		f->agg_live = 0;
		f->agg_count = 0;
		f->agg_sum = 0;
		f->agg_bytes = 0;
	}
	f->agg_end = now;
	if (f->agg_live) {
		struct ss_storm *s = storms.lookup(&tid);
		if (s) {
			if (!s->e.aux)
				s->e.ts_ns = ts;
			s->e.aux++;
			s->e.key += dur;
			s->e.ret += bytes;
			s->e.dur_ns = now - s->e.ts_ns;
			if (file != s->last_file && s->e.segs < 0xffff)
				s->e.segs++;     /* moved to another file */
			s->last_file = file;
			s->deadline = now + SS_STORM_HOLD_NS;
			if (s->e.key >= SS_MIN_NS || s->e.aux >= SS_STORM_MAX_OPS) {
				struct ss_event *e = ss_reserve();
				if (e) {
					copy_event(e, &s->e);
					ss_submit(e);
				}
				s->e.aux = 0;
				s->e.key = 0;
				s->e.ret = 0;
				s->e.segs = 0;
			}
			return 0;
		}
		f->agg_live = 0;               /* the sweep took it: start a new part here */
	}
	if (!f->agg_count) {
		f->agg_first = ts;
		f->agg_files = 1;
	} else if (fh != f->agg_last && f->agg_files < 0xffff) {
		f->agg_files++;
	}
	f->agg_last = fh;
	f->agg_count++;
	f->agg_sum += dur;
	f->agg_bytes = f->agg_bytes + bytes < 0xffffffffULL ? f->agg_bytes + bytes : 0xffffffffU;
	return f->agg_sum >= SS_MIN_NS || f->agg_count >= SS_STORM_MAX_OPS;
}

/* A storm's identity for an op on a file: the file's filesystem (super_block);
 * *inode: the file's inode (which file: a closed file's struct file is reused at
 * once by the next open, so its address does not tell files apart) */
static __always_inline u64 fs_ident(void *file, u64 *inode)
{
	void *sb = 0;
	*inode = 0;
	ss_read(*inode, file + OFF_FILE_INODE);
	if (*inode)
		ss_read(sb, (void *)*inode + OFF_INODE_SB);
	return sb ? (u64)sb : (u64)file;
}

/* Opens of one thread on one filesystem under the threshold (a metadata-bound
 * filesystem: cold NFS lookups, each open a few ms, the reads then fast) add up
 * in their own accumulator, beside the thread's storm of reads or writes (which
 * they keep going and never end: an image folder's open, read, close). Chained
 * as storms are (same filesystem, each op at most one threshold after the last);
 * a part is emitted when its summed latency reaches the threshold, naming the
 * file of its last op (the path walk of that part) and counting its files as
 * storms do (segs: the files besides that one). The tail under the threshold is
 * not reported (only in the histograms): at most one threshold per storm. */
struct ss_open_acc { u64 ident; u64 first; u64 end; u64 sum; u32 count; u16 files; u16 last; };
BPF_TABLE("lru_hash", u32, struct ss_open_acc, open_storms, SS_STORMS);

static __always_inline void open_storm_add(u64 id, u32 op, void *file, u64 ident, u64 inode,
					   u64 ts, u64 now, u64 dur)
{
	u32 tid = (u32)id;
	u16 fh = (u16)(inode >> 6) ^ (u16)(inode >> 22);
	struct ss_open_acc *a = open_storms.lookup(&tid);
	if (!a) {
		struct ss_open_acc z = {};
		open_storms.update(&tid, &z);
		a = open_storms.lookup(&tid);
		if (!a)
			return;
	}
	if (!a->count || a->ident != ident || ts - a->end > SS_MIN_NS) {
		a->ident = ident;
		a->first = ts;
		a->sum = 0;
		a->count = 0;
		a->files = 1;
	} else if (fh != a->last && a->files < 0xffff) {
		a->files++;
	}
	a->last = fh;
	a->end = now;
	a->count++;
	a->sum += dur;
	if (a->sum < SS_MIN_NS && a->count < SS_STORM_MAX_OPS)
		return;
	int zero = 0;
	struct ss_storm *s = storm_scratch.lookup(&zero);
	if (!s)
		return;
	vfs_fill(&s->e, id, op, SS_F_AGGREGATE);
	ss_fill_file(&s->e, file);
	s->e.ts_ns = a->first;
	s->e.dur_ns = now - a->first;
	s->e.ret = 0;
	s->e.key = a->sum;
	s->e.aux = a->count;
	s->e.segs = a->files - 1;
	a->count = 0;                 /* the next op starts the next part */
	struct ss_event *e = ss_reserve();
	if (e) {
		copy_event(e, &s->e);
		ss_submit(e);
	}
}

/* An op that is not one of the storm's own (an open, a close, an op at or above the
 * threshold) on the storm's filesystem keeps it going, but only while it is still within
 * reach (the op starts at most one threshold after the storm's last op ended, as a storm
 * op must): a storm gone quiet stays ended, or the next op would join it and a part would
 * span the whole quiet time. */
static __always_inline void storm_keep(struct ss_inflight *f, u64 ident, u64 ts, u64 now)
{
	if (f->agg_file && f->agg_file == ident && ts - f->agg_end <= SS_MIN_NS)
		f->agg_end = now;
}

/* Everything past the fast path: an op at or above the threshold (one record)
 * or a counted storm op (below: dur < threshold). One path walk per program. */
static __always_inline int vfs_slow(struct ss_inflight *f, u64 id, u32 op, u64 h, u64 ts,
				    u64 now, u64 dur, long ret, int below, const int kind)
{
	if (below && kind == K_CLOSE) {
		/* as an open: a storm on its filesystem goes on after it */
		u64 ci;
		if (f->agg_file)
			storm_keep(f, fs_ident((void *)h, &ci), ts, now);
		return 0;
	}
	if (below && kind == K_STAT)
		return 0;                 /* no file at hand to chain on */
	if (below && kind == K_OPEN) {
		if (ret < 0)
			return 0;
		void *of = ss_fd_to_file(ret);
		if (!of || !file_wanted(of, K_OPEN))
			return 0;
		u64 oi;
		u64 oid = fs_ident(of, &oi);
		/* a storm of reads or writes on the opened file's filesystem goes on after it:
		 * open, read, close of many small files */
		storm_keep(f, oid, ts, now);
		open_storm_add(id, op, of, oid, oi, ts, now, dur);
		return 0;
	}
	void *file = 0;
	u64 ustr = 0;
	if (kind == K_FILE || kind == K_CLOSE) {
		file = (void *)h;
	} else if (kind == K_FD || kind == K_DIR) {
		file = ss_fd_to_file(h);
	} else if (kind == K_OPEN) {
		if (ret == -4 || (ret <= -512 && ret >= -516)) {   /* EINTR, ERESTART*: a signal */
			ss_hist_add(op, dur);
			return 0;
		}
		if (ret >= 0)
			file = ss_fd_to_file(ret);
		if (!file)
			ustr = h;
	} else if (kind == K_STAT) {
		if (op & SS_OPF_FD)
			file = ss_fd_to_file(h);
		else
			ustr = h;
	}
	if ((kind == K_FILE || kind == K_FD || kind == K_DIR || kind == K_CLOSE) && !file)
		return 0;
	/* decided before reserving so a full ring never counts a pipe or socket
	 * op as a lost stall */
	if (file && !file_wanted(file, kind)) {
		if (!below)
			ss_hist_add(op, dur);
		return 0;
	}
	if (!below && ss_shed(dur)) {   /* overload: counted and in hist, not emitted */
		ss_hist_add(op, dur);
		return 0;
	}
	u32 tid = (u32)id;
	u64 first = ts, span = dur, sum = 0, bytes = ret;
	u32 nops = 0;
	u8 flags = 0;
	/* a storm is one thread's ops on one filesystem: many small files (an image
	 * folder) add up as one file's many small reads do */
	u64 which = 0;
	u64 ident = file ? fs_ident(file, &which) : h;
	u16 nfiles = 1;
	if (!below) {
		/* reported alone, but a storm on this filesystem goes on after it (a slow
		 * open between small reads included) */
		storm_keep(f, ident, ts, now);
	} else {
		if (!storm_add(f, tid, op, ident, which, ts, now, dur, ret > 0 ? ret : 0))
			return 0;
		flags = SS_F_AGGREGATE;
		first = f->agg_first;
		span = now - first;
		sum = f->agg_sum;
		bytes = f->agg_bytes;
		nops = f->agg_count;
		nfiles = f->agg_files;
	}
	/* built in per-CPU scratch: a storm's first part is kept as its template */
	int zero = 0;
	struct ss_storm *s = storm_scratch.lookup(&zero);
	if (!s)
		return 0;
	vfs_fill(&s->e, id, op, flags);
	if (file)
		ss_fill_file(&s->e, file);
	else
		fill_raw(&s->e, ustr);
	s->e.ts_ns = first;
	s->e.dur_ns = span;
	s->e.ret = bytes;
	s->e.key = sum;
	s->e.aux = nops;
	s->e.segs = nfiles - 1;   /* files besides the one whose path the record names */
	struct ss_event *e = ss_reserve();
	if (e) {
		copy_event(e, &s->e);
		ss_submit(e);
	}
	if (below) {
		f->agg_count = 0;
		f->agg_sum = 0;
		f->agg_bytes = 0;
		s->e.aux = 0;
		s->e.key = 0;
		s->e.ret = 0;
		s->e.segs = 0;
		s->last_file = which;
		s->deadline = now + SS_STORM_HOLD_NS;
		if (storms.update(&tid, s) == 0)
			f->agg_live = 1;
		else
			ss_count(SS_C_STORM_FULL);   /* the tail of this storm will not be reported */
	}
	return 0;
}

static __always_inline int vfs_exit(long ret, const int kind)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	int slot = tid & (SS_INFLIGHT_SLOTS - 1);
	struct ss_inflight *f = inflight.lookup(&slot);
	if (!f)
		return 0;
	u64 ts = f->ts;
	if (f->tid != tid || !ts) {
		if (kind != K_WAIT && ss_wanted(id))   /* waits skip enter when they do not wait */
			ss_count(SS_C_NO_START);
		return 0;
	}
	u64 now = bpf_ktime_get_ns();
	u64 dur = now - ts;
	u32 op = f->op;
	u64 h = f->fd_or_file;
	f->ts = 0;
	int below = dur < SS_MIN_NS;
	if (below) {
		ss_hist_add(op, dur);     /* the histogram's sum is the below-threshold count */
		if (dur < SS_STORM_FLOOR_NS)
			return 0;
	}
	return vfs_slow(f, id, op, h, ts, now, dur, ret, below, kind);
}

#if defined(SS_VFS_FENTRY)

KFUNC_PROBE(vfs_read, struct file *file) { return vfs_enter(SS_OP_READ, (u64)file); }
KRETFUNC_PROBE(vfs_read, struct file *file, char *buf, size_t count, loff_t *pos, ssize_t ret)
{ return vfs_exit(ret, K_FILE); }
KFUNC_PROBE(vfs_write, struct file *file) { return vfs_enter(SS_OP_WRITE, (u64)file); }
KRETFUNC_PROBE(vfs_write, struct file *file, const char *buf, size_t count, loff_t *pos, ssize_t ret)
{ return vfs_exit(ret, K_FILE); }
/* optional targets: static in fs/read_write.c (5.10-6.12), so present only where not inlined.
 * Written out, not generated by one macro: of the two programs one macro line expanded to,
 * BCC 0.18 (Debian 11) attached only the fentry one (no fexit: no vfs_readv/vfs_writev events). */
#ifdef SS_FENTRY_vfs_readv
KFUNC_PROBE(vfs_readv, struct file *file) { return vfs_enter(SS_OP_READV, (u64)file); }
KRETFUNC_PROBE(vfs_readv, struct file *file, const void *vec, unsigned long vlen, loff_t *pos, int flags,
	       ssize_t ret)
{ return vfs_exit(ret, K_FILE); }
#endif
#ifdef SS_FENTRY_vfs_writev
KFUNC_PROBE(vfs_writev, struct file *file) { return vfs_enter(SS_OP_WRITEV, (u64)file); }
KRETFUNC_PROBE(vfs_writev, struct file *file, const void *vec, unsigned long vlen, loff_t *pos, int flags,
	       ssize_t ret)
{ return vfs_exit(ret, K_FILE); }
#endif

#elif defined(SS_VFS_KPROBE)

/* attached by tracer/families/vfs.py: kprobe/kretprobe on vfs_read, vfs_write,
 * vfs_readv, vfs_writev (where the kernel has them) */
int ss_kp_read(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_READ, (u64)file); }
int ss_kp_write(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_WRITE, (u64)file); }
int ss_kp_readv(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_READV, (u64)file); }
int ss_kp_writev(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_WRITEV, (u64)file); }
int ss_kret(struct pt_regs *ctx) { return vfs_exit(PT_REGS_RC(ctx), K_FILE); }

#else

/* exits: ss_exit_fd below */
#define SS_SYSCALL(name, OP) \
TRACEPOINT_PROBE(syscalls, sys_enter_##name) { return vfs_enter(OP, args->fd); }

SS_SYSCALL(read, SS_OP_READ)
SS_SYSCALL(write, SS_OP_WRITE)
SS_SYSCALL(pread64, SS_OP_PREAD)
SS_SYSCALL(pwrite64, SS_OP_PWRITE)
SS_SYSCALL(readv, SS_OP_READV)
SS_SYSCALL(writev, SS_OP_WRITEV)

#endif

/* -- ops no vfs_* function sees: syscall tracepoints with every method -- */

/* One exit program per kind of file argument, attached by vfs.py to every
 * sys_exit_<syscall> of that kind (their records all end in `long ret` at
 * offset 16, checked there): five programs instead of one per syscall, which
 * keeps compile time down (each inlines the path walk). */
struct ss_sys_exit {
	u64 common;
	long nr;
	long ret;
};
int ss_exit_fd(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_FD); }
int ss_exit_dir(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_DIR); }
int ss_exit_open(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_OPEN); }
int ss_exit_stat(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_STAT); }
int ss_exit_wait(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_WAIT); }
int ss_exit_close(struct ss_sys_exit *args) { return vfs_exit(args->ret, K_CLOSE); }

#define SS_AT_EMPTY_PATH 0x1000

/* glibc's fstat() is newfstatat(fd, "", AT_EMPTY_PATH): then the fd is the file */
static __always_inline int stat_enter(long dfd, const char *name, u64 flags)
{
	if (flags & SS_AT_EMPTY_PATH) {
		char c = 0;
		if (!name || (bpf_probe_read_user(&c, 1, name) == 0 && !c))
			return vfs_enter(SS_OP_STAT | SS_OPF_FD, (u64)dfd);
	}
	return vfs_enter(SS_OP_STAT, (u64)name);
}

/* fsync and fdatasync: by tracepoint with every method. The function probes missed
 * fdatasync on Debian 11's 5.10 and 12's 6.1: with datasync constant, the compiler
 * inlines vfs_fsync_range into sys_fdatasync, so the out-of-line copy a kprobe or
 * fentry attaches to never runs for it (measured with a bare kprobe in the VM). */
#ifdef SS_TP_fsync
TRACEPOINT_PROBE(syscalls, sys_enter_fsync) { return vfs_enter(SS_OP_FSYNC, args->fd); }
#endif
#ifdef SS_TP_fdatasync
TRACEPOINT_PROBE(syscalls, sys_enter_fdatasync) { return vfs_enter(SS_OP_FDATASYNC, args->fd); }
#endif
/* close(): where NFS writes back a file's dirty pages (close-to-open consistency) and
 * FUSE sends FLUSH (gcsfuse, s3fs and blobfuse upload the file then): a checkpoint
 * written to the page cache spends its time here. The file is taken at entry (its
 * fd is gone at exit; the struct file lives on until the deferred fput, which runs
 * after the exit tracepoint, on the way back to user space). Costs every close()
 * an fd -> file walk. */
#ifdef SS_TP_close
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	if (!ss_wanted(bpf_get_current_pid_tgid()))
		return 0;
	void *file = ss_fd_to_file(args->fd);
	return file ? vfs_enter(SS_OP_CLOSE, (u64)file) : 0;
}
#endif
#ifdef SS_TP_sendfile64
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return vfs_enter(SS_OP_SENDFILE, args->in_fd); }
#endif
#ifdef SS_TP_splice
TRACEPOINT_PROBE(syscalls, sys_enter_splice) { return vfs_enter(SS_OP_SPLICE, args->fd_in); }
#endif
#ifdef SS_TP_copy_file_range
TRACEPOINT_PROBE(syscalls, sys_enter_copy_file_range)
{ return vfs_enter(SS_OP_COPY_FILE_RANGE, args->fd_in); }
#endif
#ifdef SS_TP_openat
TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return vfs_enter(SS_OP_OPENAT, (u64)args->filename); }
#endif
#ifdef SS_TP_openat2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2) { return vfs_enter(SS_OP_OPENAT, (u64)args->filename); }
#endif
#ifdef SS_TP_statx
TRACEPOINT_PROBE(syscalls, sys_enter_statx)
{ return stat_enter((int)args->dfd, args->filename, args->flags); }
#endif
#ifdef SS_TP_newfstatat
TRACEPOINT_PROBE(syscalls, sys_enter_newfstatat)
{ return stat_enter((int)args->dfd, args->filename, args->flag); }
#endif
#ifdef SS_TP_getdents64
TRACEPOINT_PROBE(syscalls, sys_enter_getdents64) { return vfs_enter(SS_OP_GETDENTS, args->fd); }
#endif
#ifdef SS_TP_io_uring_enter
#define SS_IORING_ENTER_GETEVENTS 1
TRACEPOINT_PROBE(syscalls, sys_enter_io_uring_enter)
{
	if (!(args->flags & SS_IORING_ENTER_GETEVENTS) || !args->min_complete)
		return 0;                 /* submits or polls only: no wait */
	return vfs_enter(SS_OP_IO_URING_ENTER, args->fd);
}
#endif
#ifdef SS_TP_io_getevents
TRACEPOINT_PROBE(syscalls, sys_enter_io_getevents)
{
	if ((long)args->min_nr <= 0)
		return 0;
	return vfs_enter(SS_OP_IO_GETEVENTS, args->ctx_id);
}
#endif
#ifdef SS_TP_io_pgetevents
TRACEPOINT_PROBE(syscalls, sys_enter_io_pgetevents)
{
	if ((long)args->min_nr <= 0)
		return 0;
	return vfs_enter(SS_OP_IO_GETEVENTS, args->ctx_id);
}
#endif
