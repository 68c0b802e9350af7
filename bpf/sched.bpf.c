/* sched.bpf.c: process lineage, GPU owners, and the off-CPU time of owner threads.
 *
 * Hooks (raw tracepoints: arguments are the kernel's own pointers, no trace
 * buffer is filled):
 *   sched_process_fork   new process (not a thread): SS_T_PROC FORK, pid = child
 *                        tgid, key = parent tgid; a child of an owner becomes an owner
 *   sched_process_exec   SS_T_PROC EXEC with the new comm
 *   sched_process_exit   per thread: its open off-CPU groups are emitted and its state
 *                        dropped; the last thread of a process (signal->live == 0):
 *                        SS_T_PROC EXIT and the tgid leaves the owners. The EXIT record
 *                        carries the process's wait(2) status in ret (task->exit_code,
 *                        which do_exit sets before this tracepoint; in a group exit,
 *                        exit_group() or a fatal signal, every thread exits with the
 *                        group's code: signal in bits 0-6, 0x80 core dumped, exit code
 *                        in bits 8-15; -1 when unreadable) and state = 1 when the
 *                        process was an owner
 *   sched_switch         owner threads only: a spell off the CPU starts at switch-out
 *                        (runnable: preempted; D state; S state in a wait that is a
 *                        stall) and ends at switch-in. While an owner thread waits for
 *                        a CPU it was preempted on, every switch on that CPU notes who
 *                        held it longest in one stretch: "who ran instead" (the task
 *                        switched in at the preemption is often a short wakeup)
 *   sched_wakeup         owner threads only: splits a sleep into the wait itself and the
 *                        wait for a CPU after the wakeup (runq)
 *   page_fault_user      (x86, SS_SCHED_FAULTS) owner threads: the faulting address; a
 *                        thread that then blocks outside a syscall (pt_regs.orig_ax == -1:
 *                        the kernel entry was an exception) is blocked in that fault
 * "Owners" (map owners, tgid -> 1) are filled by the agent from NVML's processes on
 * the GPUs and extended here at fork, so a worker forked and gone between two agent
 * polls is covered.
 *
 * Spells of one thread are merged into a group per kind (blocked, runq, page fault)
 * while they follow each other within SS_SCHED_GAP_NS and the group stays at least a
 * quarter off-CPU; a closed group whose summed off-CPU time reaches SS_MIN_NS becomes
 * one SS_T_SCHED record (ts/dur: first spell start to last spell end, ret: summed ns,
 * see stallscope.h for the other fields), a shorter one only feeds the histogram.
 * A group closes when the thread's next spell starts too late, when the thread exits,
 * or when user space runs ss_flush (BPF_PROG_TEST_RUN) for a thread quiet for
 * longer than the gap (it looks only while the counter "ripe" of groups that will
 * emit is non-zero).
 *
 * S-state (interruptible) sleeps are mostly voluntary (futex, poll, pipe and socket
 * reads), but FUSE waits for its daemon in S state too. Sleeps in syscalls that only
 * wait (futex, poll, epoll, nanosleep, wait4, accept, recv*, ioctl: x86-64 numbers),
 * and in read/write-family syscalls on a pipe, socket or character device (the fd's
 * inode type, through task->files), are voluntary without further work; other S sleeps
 * take their kernel stack id and look it up in sclass, which user space fills once per
 * stack (voluntary or stall).
 * An S sleep whose stack is not classified yet is emitted on its own
 * (state SS_SCHED_S_UNKNOWN) when it lasts SS_SCHED_FLOOR_NS, for user space to
 * classify; only a voluntary sleep's wait for a CPU after its wakeup is counted.
 *
 * Cost: a context switch between non-owners does one hash lookup (is next an owner?,
 * by tgid) plus one array slot of its CPU (prev's answer was cached there when it was
 * switched in; a timestamp only while an owner waits for that CPU); a wakeup does one
 * hash lookup (is the woken thread an owner with a spell in progress?); a user page
 * fault of a non-owner reads that array slot only. Owner threads add a kernel stack
 * walk (<= SS_STACK_DEPTH frames) per blocking switch-out that is not in a wait-only
 * syscall. Measured by bench/tracer_bench.py (sched_cost).
 *
 * Caveats: the blocked time of a spell ends at the wakeup, the wait for a CPU after it
 * is runq time; a spell in progress when the tracer stops is emitted up to that moment
 * (ss_flush force); stack ids are never freed, so once SS_STACKS distinct stacks
 * collide the reason reads "[stack lost]"; the fault address of a merged group is the
 * one of its longest spell; a fault taken inside a syscall (copy_to_user into a mapped
 * file) is a kernel-mode fault: not hooked, the syscall's own record explains it.
 */
