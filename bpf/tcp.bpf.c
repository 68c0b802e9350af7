/* tcp.bpf.c: TCP retransmissions, one record each.
 *
 * Hooks the stable tracepoints tcp:tcp_retransmit_skb and
 * tcp:tcp_retransmit_synack (both count toward TcpRetransSegs). They fire
 * mostly in softirq/timer context, where the current task is whoever was
 * interrupted, so the record carries the socket's inode number instead
 * (sk->sk_socket -> socket_alloc.vfs_inode.i_ino, offsets from BTF); user
 * space maps it to the owning process through /proc/<pid>/fd. The RTO
 * (icsk_rto, jiffies) rides in `aux` so user space can close loss episodes.
 * TcpRetransSegs counts segments, so the skb's pcount (tcp_skb_cb.tcp_gso_segs)
 * rides in `segs`. Since Linux 6.10 the tracepoint also fires for failed
 * retransmits (err != 0, not counted by TcpRetransSegs): `ret` carries err
 * where the kernel has it (SS_TCP_HAS_ERR, from the tracepoint format).
 * Counting tracepoint hits is not enough to match TcpRetransSegs: on 6.18 about
 * one exchange in five increments the counter once without a tracepoint hit
 * (measured with a bare counting program). So each record also carries the
 * socket's own counter, tcp_sock.total_retrans, which the kernel bumps next to
 * TcpRetransSegs; user space counts a flow's retransmits as the difference of
 * that counter, and sock:inet_sock_set_state -> TCP_CLOSE emits a last record
 * for every socket that retransmitted, so a trailing untraced retransmit is
 * still counted.
 * Where the application's wait began and ended: a retransmit fires an RTO
 * (timeout, congestion state Loss) or about an RTT (fast retransmit, tail loss
 * probe) after the lost data was first sent, and the wait ends when the last
 * retransmit is acknowledged, about an RTT after it. So each record also
 * carries the congestion-avoidance state (icsk_ca_state) and the pending
 * timer (icsk_pending: 0 inside the RTO handler, the loss-probe timer while a
 * tail loss probe is sent, the armed timer for ACK-driven retransmits) in `tid` and the
 * smoothed RTT (tcp_sock.srtt_us >> 3, us) in `fs_magic`; user space places
 * the episode from the first transmission to the last acknowledgement
 * (tracer/net.py). (tcp_sock.retrans_stamp does not help: the kernel sets it
 * after the first retransmit, to that retransmit's own time.)
 * Retransmits are rare: every one is emitted, the threshold does not apply.
 * The owner: noted in the kernel where a process makes the connection, so an
 * episode of a socket that was closed (or whose process exited) before user
 * space could look for it is still owned: the task that connect()s (the
 * CLOSE -> SYN_SENT transition of sock:inet_sock_set_state runs in its
 * context) or accept()s it (syscalls:sys_exit_accept4/accept: the returned
 * fd's file -> socket -> sock), keyed by the sock's address, with its comm.
 * Each record carries the owner in pid/comm when one was noted (a socket
 * connected before the tracer started was not: user space then looks its
 * inode up in /proc/<pid>/fd); the comm of the interrupted task otherwise.
 * Filters: --pid/--cgroup cannot apply in softirq context and are applied in
 * user space after the owner is known.
 */
#include "common.bpf.h"

static __always_inline u64 sock_ino(const void *sk)
{
	void *sock = 0;
	unsigned long ino = 0;
	if (!sk)
		return 0;
	ss_read(sock, sk + OFF_SOCK_SOCKET);
	if (!sock)
		return 0;
	void *inode = sock - OFF_SOCKALLOC_SOCKET + OFF_SOCKALLOC_INODE;
	ss_read(ino, inode + OFF_INODE_INO);
	return ino;
}

/* The address family: the tracepoints' own `family` field (tcp_retransmit_skb and
 * tcp_retransmit_synack have it since Linux 5.11: SS_TCP_SKB_FAMILY and
 * SS_TCP_SYNACK_FAMILY come from their tracefs formats), else the socket's
 * sock_common.skc_family (for a SYN-ACK: the listener's; an IPv6 listener's IPv4
 * peers then show as v4-mapped IPv6 addresses, as the tracepoint stores them). */
static __always_inline u16 sk_family(const void *sk)
{
	u16 f = 0;
	if (sk)
		ss_read(f, sk + OFF_SK_FAMILY);
	return f;
}
#ifdef SS_TCP_SKB_FAMILY
#define SKB_FAMILY(args) ((args)->family)
#else
#define SKB_FAMILY(args) sk_family((args)->skaddr)
#endif
#ifdef SS_TCP_SYNACK_FAMILY
#define SYNACK_FAMILY(args) ((args)->family)
#else
#define SYNACK_FAMILY(args) sk_family((args)->skaddr)
#endif

/* the three tracepoints name their address fields alike (a macro, since each
 * has its own generated args type) */
#define SS_COPY_ADDRS(e, args, fam)                                         \
	do {                                                                \
		if ((fam) == 10) {                                          \
			bpf_probe_read_kernel((e)->saddr, 16, (args)->saddr_v6); \
			bpf_probe_read_kernel((e)->daddr, 16, (args)->daddr_v6); \
		} else {                                                    \
			__builtin_memset((e)->saddr, 0, 16);                \
			__builtin_memset((e)->daddr, 0, 16);                \
			bpf_probe_read_kernel((e)->saddr, 4, (args)->saddr); \
			bpf_probe_read_kernel((e)->daddr, 4, (args)->daddr); \
		}                                                           \
	} while (0)

/* sockets that retransmitted -> their last total_retrans seen */
BPF_TABLE("lru_hash", u64, u32, rtx_seen, 65536);

