/* rdma.bpf.c: RDMA verbs completion waits.
 *
 * An event-driven verbs consumer (rdma-core's ibv_get_cq_event(), used by MPI,
 * UCX and NCCL when they block instead of spinning) sleeps in the kernel until
 * its completion queue signals: that wait is what starves a GPU when the
 * fabric retries, congests or loses a peer. One record per wait above the
 * threshold: pid/tid/comm of the waiter, the RDMA device, the wait, and the
 * completion events it returned.
 *
 * Attach methods (tracer/probes_rdma.py), best first:
 *   (default)        kprobe/kretprobe on ib_uverbs_comp_event_read, the read(2)
 *                    on the completion channel behind ibv_get_cq_event: every
 *                    provider (mlx5, rxe, ...), kernel probe cost. The device is
 *                    file->private_data (struct ib_uverbs_completion_event_file)
 *                    ->uobj.ufile->device->ib_dev, name from BTF offsets.
 *   SS_RDMA_UPROBE   uprobe/uretprobe on libibverbs' ibv_get_cq_event itself
 *                    (every symbol version), for kernels without kprobes. The
 *                    device name comes from libibverbs' public ABI (verbs.h):
 *                    struct ibv_cq starts with its ibv_context *, ibv_context with
 *                    its ibv_device *, and ibv_device.name is at byte 24 (two
 *                    pointers of _ibv_device_ops, node_type, transport_type); that
 *                    layout is the library's ABI since libibverbs 1.1.
 *                    A uprobe pair costs microseconds per call (see
 *                    vagrant/README.md): fine for blocking waits, never for the
 *                    busy-polling hot path.
 * Not covered: busy polling (ibv_poll_cq is an inline call into the provider,
 * whose poll function has no exported symbol in distribution builds), and the
 * data path of hardware NICs, which never enters the kernel: retries, sequence
 * errors, RNR NAKs and CNPs come from the port counters (tracer/rdma_counters.py).
 */
#include "common.bpf.h"

struct rdma_inflight {
	u64 ts;
	u64 arg;      /* struct file * (kprobe) or the struct ibv_cq ** out-parameter (uprobe) */
};
BPF_HASH(rdma_inflight, u32, struct rdma_inflight, 16384);

static __always_inline int rdma_enter(u64 arg)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!ss_wanted(id))
		return 0;
	u32 tid = (u32)id;
	struct rdma_inflight f = { .ts = bpf_ktime_get_ns(), .arg = arg };
	rdma_inflight.update(&tid, &f);
	return 0;
}

/* the record, or 0 when the wait was short (histogram) or unmatched */
static __always_inline struct ss_event *rdma_exit(u64 *arg, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct rdma_inflight *f = rdma_inflight.lookup(&tid);
	if (!f) {
		if (ss_wanted(id))
			ss_count(SS_C_NO_START);
		return 0;
	}
	u64 ts = f->ts;
	*arg = f->arg;
	rdma_inflight.delete(&tid);
	u64 dur = bpf_ktime_get_ns() - ts;
	if (ss_below(dur)) {
		ss_hist_add(SS_OP_RDMA_GET_CQ_EVENT, dur);
		ss_count(SS_C_BELOW);
		return 0;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return 0;
	e->ts_ns = ts;
	e->dur_ns = dur;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ret = ret;
	e->ino = 0;
	e->key = 0;
	e->pid = id >> 32;
	e->tid = tid;
	e->dev = 0;
	e->fs_magic = 0;
	e->type = SS_T_RDMA;
	e->op = SS_OP_RDMA_GET_CQ_EVENT;
	e->state = 0;
	e->flags = 0;
	e->sport = e->dport = e->family = e->segs = 0;
	e->aux = 0;
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	__builtin_memset(e->path, 0, sizeof(e->path));
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

#ifdef SS_RDMA_UPROBE

#define IBV_DEVICE_NAME_OFF 24

/* int ibv_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context) */
int ss_up_cq_event(struct pt_regs *ctx)
{
	return rdma_enter(PT_REGS_PARM2(ctx));
}

int ss_up_cq_event_ret(struct pt_regs *ctx)
{
	u64 cq_out = 0;
	int ret = PT_REGS_RC(ctx);
	struct ss_event *e = rdma_exit(&cq_out, ret);
	if (!e)
		return 0;
	void *cq = 0, *context = 0, *device = 0;
	if (ret == 0 && cq_out)
		bpf_probe_read_user(&cq, sizeof(cq), (void *)cq_out);
	if (cq)
		bpf_probe_read_user(&context, sizeof(context), cq);
	if (context)
		bpf_probe_read_user(&device, sizeof(device), context);
	if (device)
		bpf_probe_read_user_str(e->path, 64, device + IBV_DEVICE_NAME_OFF);
	e->ret = ret == 0 ? 1 : ret;      /* one completion event per successful call */
	ss_submit(e);
	return 0;
}

#else

/* ssize_t ib_uverbs_comp_event_read(struct file *filp, char __user *buf, size_t count, loff_t *pos) */
int ss_kp_comp_event_read(struct pt_regs *ctx, void *filp)
{
	return rdma_enter((u64)filp);
}

int ss_kp_comp_event_read_ret(struct pt_regs *ctx)
{
	u64 filp = 0;
	long ret = PT_REGS_RC(ctx);
	struct ss_event *e = rdma_exit(&filp, ret);
	if (!e)
		return 0;
	void *ev_file = 0, *ufile = 0, *udev = 0, *ibdev = 0;
	ss_read(ev_file, (void *)filp + OFF_FILE_PRIVATE);
	if (ev_file)
		ss_read(ufile, ev_file + OFF_COMP_EV_FILE_UFILE);
	if (ufile)
		ss_read(udev, ufile + OFF_UVERBS_FILE_DEVICE);
	if (udev)
		ss_read(ibdev, udev + OFF_UVERBS_DEVICE_IB_DEV);
	if (ibdev) {
#ifdef IBDEV_NAME_IS_ARRAY
		bpf_probe_read_kernel_str(e->path, 64, ibdev + OFF_IB_DEVICE_NAME);
#else
		const char *name = 0;
		ss_read(name, ibdev + OFF_IB_DEVICE_NAME);
		if (name)
			bpf_probe_read_kernel_str(e->path, 64, name);
#endif
	}
	/* read() returns bytes: 8 per completion event (struct ib_uverbs_comp_event_desc) */
	e->ret = ret > 0 ? (long)((u64)ret >> 3) : ret;
	ss_submit(e);
	return 0;
}

#endif