#include "common.bpf.h"

#ifndef SS_SCHED_GAP_NS
#define SS_SCHED_GAP_NS 10000000ULL     /* spells further apart are separate groups */
#endif
#ifndef SS_SCHED_FLOOR_NS
#define SS_SCHED_FLOOR_NS 1000000ULL    /* shortest unclassified S sleep sent for classification */
#endif
#define SS_STACKS 16384
#define SS_STACK_DEPTH 24
#define SS_MAX_OWNERS 16384
#define SS_MAX_THREADS 16384

/* task states (include/linux/sched.h; stable since 4.14) */
#define SS_TS_INTERRUPTIBLE 0x0001
#define SS_TS_UNINTERRUPTIBLE 0x0002
#define SS_TS_DEAD 0x0080
#define SS_TS_NOLOAD 0x0400
#define SS_PF_EXITING 0x0004   /* task_struct.flags: set before the exit tracepoint */

/* what a thread is doing off the CPU (struct ss_thread.kind) */
#define SP_NONE 0
#define SP_RUNQ 1       /* preempted while runnable */
#define SP_BLOCKED 2    /* D state, or S in a wait classified as a stall */
#define SP_FAULT 3      /* blocked inside a user page fault */
#define SP_QUIET 4      /* a voluntary sleep: only the wait for a CPU after it counts */
#define SP_UNKNOWN 5    /* S state in a stack user space has not classified yet */

/* ss_event.state of SCHED records */
#define SS_SCHED_D 1
#define SS_SCHED_S 2
#define SS_SCHED_S_UNKNOWN 3
#define SS_SCHED_PREEMPTED 4
#define SS_SCHED_WAKEUP 5

/* sclass values, written by user space */
#define SS_CLASS_VOLUNTARY 1
#define SS_CLASS_STALL 2

#define G_BLOCKED 0
#define G_RUNQ 1
#define G_FAULT 2

struct ss_grp {
	u64 first;        /* start of the first spell */
	u64 last;         /* end of the last spell */
	u64 sum;          /* off-CPU ns */
	u64 best;         /* the longest spell */
	u64 key;          /* blocked: stack id of the longest spell; fault: its address */
	u64 vote;         /* runq: weight of the leading candidate (below) */
	u32 count;
	u32 other;        /* runq: tgid that ran instead for most of the time (majority vote) */
	u32 state;        /* SS_SCHED_* of the longest spell */
	u32 pad;
	char other_comm[SS_COMM_LEN];
};

struct ss_thread {
	u64 start;        /* current spell: switch-out time */
	u64 wake;         /* ... its wakeup (0: none yet) */
	u64 fault_addr;   /* last user page fault */
	u64 cgroup;
	s64 stackid;
	u32 kind;         /* SP_* */
	u32 tgid;
	u32 other;        /* runq: who was switched in */
	u32 state;        /* SS_SCHED_* of the current spell */
	u32 wait_cpu;     /* runq: the CPU it was preempted on */
	u32 pad;
	char other_comm[SS_COMM_LEN];
	char comm[SS_COMM_LEN];
	struct ss_grp g[3];
};

/* "is this task an owner thread?", remembered per CPU by task pointer: a direct-mapped
 * cache, valid while the owners set keeps the generation it was filled in */
#define SS_OCACHE 256
struct ss_oc {
	u64 task;
	u32 gen;
	u32 owner;
};

/* one per CPU: the watch (first 64 bytes, written only while an owner waits for this
 * CPU) and the owner cache */
struct ss_cpu {
	u32 waiting;      /* owner threads preempted here and not running again yet */
	u32 best_tgid;    /* while any waits: who held this CPU longest in one stretch */
	u64 since;        /* while any waits: when current got this CPU */
	u64 best_len;
	char best_comm[SS_COMM_LEN];
	u64 pad[3];
	struct ss_oc oc[SS_OCACHE];
};

/* generation of the owners set: kernel changes (fork, exit) + user space changes */
struct ss_gen {
	u32 kernel;
	u32 user;
};

struct ss_kstack { u64 ip[SS_STACK_DEPTH]; };