/* sock address -> the process that connected or accepted it */
struct tcp_owner {
	u32 tgid;
	u32 pad;
	char comm[16];
};
BPF_TABLE("lru_hash", u64, struct tcp_owner, tcp_owners, 65536);

static __always_inline void note_owner(u64 sk)
{
	struct tcp_owner o = {};
	o.tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(o.comm, sizeof(o.comm));
	tcp_owners.update(&sk, &o);
}

static __always_inline u32 total_retrans(const void *sk)
{
	u32 t = 0;
	if (sk)
		ss_read(t, sk + OFF_TP_TOTAL_RETRANS);
	return t;
}

static __always_inline struct ss_event *retrans_common(const void *sk, u8 op, u16 sport, u16 dport,
						      u16 family)
{
	struct ss_event *e = ss_reserve();
	if (!e)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 rto = 0;
	if (sk)
		ss_read(rto, sk + OFF_ICSK_RTO);
	e->ts_ns = bpf_ktime_get_ns();
	e->dur_ns = 0;
	e->cgroup_id = 0;
	e->ret = 0;
	e->ino = sock_ino(sk);
	e->key = (u64)sk;
	e->pid = 0;               /* else resolved from the socket inode in user space */
	e->tid = 0;
	e->dev = 0;
	e->fs_magic = 0;
	e->type = SS_T_TCP_RETRANS;
	e->op = op;
	e->state = 0;
	e->flags = 0;
	e->sport = sport;
	e->dport = dport;
	e->family = family;
	e->segs = 1;
	e->aux = rto;
	__builtin_memset(e->path, 0, sizeof(e->path));
	u64 skp = (u64)sk;
	struct tcp_owner *o = tcp_owners.lookup(&skp);
	if (o) {
		e->pid = o->tgid;
		__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	} else {
		bpf_get_current_comm(e->comm, sizeof(e->comm));   /* the interrupted task */
	}
	return e;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	u16 fam = SKB_FAMILY(args);
	struct ss_event *e = retrans_common(args->skaddr, SS_OP_RETRANS, args->sport, args->dport, fam);
	if (!e)
		return 0;
	e->state = args->state;
	u64 skp = (u64)args->skaddr;
	u32 tot = total_retrans(args->skaddr);
	e->dev = tot;
	rtx_seen.update(&skp, &tot);
	{
		u8 ca = 0, pending = 0;
		u32 srtt8 = 0;
		ss_read(ca, args->skaddr + OFF_ICSK_CA_STATE);
		ss_read(pending, args->skaddr + OFF_ICSK_PENDING);
		ss_read(srtt8, args->skaddr + OFF_TP_SRTT_US);
		/* icsk_ca_state (the low 5 bits of its byte) | icsk_pending << 8 */
		e->tid = (ca & 0x1f) | ((u32)pending << 8);
		e->fs_magic = srtt8 >> 3;
		u32 out = 0;
		ss_read(out, args->skaddr + OFF_TP_PACKETS_OUT);
		e->cgroup_id = out;       /* a lone segment waits longer for its loss probe */
	}
	if (args->skbaddr) {
		u16 segs = 0;
		ss_read(segs, (void *)args->skbaddr + OFF_SKB_CB + OFF_TCB_GSO_SEGS);
		e->segs = segs ? segs : 1;
	}
#ifdef SS_TCP_HAS_ERR
	e->ret = args->err;
#endif
	SS_COPY_ADDRS(e, args, fam);
	ss_submit(e);
	return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	u16 fam = SYNACK_FAMILY(args);
	struct ss_event *e = retrans_common(args->skaddr, SS_OP_RETRANS_SYNACK, args->sport,
					    args->dport, fam);
	if (!e)
		return 0;
	e->state = 12;            /* TCP_NEW_SYN_RECV */
	SS_COPY_ADDRS(e, args, fam);
	ss_submit(e);
	return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != 6)                            /* IPPROTO_TCP */
		return 0;
	u64 skp = (u64)args->skaddr;
	if (args->newstate == 2) {                          /* TCP_SYN_SENT: in connect() */
		note_owner(skp);
		return 0;
	}
	if (args->newstate != 7)                            /* TCP_CLOSE */
		return 0;
	u32 *last = rtx_seen.lookup(&skp);
	if (!last) {
		tcp_owners.delete(&skp);
		return 0;
	}
	u32 tot = total_retrans(args->skaddr);
	{   /* always: user space forgets the socket on this record */
		struct ss_event *e = retrans_common(args->skaddr, SS_OP_RETRANS_CLOSE, args->sport,
						    args->dport, args->family);
		if (e) {
			e->state = args->oldstate;
			e->dev = tot;
			e->segs = 0;
			SS_COPY_ADDRS(e, args, args->family);   /* this tracepoint has had it since 4.16 */
			ss_submit(e);
		}
	}
	rtx_seen.delete(&skp);
	tcp_owners.delete(&skp);
	return 0;
}

/* accept(): the new socket's sock, from the returned fd (file -> socket -> sock) */
static __always_inline void note_accepted(long fd)
{
	if (fd < 0)
		return;
	void *file = ss_fd_to_file(fd), *sock = 0, *sk = 0;
	if (!file)
		return;
	ss_read(sock, file + OFF_FILE_PRIVATE_DATA);
	if (!sock)
		return;
	ss_read(sk, sock + OFF_SOCKET_SK);
	u16 fam = sk_family(sk);
	if (fam == 2 || fam == 10)                           /* AF_INET, AF_INET6 */
		note_owner((u64)sk);
}

#ifdef SS_TCP_ACCEPT4
TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	note_accepted(args->ret);
	return 0;
}
#endif
#ifdef SS_TCP_ACCEPT
TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	note_accepted(args->ret);
	return 0;
}
#endif
