/* nfs.bpf.c: NFS client stalls, per file operation and per RPC.
 *
 * Two parts, attached by tracer/probes_nfs.py:
 *
 *   file ops (SS_T_NFS; only with -DSS_NFS_KPROBE)
 *     kprobe/kretprobe on the NFS client's file operations, in the caller's
 *     context, so the stall carries the process that waited and the file:
 *       nfs_file_read / nfs_file_write   read_iter/write_iter (buffered, O_DIRECT)
 *       nfs_file_fsync                   fsync/fdatasync: flush dirty pages + COMMIT
 *       nfs_file_open / nfs4_file_open   open (v4: the OPEN RPC; v3 revalidates
 *                                        during lookup, before nfs_file_open)
 *       nfs_getattr                      stat: GETATTR when the attribute cache is stale
 *     The server is inode->i_sb->s_fs_info (struct nfs_server) ->nfs_client->cl_addr.
 *     Fixed tracepoints do not serve here: nfs:nfs_getattr_enter/exit and
 *     nfs_fsync_enter/exit carry no file path, and reads/writes have none at all
 *     in the caller's context (nfs_initiate_read fires per RPC, often in rpciod).
 *
 *   RPCs (SS_T_NFS_RPC; always)
 *     raw tracepoint sunrpc:rpc_stats_latency (const struct rpc_task *, backlog,
 *     rtt, execute): every RPC that had a request slot, when it is released;
 *     execute is its whole life. The record carries the owner (task->tk_owner,
 *     the tgid that issued it: the reader, also for reads rpciod completes),
 *     the xid, the server address and port (rq_xprt->addr), and the program,
 *     version and procedure (path = "PROC\0prog\0", version in state).
 *     raw tracepoint sunrpc:xprt_retransmit counts retransmissions per task,
 *     at the same place the kernel counts them for /proc/net/rpc/<prog>; the
 *     count rides in aux, and an RPC that was retransmitted is always reported.
 *     Every sunrpc client shows up (NFS, NFSv4 callbacks, NLM, rpcbind).
 *
 * Struct offsets (OFF_*) come from vmlinux and module BTF (tracer/btf_modules.py).
 * Cost: one hash update per op entry and one lookup/delete per exit (NFS ops
 * take tens of microseconds at least); one record per op above the threshold.
 * With --cgroup, an RPC is reported only when it completes in its owner's
 * context (async reads complete in rpciod); its file op is still reported.
 */
#include "common.bpf.h"

#define NFS_SUPER_MAGIC 0x6969

/* the address family/port/address of a struct sockaddr_storage into the record */
static __always_inline void nfs_fill_addr(struct ss_event *e, void *sa)
{
	u16 family = 0, port = 0;
	__builtin_memset(e->daddr, 0, 16);
	e->family = 0;
	e->dport = 0;
	if (!sa)
		return;
	ss_read(family, sa);
	ss_read(port, sa + 2);
	if (family == 2) {              /* AF_INET: sin_addr at 4 */
		bpf_probe_read_kernel(e->daddr, 4, sa + 4);
	} else if (family == 10) {      /* AF_INET6: sin6_addr at 8 */
		bpf_probe_read_kernel(e->daddr, 16, sa + 8);
	} else {
		return;
	}
	e->family = family;
	e->dport = __builtin_bswap16(port);
}

static __always_inline void nfs_clear(struct ss_event *e)
{
	e->cgroup_id = 0;
	e->ino = 0;
	e->key = 0;
	e->dev = 0;
	e->fs_magic = NFS_SUPER_MAGIC;
	e->state = 0;
	e->flags = 0;
	e->sport = 0;
	e->segs = 0;
	e->aux = 0;
	__builtin_memset(e->saddr, 0, 16);
}

#ifdef SS_NFS_KPROBE

struct nfs_inflight {
	u64 ts;
	u64 obj;      /* struct file * (read/write/fsync/open) or const struct path * (getattr) */
};
/* key: tid << 8 | op, so an fsync nested in an O_SYNC write keeps both */
BPF_HASH(nfs_inflight, u64, struct nfs_inflight, 16384);

/* getattr has a struct path, not a file: ss_fill_file() reads a file's f_path and
 * f_inode, so a stand-in with those three members at their offsets is built here */
#define NFS_FAKE_FILE_LEN 1024
struct nfs_fake_file { char b[NFS_FAKE_FILE_LEN]; };
BPF_PERCPU_ARRAY(nfs_fake_file, struct nfs_fake_file, 1);