BPF_HASH(owners, u32, u32, SS_MAX_OWNERS);
BPF_HASH(threads, u32, struct ss_thread, SS_MAX_THREADS);
BPF_HASH(sclass, s32, u8, SS_STACKS);
BPF_ARRAY(cpus, struct ss_cpu, SS_NCPUS);
BPF_ARRAY(ogen, struct ss_gen, 1);
/* [0] open groups whose sum reached SS_MIN_NS, [1] threads blocked in a page fault now:
 * user space looks at the threads only while one is non-zero */
BPF_ARRAY(ripe, s64, 2);
BPF_PERCPU_ARRAY(zero_thread, struct ss_thread, 1);   /* never written: the insert template */
BPF_TABLE("stacktrace", int, struct ss_kstack, stacks, SS_STACKS);

static __always_inline int sched_wanted(struct ss_thread *th)
{
#if SS_FILTER_PID
	if (th->tgid != SS_FILTER_PID)
		return 0;
#endif
#if SS_FILTER_CGROUP
	if (th->cgroup != SS_FILTER_CGROUP)
		return 0;
#endif
	return 1;
}

static __always_inline void fill_common(struct ss_event *e, u32 type, u32 op)
{
	ss_init(e, type, op);
	e->path[0] = 0;
}

/* ---------------------------------------------------------------- records */

/* The name of the process ``task`` belongs to (its thread group leader's comm). "Who ran
 * instead" is a process (a tgid), so it is named by the process: a thread's own name (a
 * helper thread still called "python" in a process that renamed its main thread) would
 * pair one process's pid with another thread's name. */
static __always_inline void proc_comm(void *task, char *dst)
{
	void *leader = 0;
	ss_read(leader, task + OFF_TASK_GROUP_LEADER);
	bpf_probe_read_kernel_str(dst, SS_COMM_LEN, (leader ? leader : task) + OFF_TASK_COMM);
}

static __always_inline void emit_sched(struct ss_thread *th, u32 tid, u32 op, u64 first,
				       u64 last, u64 sum, u32 count, u64 key, u32 state,
				       u32 other, char *other_comm)
{
	if (!sched_wanted(th))
		return;
	struct ss_event *e = ss_reserve();
	if (!e)
		return;
	fill_common(e, SS_T_SCHED, op);
	e->ts_ns = first;
	e->dur_ns = last - first;
	e->cgroup_id = th->cgroup;
	e->ret = sum;
	e->key = key;
	e->pid = th->tgid;
	e->tid = tid;
	e->state = state;
	if (op == SS_OP_RUNQ) {
		e->aux = other;
		e->dev = count;
		bpf_probe_read_kernel(e->path, SS_COMM_LEN, other_comm);
		e->path[SS_COMM_LEN] = 0;
	} else {
		e->aux = count;
	}
	bpf_probe_read_kernel(e->comm, SS_COMM_LEN, th->comm);
	ss_submit(e);
}

/* ret and state: EXIT only (the wait(2) status, was an owner); 0 for FORK and EXEC */
static __always_inline void emit_proc(u32 op, u32 tgid, u32 tid, u32 ppid, void *comm_src, int from_task,
				      s64 status, u8 owner)
{
	struct ss_event *e = ss_reserve();
	if (!e)
		return;
	fill_common(e, SS_T_PROC, op);
	e->ts_ns = bpf_ktime_get_ns();
	e->dur_ns = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->key = ppid;
	e->ret = status;
	e->state = owner;
	e->pid = tgid;
	e->tid = tid;
	if (from_task)
		bpf_probe_read_kernel_str(e->comm, SS_COMM_LEN, comm_src);
	else
		bpf_get_current_comm(e->comm, SS_COMM_LEN);
	ss_submit(e);
}

/* ---------------------------------------------------------------- groups */

static __always_inline void ripe_add_at(int i, s64 d)
{
	s64 *r = ripe.lookup(&i);
	if (r)
		__sync_fetch_and_add(r, d);
}
#define ripe_add(d) ripe_add_at(0, d)
#define faulting_add(d) ripe_add_at(1, d)

static __always_inline void grp_close(struct ss_thread *th, u32 tid, struct ss_grp *g, u32 op)
{
	if (!g->count)
		return;
	if (g->sum >= SS_MIN_NS) {
		emit_sched(th, tid, op, g->first, g->last, g->sum, g->count, g->key, g->state,
			   g->other, g->other_comm);
		ripe_add(-1);
	} else {
		ss_hist_add(op, g->sum);
		ss_count(SS_C_BELOW);
	}
	g->count = 0;
	g->sum = 0;
}

