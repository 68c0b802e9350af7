/* vfs.bpf.c: latency of read/write/fsync-family calls on files.
 *
 * Attach methods (chosen by tracer/probes.py, best first):
 *   SS_VFS_FENTRY      fentry/fexit on vfs_read, vfs_write, vfs_readv,
 *                      vfs_writev, vfs_fsync_range (BTF trampolines, cheapest)
 *   SS_VFS_KPROBE      kprobe/kretprobe on the same functions
 *   (neither)          syscall tracepoints: sys_enter/exit_{read,write,pread64,
 *                      pwrite64,readv,writev,fsync,fdatasync}
 * Function probes see the struct file directly and also catch kernel-internal
 * callers of vfs_read/vfs_write; tracepoints see the fd and resolve the file
 * through task->files only for ops above the threshold.
 *
 * Cost below the threshold: one array slot write on entry, one lookup, one
 * histogram increment on exit. Above it: the path walk (<= 16 dentries) and a
 * 256-byte ring record. Stall events are emitted only for regular files and
 * block devices: pipes, sockets, ttys and /dev/fuse block by design (a FUSE
 * daemon's own reads would otherwise look like stalls).
 * Not covered: io_uring, mmap page faults, splice/sendfile, copy_file_range,
 * aio (see README).
 */
#include "common.bpf.h"

struct ss_inflight {
	u32 tid;
	u32 op;
	u64 ts;
	u64 fd_or_file;   /* fd (tracepoints) or struct file * (function probes) */
};
/* indexed by tid % SS_INFLIGHT_SLOTS: an array lookup inlines to a few
 * instructions, a hash update/delete pair costs several times more */
BPF_ARRAY(inflight, struct ss_inflight, SS_INFLIGHT_SLOTS);

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
	if (f->tid && f->tid != tid)
		ss_count(SS_C_INFLIGHT_COLLISION);
	f->tid = tid;
	f->op = op;
	f->ts = bpf_ktime_get_ns();
	f->fd_or_file = fd_or_file;
	return 0;
}

static __always_inline void *fd_to_file(u64 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	void *files = 0, *fdt = 0, **fdarr = 0, *file = 0;
	unsigned int max_fds = 0;
	ss_read(files, (void *)task + OFF_TASK_FILES);
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

static __always_inline int vfs_exit(long ret, int is_file)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	int slot = tid & (SS_INFLIGHT_SLOTS - 1);
	struct ss_inflight *f = inflight.lookup(&slot);
	if (!f)
		return 0;
	if (f->tid != tid) {
		if (ss_wanted(id))
			ss_count(SS_C_NO_START);
		return 0;
	}
	u64 now = bpf_ktime_get_ns();
	u64 dur = now - f->ts;
	u32 op = f->op;
	u64 ts = f->ts;
	u64 h = f->fd_or_file;
	f->tid = 0;
	if (dur < SS_MIN_NS) {
		ss_hist_add(op, dur);     /* the histogram's sum is the below-threshold count */
		return 0;
	}
	void *file = is_file ? (void *)h : fd_to_file(h);
	if (!file)
		return 0;
	/* only regular files and block devices, decided before reserving so a full
	 * ring never counts a pipe or socket op as a lost stall */
	void *inode = 0;
	u16 mode = 0;
	ss_read(inode, file + OFF_FILE_INODE);
	if (inode)
		ss_read(mode, inode + OFF_INODE_MODE);
	u32 fmt = mode & 0170000;
	if (fmt != 0100000 && fmt != 0060000) {   /* S_IFREG, S_IFBLK */
		ss_hist_add(op, dur);
		return 0;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return 0;
	e->flags = 0;
	ss_fill_file(e, file);
	e->ts_ns = ts;
	e->dur_ns = dur;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ret = ret;
	e->key = 0;
	e->pid = id >> 32;
	e->tid = tid;
	e->type = SS_T_VFS;
	e->op = op;
	e->state = 0;
	e->sport = e->dport = e->family = e->segs = 0;
	e->aux = 0;
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	ss_submit(e);
	return 0;
}

#if defined(SS_VFS_FENTRY)

KFUNC_PROBE(vfs_read, struct file *file) { return vfs_enter(SS_OP_READ, (u64)file); }
KRETFUNC_PROBE(vfs_read, struct file *file, char *buf, size_t count, loff_t *pos, ssize_t ret)
{ return vfs_exit(ret, 1); }
KFUNC_PROBE(vfs_write, struct file *file) { return vfs_enter(SS_OP_WRITE, (u64)file); }
KRETFUNC_PROBE(vfs_write, struct file *file, const char *buf, size_t count, loff_t *pos, ssize_t ret)
{ return vfs_exit(ret, 1); }
KFUNC_PROBE(vfs_fsync_range, struct file *file, loff_t start, loff_t end, int datasync)
{ return vfs_enter(datasync ? SS_OP_FDATASYNC : SS_OP_FSYNC, (u64)file); }
KRETFUNC_PROBE(vfs_fsync_range, struct file *file, loff_t start, loff_t end, int datasync, int ret)
{ return vfs_exit(ret, 1); }

#elif defined(SS_VFS_KPROBE)

/* attached by tracer/probes.py: kprobe/kretprobe on vfs_read, vfs_write,
 * vfs_readv, vfs_writev (where the kernel has them) and vfs_fsync_range */
int ss_kp_read(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_READ, (u64)file); }
int ss_kp_write(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_WRITE, (u64)file); }
int ss_kp_readv(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_READV, (u64)file); }
int ss_kp_writev(struct pt_regs *ctx, void *file) { return vfs_enter(SS_OP_WRITEV, (u64)file); }
int ss_kp_fsync(struct pt_regs *ctx, void *file, long long start, long long end, int datasync)
{ return vfs_enter(datasync ? SS_OP_FDATASYNC : SS_OP_FSYNC, (u64)file); }
int ss_kret(struct pt_regs *ctx) { return vfs_exit(PT_REGS_RC(ctx), 1); }

#else

#define SS_SYSCALL(name, OP)                                                   \
TRACEPOINT_PROBE(syscalls, sys_enter_##name) { return vfs_enter(OP, args->fd); } \
TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return vfs_exit(args->ret, 0); }

SS_SYSCALL(read, SS_OP_READ)
SS_SYSCALL(write, SS_OP_WRITE)
SS_SYSCALL(pread64, SS_OP_PREAD)
SS_SYSCALL(pwrite64, SS_OP_PWRITE)
SS_SYSCALL(readv, SS_OP_READV)
SS_SYSCALL(writev, SS_OP_WRITEV)
SS_SYSCALL(fsync, SS_OP_FSYNC)
SS_SYSCALL(fdatasync, SS_OP_FDATASYNC)

#endif