static __always_inline int nfs_enter(u32 op, void *obj)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!ss_wanted(id))
		return 0;
	u64 key = ((id & 0xffffffff) << 8) | op;
	struct nfs_inflight f = { .ts = bpf_ktime_get_ns(), .obj = (u64)obj };
	nfs_inflight.update(&key, &f);
	return 0;
}

static __always_inline int nfs_exit(struct pt_regs *ctx, u32 op)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 key = ((id & 0xffffffff) << 8) | op;
	struct nfs_inflight *f = nfs_inflight.lookup(&key);
	if (!f) {
		if (ss_wanted(id))
			ss_count(SS_C_NO_START);
		return 0;
	}
	u64 ts = f->ts, obj = f->obj;
	nfs_inflight.delete(&key);
	u64 dur = bpf_ktime_get_ns() - ts;
	if (ss_below(dur)) {
		ss_hist_add(op, dur);
		ss_count(SS_C_BELOW);
		return 0;
	}
	void *file = (void *)obj;
	if (op == SS_OP_NFS_GETATTR) {
		int zero = 0;
		struct nfs_fake_file *ff = nfs_fake_file.lookup(&zero);
		if (!ff)
			return 0;
		void *dentry = 0, *mnt = 0, *inode = 0;
		ss_read(dentry, (void *)obj + OFF_PATH_DENTRY);
		ss_read(mnt, (void *)obj + OFF_PATH_MNT);
		if (dentry)
			ss_read(inode, dentry + OFF_DENTRY_INODE);
		*(void **)&ff->b[OFF_FILE_PATH_DENTRY] = dentry;
		*(void **)&ff->b[OFF_FILE_PATH_MNT] = mnt;
		*(void **)&ff->b[OFF_FILE_INODE] = inode;
		file = ff;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return 0;
	nfs_clear(e);
	e->path[0] = 0;           /* stays empty if the file cannot be read */
	ss_fill_file(e, file);
	/* the server this inode lives on */
	void *inode = 0, *sb = 0, *server = 0, *clp = 0;
	ss_read(inode, file + OFF_FILE_INODE);
	if (inode)
		ss_read(sb, inode + OFF_INODE_SB);
	if (sb)
		ss_read(server, sb + OFF_SB_FS_INFO);
	if (server)
		ss_read(clp, server + OFF_NFS_SERVER_CLIENT);
	nfs_fill_addr(e, clp ? clp + OFF_NFS_CLIENT_ADDR : 0);
	e->ts_ns = ts;
	e->dur_ns = dur;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ret = PT_REGS_RC(ctx);
	e->pid = id >> 32;
	e->tid = (u32)id;
	e->type = SS_T_NFS;
	e->op = op;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	ss_submit(e);
	return 0;
}

/* read_iter/write_iter take a struct kiocb: its ki_filp is the file */
static __always_inline void *kiocb_file(void *iocb)
{
	void *file = 0;
	ss_read(file, iocb + OFF_KIOCB_FILP);
	return file;
}

int ss_nfs_read(struct pt_regs *ctx, void *iocb) { return nfs_enter(SS_OP_NFS_READ, kiocb_file(iocb)); }
int ss_nfs_write(struct pt_regs *ctx, void *iocb) { return nfs_enter(SS_OP_NFS_WRITE, kiocb_file(iocb)); }
int ss_nfs_fsync(struct pt_regs *ctx, void *file) { return nfs_enter(SS_OP_NFS_FSYNC, file); }
int ss_nfs_open(struct pt_regs *ctx, void *inode, void *file) { return nfs_enter(SS_OP_NFS_OPEN, file); }
/* the position of nfs_getattr's `path` parameter differs across kernels
 * (5.12 added mnt_userns first, 6.3 renamed it idmap): NFS_GETATTR_PATH_ARG from BTF */
int ss_nfs_getattr(struct pt_regs *ctx)
{
#if NFS_GETATTR_PATH_ARG == 0
	void *path = (void *)PT_REGS_PARM1(ctx);
#else
	void *path = (void *)PT_REGS_PARM2(ctx);
#endif
	return nfs_enter(SS_OP_NFS_GETATTR, path);
}
int ss_nfs_read_ret(struct pt_regs *ctx) { return nfs_exit(ctx, SS_OP_NFS_READ); }
int ss_nfs_write_ret(struct pt_regs *ctx) { return nfs_exit(ctx, SS_OP_NFS_WRITE); }
int ss_nfs_fsync_ret(struct pt_regs *ctx) { return nfs_exit(ctx, SS_OP_NFS_FSYNC); }
int ss_nfs_open_ret(struct pt_regs *ctx) { return nfs_exit(ctx, SS_OP_NFS_OPEN); }
int ss_nfs_getattr_ret(struct pt_regs *ctx) { return nfs_exit(ctx, SS_OP_NFS_GETATTR); }