static __always_inline void grp_add(struct ss_thread *th, u32 tid, struct ss_grp *g, u32 op,
				    u64 s, u64 e, u64 key, u32 state, u32 other, char *other_comm)
{
	if (e <= s)
		return;
	u64 len = e - s;
	/* too far from the last spell, or the group would be mostly on-CPU: a new group */
	if (g->count && (s > g->last + SS_SCHED_GAP_NS || (g->sum + len) * 4 < e - g->first))
		grp_close(th, tid, g, op);
	if (!g->count) {
		g->first = s;
		g->best = 0;
		g->vote = 0;
	}
	g->last = e;
	if (g->sum < SS_MIN_NS && g->sum + len >= SS_MIN_NS)
		ripe_add(1);
	g->sum += len;
	g->count++;
	if (len >= g->best) {
		g->best = len;
		g->key = key;
		g->state = state;
	}
	if (op != SS_OP_RUNQ)
		return;
	/* who ran instead: Boyer-Moore majority vote weighted by time, so the task that
	 * held the CPU for most of the wait wins whenever one held it for over half */
	if (other == g->other) {
		g->vote += len;
	} else if (g->vote <= len) {
		g->vote = len - g->vote;
		g->other = other;
		bpf_probe_read_kernel(g->other_comm, SS_COMM_LEN, other_comm);
	} else {
		g->vote -= len;
	}
}

static __always_inline void close_if_stale(struct ss_thread *th, u32 tid, struct ss_grp *g,
					   u32 op, u64 t)
{
	if (g->count && t > g->last + SS_SCHED_GAP_NS)
		grp_close(th, tid, g, op);
}

/* Close the groups that nothing can join any more: each group is stale when the next
 * spell that could join it starts (tb, tr, tf: blocked, runq, fault; "now" when none is
 * pending) more than the gap after its last spell. */
static __always_inline void close_stale3(struct ss_thread *th, u32 tid, u64 tb, u64 tr, u64 tf)
{
	close_if_stale(th, tid, &th->g[G_BLOCKED], SS_OP_BLOCKED, tb);
	close_if_stale(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ, tr);
	close_if_stale(th, tid, &th->g[G_FAULT], SS_OP_PAGE_FAULT, tf);
}

/* ... with the spell in progress (th->kind) as the one that may still join */
static __always_inline void close_stale(struct ss_thread *th, u32 tid, u64 now)
{
	u32 k = th->kind;
	u64 s = th->start;
	close_stale3(th, tid, k == SP_BLOCKED ? s : now, k == SP_RUNQ ? s : now,
		     k == SP_FAULT ? s : now);
}

static __always_inline void close_all(struct ss_thread *th, u32 tid)
{
	grp_close(th, tid, &th->g[G_BLOCKED], SS_OP_BLOCKED);
	grp_close(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ);
	grp_close(th, tid, &th->g[G_FAULT], SS_OP_PAGE_FAULT);
}

/* ---------------------------------------------------------------- owners */

#ifndef SS_NCPUS
#define SS_NCPUS 1024
#endif

static __always_inline struct ss_cpu *cpu_cur(void)
{
	u32 cpu = bpf_get_smp_processor_id();
	return cpus.lookup(&cpu);
}

static __always_inline u32 owners_gen(void)
{
	int zero = 0;
	struct ss_gen *g = ogen.lookup(&zero);
	return g ? g->kernel + g->user : 0;
}

static __always_inline void owners_changed(void)
{
	int zero = 0;
	struct ss_gen *g = ogen.lookup(&zero);
	if (g)
		__sync_fetch_and_add(&g->kernel, 1);
}

static __always_inline struct ss_oc *oc_slot(struct ss_cpu *c, void *task)
{
	u64 p = (u64)task;
	u32 i = (u32)((p >> 6) ^ (p >> 16)) & (SS_OCACHE - 1);
	return &c->oc[i];
}

/* Is task an owner thread? From this CPU's cache, else its tgid and the owners map
 * (two reads, one hash lookup), remembered. A task_struct freed and reused holds another
 * task: the generation moves on whenever an owner thread starts or exits, and a task
 * past its exit tracepoint is no owner, so no cache entry outlives its task's answer. */