#endif /* SS_NFS_KPROBE */

/* ------------------------------------------------------------------ RPCs */

/* rpc_task * -> retransmissions so far; lru: a task that is never released
 * with stats (killed before it had a request) must not pin an entry */
BPF_TABLE("lru_hash", u64, u32, rpc_retrans, 16384);

RAW_TRACEPOINT_PROBE(xprt_retransmit)
{
	void *rqst = (void *)ctx->args[0];
	void *task = 0;
	ss_read(task, rqst + OFF_RQST_TASK);
	if (!task)
		return 0;
	u64 k = (u64)task;
	u32 one = 1;
	u32 *n = rpc_retrans.lookup(&k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		rpc_retrans.update(&k, &one);
	return 0;
}

RAW_TRACEPOINT_PROBE(rpc_stats_latency)
{
	void *task = (void *)ctx->args[0];
	s64 execute = (s64)ctx->args[3];
	if (!task || execute < 0)
		return 0;
	u64 k = (u64)task;
	u32 retrans = 0;
	u32 *n = rpc_retrans.lookup(&k);
	if (n) {
		retrans = *n;
		rpc_retrans.delete(&k);
	}
	u32 owner = 0;
	ss_read(owner, task + OFF_TASK_OWNER);
	u64 id = bpf_get_current_pid_tgid();
	int in_owner = (id >> 32) == owner;
#if SS_FILTER_PID
	if (owner != SS_FILTER_PID)
		return 0;
#endif
#if SS_FILTER_CGROUP
	if (!in_owner || bpf_get_current_cgroup_id() != SS_FILTER_CGROUP)
		return 0;
#endif
	if (!retrans && ss_below((u64)execute)) {
		ss_hist_add(SS_OP_NFS_RPC, execute);
		ss_count(SS_C_BELOW);
		return 0;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return 0;
	nfs_clear(e);
	void *rqst = 0, *xprt = 0, *clnt = 0, *proc = 0, *prog = 0;
	const char *pname = 0, *progname = 0;
	u32 xid = 0, vers = 0;
	int status = 0, reply = 0;
	ss_read(rqst, task + OFF_TASK_RQSTP);
	ss_read(clnt, task + OFF_TASK_CLIENT);
	ss_read(proc, task + OFF_TASK_PROC);
	ss_read(status, task + OFF_TASK_STATUS);
	if (rqst) {
		ss_read(xid, rqst + OFF_RQST_XID);
		ss_read(xprt, rqst + OFF_RQST_XPRT);
		ss_read(reply, rqst + OFF_RQST_REPLY_BYTES);
	}
	nfs_fill_addr(e, xprt ? xprt + OFF_XPRT_ADDR : 0);
	if (clnt) {
		ss_read(prog, clnt + OFF_CLNT_PROGRAM);
		ss_read(vers, clnt + OFF_CLNT_VERS);
	}
	if (prog)
		ss_read(progname, prog + OFF_PROGRAM_NAME);
	if (proc)
		ss_read(pname, proc + OFF_PROCINFO_NAME);
	/* path: procedure, then program, NUL separated (decoded by tracer/decode.py) */
	__builtin_memset(e->path, 0, sizeof(e->path));
	int len = 0;
	if (pname)
		len = bpf_probe_read_kernel_str(e->path, 48, pname);
	if (len <= 0)
		len = 1;
	if (progname)
		bpf_probe_read_kernel_str(&e->path[len & 63], 48, progname);
	u64 now = bpf_ktime_get_ns();
	e->ts_ns = now - execute;
	e->dur_ns = execute;
	e->ret = status < 0 ? status : reply;
	e->key = __builtin_bswap32(xid);
	e->aux = retrans;
	e->state = vers;
	e->pid = owner;
	e->tid = in_owner ? (u32)id : 0;
	e->type = SS_T_NFS_RPC;
	e->op = SS_OP_NFS_RPC;
	if (in_owner) {
		e->cgroup_id = bpf_get_current_cgroup_id();
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	} else {
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	ss_submit(e);
	return 0;
}