static __always_inline int task_is_owner(struct ss_cpu *c, u32 gen, void *task)
{
	struct ss_oc *e = oc_slot(c, task);
	if (e->task == (u64)task && e->gen == gen)
		return e->owner;
	u32 tgid = 0, flags = 0;
	ss_read(tgid, task + OFF_TASK_TGID);
	ss_read(flags, task + OFF_TASK_FLAGS);
	u32 own = tgid && !(flags & SS_PF_EXITING) && owners.lookup(&tgid) != 0;
	e->task = (u64)task;
	e->gen = gen;
	e->owner = own;
	return own;
}

static __always_inline int current_is_owner(void)
{
	struct ss_cpu *c = cpu_cur();
	if (!c)
		return 0;
	return task_is_owner(c, owners_gen(), (void *)bpf_get_current_task());
}

static __always_inline struct ss_thread *thread_get(u32 tid, u32 tgid)
{
	struct ss_thread *th = threads.lookup(&tid);
	if (th)
		return th;
	int zero = 0;
	struct ss_thread *z = zero_thread.lookup(&zero);
	if (!z)
		return 0;
	if (threads.insert(&tid, z)) {
		ss_count(SS_C_INFLIGHT_COLLISION);    /* thread table full */
		return 0;
	}
	th = threads.lookup(&tid);
	if (th)
		th->tgid = tgid;
	return th;
}

/* ---------------------------------------------------------------- lineage */

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	/* TP_PROTO(struct task_struct *parent, struct task_struct *child) */
	void *child = (void *)ctx->args[1];
	u32 pid = 0, tgid = 0, ppid = 0;
	void *rp = 0;
	ss_read(pid, child + OFF_TASK_PID);
	ss_read(tgid, child + OFF_TASK_TGID);
	if (pid != tgid) {                     /* a new thread, not a process */
		if (current_is_owner())
			owners_changed();          /* it may reuse a cached task_struct */
		return 0;
	}
	ss_read(rp, child + OFF_TASK_REAL_PARENT);
	if (rp)
		ss_read(ppid, rp + OFF_TASK_TGID);
	u32 forker = bpf_get_current_pid_tgid() >> 32;
	if (owners.lookup(&forker) || (ppid != forker && owners.lookup(&ppid))) {
		u32 one = 2;                       /* inherited in the kernel */
		if (owners.update(&tgid, &one))
			ss_count(SS_C_INFLIGHT_COLLISION);
		else
			owners_changed();
	}
	emit_proc(SS_OP_FORK, tgid, pid, ppid, child + OFF_TASK_COMM, 1, 0, 0);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm); p is current */
	u64 id = bpf_get_current_pid_tgid();
	void *task = (void *)bpf_get_current_task();
	void *rp = 0;
	u32 ppid = 0;
	ss_read(rp, task + OFF_TASK_REAL_PARENT);
	if (rp)
		ss_read(ppid, rp + OFF_TASK_TGID);
	emit_proc(SS_OP_EXEC, id >> 32, (u32)id, ppid, 0, 0, 0, 0);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	/* TP_PROTO(struct task_struct *p[, bool group_dead]); p is current, once per thread */
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id, tgid = id >> 32;
	int owner = owners.lookup(&tgid) != 0;    /* not the cache: PF_EXITING is set already */
	if (owner) {
		struct ss_thread *th = threads.lookup(&tid);
		if (th) {
			close_all(th, tid);
			threads.delete(&tid);
		}
		owners_changed();           /* PF_EXITING is set: cached answers for it expire */
	}
	void *task = (void *)bpf_get_current_task();
	void *sig = 0;
	int live = 1;
	ss_read(sig, task + OFF_TASK_SIGNAL);
	if (sig)
		ss_read(live, sig + OFF_SIGNAL_LIVE);   /* decremented before this tracepoint */
	if (live != 0)
		return 0;                               /* other threads of the process live on */
	u8 was_owner = !owners.delete(&tgid);
	if (was_owner)
		owners_changed();
	void *rp = 0;
	u32 ppid = 0;
	ss_read(rp, task + OFF_TASK_REAL_PARENT);
	if (rp)
		ss_read(ppid, rp + OFF_TASK_TGID);
	int code = 0;
	s64 status = -1;
	if (bpf_probe_read_kernel(&code, sizeof(code), task + OFF_TASK_EXIT_CODE) == 0)
		status = code;
	emit_proc(SS_OP_EXIT, tgid, tid, ppid, 0, 0, status, was_owner);
	return 0;
}

/* ---------------------------------------------------------------- off-CPU */

#ifdef SS_SCHED_X86_64
/* syscalls that only wait for something else (x86-64 numbers): a sleep inside one is
 * voluntary, no stack needed */
static __always_inline int waiting_syscall(long nr)
{
	switch (nr) {
	case 7: case 16: case 23: case 34: case 35: case 43: case 45: case 47: case 61:
	case 65: case 70: case 128: case 130: case 202: case 220: case 230: case 232:
	case 243: case 247: case 270: case 271: case 281: case 288: case 299: case 441:
	case 449: case 455:
		return 1;
	}
	return 0;
}
#else
static __always_inline int waiting_syscall(long nr) { return 0; }
#endif

#ifdef SS_SCHED_X86_64
/* read/write-family syscalls (x86-64) whose first argument is an fd */
static __always_inline int fd_syscall(long nr)
{
	switch (nr) {
	case 0: case 1: case 17: case 18: case 19: case 20: case 295: case 296: case 327: case 328:
		return 1;
	}
	return 0;
}
#else
static __always_inline int fd_syscall(long nr) { return 0; }
#endif

/* The current task's user registers as saved at its kernel entry (0: unknown). */
static __always_inline void *current_regs(void)
{
#if defined(OFF_PT_REGS_ORIG_AX) && !defined(SS_NO_TASK_PT_REGS)
	struct task_struct *t = bpf_get_current_task_btf();    /* 5.11+ */
	return (void *)bpf_task_pt_regs(t);                    /* 5.15+ */
#else
	return 0;
#endif
}

/* the syscall of that kernel entry, -1 when it was an exception (a page fault) or an
 * interrupt, -2 when unknown */
static __always_inline long regs_syscall(void *regs)
{
	long nr = -2;
#ifdef OFF_PT_REGS_ORIG_AX
	if (regs)
		ss_read(nr, regs + OFF_PT_REGS_ORIG_AX);
#endif
	return nr;
}

/* Whether the fd in the syscall's first argument is a pipe, socket or character device:
 * a sleep reading or writing one waits for a peer, never for storage. */
static __always_inline int regs_fd_is_stream(void *regs)
{
#ifdef OFF_PT_REGS_DI
	unsigned long fd = 0;
	void *file = 0, *inode = 0;
	u16 mode = 0;
	ss_read(fd, regs + OFF_PT_REGS_DI);
	file = ss_fd_to_file(fd);
	if (!file)
		return 0;
	ss_read(inode, file + OFF_FILE_INODE);
	if (!inode)
		return 0;
	ss_read(mode, inode + OFF_INODE_MODE);
	u32 fmt = mode & 0170000;
	return fmt == 0010000 || fmt == 0140000 || fmt == 0020000;   /* S_IFIFO, S_IFSOCK, S_IFCHR */
#else
	return 0;
#endif
}

static __always_inline void unwatch(struct ss_thread *th)
{
	u32 cpu = th->wait_cpu;
	struct ss_cpu *w = cpus.lookup(&cpu);
	if (w && w->waiting)
		__sync_fetch_and_add(&w->waiting, -1);
}

static __always_inline void switch_out(void *ctx, struct ss_cpu *c, void *prev, u32 state,
				       int preempt, void *next, u64 now)
{
	if (state & SS_TS_DEAD)
		return;                  /* the last switch of an exiting thread */
	u32 flags = 0;
	ss_read(flags, prev + OFF_TASK_FLAGS);
	if (flags & SS_PF_EXITING)
		return;                  /* past its exit tracepoint: its state is gone */
	u64 id = bpf_get_current_pid_tgid();      /* current is still prev */
	u32 tid = (u32)id, tgid = id >> 32;
	struct ss_thread *th = thread_get(tid, tgid);
	if (!th)
		return;
	if (th->kind == SP_RUNQ)
		unwatch(th);             /* never switched in as an owner: not waiting any more */
	if (th->kind == SP_FAULT)
		faulting_add(-1);
	th->kind = SP_NONE;
	close_stale(th, tid, now);
	th->start = now;
	th->wake = 0;
	bpf_get_current_comm(th->comm, SS_COMM_LEN);
	th->cgroup = bpf_get_current_cgroup_id();
	if (preempt || state == 0) {
		u32 next_tgid = 0;
		ss_read(next_tgid, next + OFF_TASK_TGID);
		th->kind = SP_RUNQ;
		th->state = SS_SCHED_PREEMPTED;
		th->other = next_tgid;
		proc_comm(next, th->other_comm);
		/* watch who holds this CPU while the thread waits for it */
		th->wait_cpu = bpf_get_smp_processor_id();
		if (!c->waiting)
			c->best_len = 0;
		c->since = now;
		__sync_fetch_and_add(&c->waiting, 1);
		return;
	}
	if (!(state & (SS_TS_INTERRUPTIBLE | SS_TS_UNINTERRUPTIBLE)) || (state & SS_TS_NOLOAD))
		return;                  /* stopped, traced, parked, idle waits */
	int d = (state & SS_TS_UNINTERRUPTIBLE) != 0;
	th->state = d ? SS_SCHED_D : SS_SCHED_S;
	void *regs = current_regs();
	long nr = regs_syscall(regs);
#ifdef SS_SCHED_FAULTS
	if (nr == -1) {              /* not in a syscall: blocked in a user page fault */
		th->kind = SP_FAULT;
		faulting_add(1);         /* user space reads the mappings while it lives */
		return;
	}
#endif
	if (!d && (waiting_syscall(nr) || (fd_syscall(nr) && regs_fd_is_stream(regs)))) {
		th->kind = SP_QUIET;     /* voluntary, known without a stack walk */
		return;
	}
	int sid = stacks.get_stackid(ctx, 0);
	th->stackid = sid;
	if (d) {
		th->kind = SP_BLOCKED;
		return;
	}
	if (sid < 0) {
		th->kind = SP_QUIET;
		return;
	}
	u8 *cls = sclass.lookup(&sid);
	if (!cls)
		th->kind = SP_UNKNOWN;
	else
		th->kind = *cls == SS_CLASS_STALL ? SP_BLOCKED : SP_QUIET;
}

/* A preempted thread's wait for the CPU, s to now. Who ran instead: the task that held
 * the CPU it waited on longest in one stretch (a hog; the task that took the CPU at the
 * switch-out is often a short wakeup), else that one. */
static __always_inline void preempted_spell(struct ss_thread *th, u32 tid, u64 s, u64 now)
{
	u32 cpu = th->wait_cpu;
	struct ss_cpu *w = cpus.lookup(&cpu);
	if (w && w->best_len && w->best_tgid)
		grp_add(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ, s, now, 0, SS_SCHED_PREEMPTED,
			w->best_tgid, w->best_comm);
	else
		grp_add(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ, s, now, 0, SS_SCHED_PREEMPTED,
			th->other, th->other_comm);
	unwatch(th);
}

/* A woken thread's wait for a CPU, wake to now: the task that held the CPU until now. */
static __always_inline void wakeup_spell(struct ss_thread *th, u32 tid, u64 wake, u64 now)
{
	if (wake >= now)
		return;
	u64 id = bpf_get_current_pid_tgid();
	char comm[SS_COMM_LEN];
	proc_comm((void *)bpf_get_current_task(), comm);
	grp_add(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ, wake, now, 0, SS_SCHED_WAKEUP, id >> 32, comm);
}

static __always_inline void switch_in(u32 tid, u64 now)
{
	struct ss_thread *th = threads.lookup(&tid);
	if (!th)
		return;
	u32 kind = th->kind;
	u64 s = th->start;
	th->kind = SP_NONE;
	if (kind == SP_NONE) {
		close_stale3(th, tid, now, now, now);
		return;
	}
	u64 wake = th->wake;
	if (wake < s || wake > now)
		wake = now;
	/* the parts of the ending spell: off-CPU in its own group from s, and (all but a
	 * preemption) the wait for a CPU from the wakeup */
	close_stale3(th, tid, kind == SP_BLOCKED ? s : now, kind == SP_RUNQ ? s : wake,
		     kind == SP_FAULT ? s : now);
	if (kind == SP_RUNQ) {
		preempted_spell(th, tid, s, now);
		return;
	}
	if (kind == SP_BLOCKED)
		grp_add(th, tid, &th->g[G_BLOCKED], SS_OP_BLOCKED, s, wake, (u64)th->stackid,
			th->state, 0, 0);
	else if (kind == SP_FAULT) {
		grp_add(th, tid, &th->g[G_FAULT], SS_OP_PAGE_FAULT, s, wake, th->fault_addr,
			th->state, 0, 0);
		faulting_add(-1);
	}
	else if (kind == SP_UNKNOWN && wake - s >= SS_SCHED_FLOOR_NS)
		emit_sched(th, tid, SS_OP_BLOCKED, s, wake, wake - s, 1, (u64)th->stackid,
			   SS_SCHED_S_UNKNOWN, 0, 0);
	wakeup_spell(th, tid, wake, now);     /* the wait for a CPU after the wakeup */
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
	/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next
	 *          [, unsigned int prev_state (5.18+)]); current is still prev */
	void *prev = (void *)ctx->args[1];
	void *next = (void *)ctx->args[2];
	struct ss_cpu *c = cpu_cur();
	if (!c)
		return 0;
	u64 now = 0;
	if (c->waiting) {        /* an owner waits for this CPU: how long did prev hold it? */
		now = bpf_ktime_get_ns();
		if (now - c->since > c->best_len) {
			c->best_len = now - c->since;
			c->best_tgid = bpf_get_current_pid_tgid() >> 32;
			proc_comm((void *)bpf_get_current_task(), c->best_comm);
		}
		c->since = now;
	}
	u32 gen = owners_gen();
	int prev_owner = task_is_owner(c, gen, prev);
	int next_owner = task_is_owner(c, gen, next);
	if (!prev_owner && !next_owner)
		return 0;
	if (!now)
		now = bpf_ktime_get_ns();
	if (prev_owner) {
#ifdef SS_SWITCH_STATE_ARG
		u32 state = (u32)ctx->args[3];
#else
		u32 state = 0;
		ss_read(state, prev + OFF_TASK_STATE);
#endif
		switch_out(ctx, c, prev, state, ctx->args[0] & 1, next, now);
	}
	if (next_owner) {
		u32 next_tid = 0;
		ss_read(next_tid, next + OFF_TASK_PID);
		switch_in(next_tid, now);
	}
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup)
{
	/* TP_PROTO(struct task_struct *p) */
	void *p = (void *)ctx->args[0];
	struct ss_cpu *c = cpu_cur();
	if (!c || !task_is_owner(c, owners_gen(), p))
		return 0;
	u32 tid = 0;
	ss_read(tid, p + OFF_TASK_PID);
	struct ss_thread *th = threads.lookup(&tid);
	if (th && th->kind >= SP_BLOCKED && !th->wake)
		th->wake = bpf_ktime_get_ns();
	return 0;
}

#ifdef SS_SCHED_FAULTS
RAW_TRACEPOINT_PROBE(page_fault_user)
{
	/* TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code) */
	if (!current_is_owner())
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	struct ss_thread *th = thread_get((u32)id, id >> 32);
	if (th)
		th->fault_addr = ctx->args[0];
	return 0;
}
#endif

/* Run by user space through BPF_PROG_TEST_RUN, never attached: args[0] = tid,
 * args[1] = 1 to close everything now (the tracer stops: a spell in progress is
 * counted up to now), 0 to close only the groups quiet for longer than the gap. */
int ss_flush(struct bpf_raw_tracepoint_args *ctx)
{
	u32 tid = ctx->args[0];
	struct ss_thread *th = threads.lookup(&tid);
	if (!th)
		return 0;
	u64 now = bpf_ktime_get_ns();
	if (!ctx->args[1]) {
		close_stale(th, tid, now);
		return 0;
	}
	u32 kind = th->kind;
	u64 s = th->start;
	if (kind == SP_RUNQ)
		grp_add(th, tid, &th->g[G_RUNQ], SS_OP_RUNQ, s, now, 0, th->state, th->other,
			th->other_comm);
	else if (kind == SP_BLOCKED && !th->wake)
		grp_add(th, tid, &th->g[G_BLOCKED], SS_OP_BLOCKED, s, now, (u64)th->stackid,
			th->state, 0, 0);
	else if (kind == SP_FAULT && !th->wake)
		grp_add(th, tid, &th->g[G_FAULT], SS_OP_PAGE_FAULT, s, now, th->fault_addr,
			th->state, 0, 0);
	if (kind == SP_RUNQ || ((kind == SP_BLOCKED || kind == SP_FAULT) && !th->wake))
		th->start = now;             /* the rest of the spell counts from now */
	close_all(th, tid);
	return 0;
}
