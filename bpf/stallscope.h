/* stallscope.h: the kernel/user contract.
 *
 * Every probe family (vfs, tcp, block, nfs, rdma) emits the same fixed-size
 * record into one BPF ring buffer, so user space can view a whole drained
 * span of the ring as one numpy array (tracer/ring.py) instead of taking a
 * callback per event.  wire/schema.py derives its decoder from the struct
 * below by parsing this file: change a field here and the decoder follows.
 * Bump SS_ABI_VERSION on any layout change.
 */
#ifndef STALLSCOPE_H
#define STALLSCOPE_H

#define SS_ABI_VERSION 2

#define SS_PATH_LEN 128        /* NUL-separated path components, leaf first */
#define SS_COMM_LEN 16
#define SS_HIST_SLOTS 32       /* log2(us) buckets per op */
#define SS_NOPS 64             /* op codes, see enum ss_op */
#define SS_INFLIGHT_SLOTS 65536 /* in-flight syscalls, indexed by tid */

enum ss_type {
	SS_T_VFS = 1,          /* read/write/fsync syscalls or vfs_* functions */
	SS_T_TCP_RETRANS = 2,  /* one TCP retransmission */
	SS_T_BLOCK = 3,        /* one block request, issue -> complete */
	SS_T_NFS = 4,          /* NFS client file operation */
	SS_T_NFS_RPC = 5,      /* one sunrpc task (RPC-level latency, retransmits) */
	SS_T_RDMA = 6,         /* verbs/CM wait or completion */
	SS_T_RDMA_COUNTER = 7, /* reserved: hardware counters come from sysfs */
	SS_T_PROC = 8,         /* process fork/exec/exit (lineage at event time) */
	SS_T_SCHED = 9,        /* an owner thread off-CPU: blocked (D state) or runnable waiting */
	SS_T_HTTP = 10,        /* one HTTP/1.x request: head written -> final status (or none) */
};

enum ss_op {
	SS_OP_READ = 1, SS_OP_WRITE = 2, SS_OP_PREAD = 3, SS_OP_PWRITE = 4,
	SS_OP_READV = 5, SS_OP_WRITEV = 6, SS_OP_FSYNC = 7, SS_OP_FDATASYNC = 8,
	SS_OP_SENDFILE = 9, SS_OP_SPLICE = 10, SS_OP_COPY_FILE_RANGE = 11,
	SS_OP_OPENAT = 12, SS_OP_STAT = 13, SS_OP_GETDENTS = 14,
	SS_OP_IO_URING_ENTER = 15, SS_OP_IO_GETEVENTS = 19,
	SS_OP_PAGE_FAULT = 26, SS_OP_CLOSE = 27,
	SS_OP_RETRANS = 16, SS_OP_RETRANS_SYNACK = 17, SS_OP_RETRANS_CLOSE = 18,
	SS_OP_BLK_READ = 20, SS_OP_BLK_WRITE = 21, SS_OP_BLK_FLUSH = 22,
	SS_OP_BLK_DISCARD = 23, SS_OP_BLK_OTHER = 24,
	SS_OP_NFS_READ = 32, SS_OP_NFS_WRITE = 33, SS_OP_NFS_COMMIT = 34,
	SS_OP_NFS_OPEN = 35, SS_OP_NFS_GETATTR = 36, SS_OP_NFS_FSYNC = 37,
	SS_OP_NFS_RPC = 38,
	SS_OP_RDMA_POLL_CQ = 48, SS_OP_RDMA_POST_SEND = 49, SS_OP_RDMA_POST_RECV = 50,
	SS_OP_RDMA_CM = 51, SS_OP_RDMA_GET_CQ_EVENT = 52, SS_OP_RDMA_REQ = 53,
	SS_OP_FORK = 56, SS_OP_EXEC = 57, SS_OP_EXIT = 58,
	SS_OP_BLOCKED = 60, SS_OP_RUNQ = 61,
	SS_OP_HTTP_GET = 40, SS_OP_HTTP_PUT = 41, SS_OP_HTTP_POST = 42, SS_OP_HTTP_HEAD = 43,
	SS_OP_HTTP_DELETE = 44, SS_OP_HTTP_PATCH = 45, SS_OP_HTTP_OPTIONS = 46,
};

/* flags */
#define SS_F_PATH_TRUNC 0x01   /* path walk hit SS_PATH_LEN or the depth limit */
#define SS_F_KERNEL_OWNER 0x02 /* pid was taken in process context */
#define SS_F_AGGREGATE 0x04    /* many ops of one thread on one file, each below the
                                  threshold, back to back: ts_ns/dur_ns span first start to
                                  last end, aux = op count, key = summed op latency (ns) */
#define SS_F_PATH_RAW 0x08     /* path holds a plain NUL-terminated string (e.g. the
                                  user's argument to stat), not leaf-first components */
#define SS_F_HTTP_TLS 0x10     /* HTTP: seen in libssl (uprobes), key = SSL *; else plaintext
                                  syscalls, key = fd */
#define SS_F_HTTP_NOANSWER 0x20 /* HTTP: no status line came: the client closed the
                                  connection (a timeout) or the server closed it (ret 0) */
#define SS_HTTP_HOST_LEN 48    /* HTTP record path[]: Host value at 0, request path (up to '?') */
#define SS_HTTP_PATH_OFF 48    /* at 48, status line reason phrase at 112 */
#define SS_HTTP_PATH_LEN 64
#define SS_HTTP_REASON_OFF 112
#define SS_HTTP_REASON_LEN 16

/* counters[] indexes (per-CPU array "counters") */
#define SS_C_LOST_RINGBUF 0    /* ring buffer refused the record twice: dropped */
#define SS_C_INFLIGHT_COLLISION 1 /* in-flight slot held by another tid (block: another request at the sector) */
#define SS_C_EMITTED 2
#define SS_C_BELOW 3           /* ops below threshold (block; vfs: sum of hist) */
#define SS_C_NO_START 4        /* exit without a matching enter */
#define SS_C_STORM_FULL 5      /* storm map full: a storm's tail goes unreported */
#define SS_C_SHED 6            /* overload: above SS_MIN_NS but below the raised threshold in
                                  map shed[0]; counted (and in hist), not emitted */
#define SS_C_RETRY_SAVED 7     /* a reservation refused, then granted on its retry (not lost) */
#define SS_NCOUNTERS 8

/* Fields whose meaning depends on the record type (decoders in tracer/families/):
 *   ino   file inode; TCP: socket inode
 *   key   block: sector; NFS: rpc xid; RDMA: qp number; TCP: struct sock address;
 *         VFS aggregate: summed latency; PROC: parent tgid; SCHED: kernel stack id
 *         (-1 none) ; PAGE_FAULT: faulting address
 *   dev   VFS/NFS: s_dev; block: dev_t; TCP: tcp_sock.total_retrans; SCHED runq: spells
 *         merged
 *   ret   SCHED: off-CPU ns summed over the merged spells (ts_ns/dur_ns span them)
 *   aux   NFS: rpc retransmits; block: bytes; TCP: rto (jiffies); VFS aggregate: op
 *         count; SCHED: number of off-CPU spells merged; SCHED runq: pid that ran instead
 *   tid   TCP retransmit: icsk_ca_state | icsk_pending << 8 (what triggered it)
 *   fs_magic TCP retransmit: smoothed RTT (us)
 *   cgroup_id TCP retransmit: packets in flight (tcp_sock.packets_out)
 *   state TCP: socket state; NFS_RPC: program version; SCHED: the longest spell's kind,
 *         1 D state, 2 S state in a wait that stalls, 3 S state not classified yet (one
 *         spell; user space classifies its stack), 4 preempted, 5 runnable after a wakeup
 *   ret   HTTP: the final status code (0: no answer); key HTTP: connection (fd or SSL *)
 *   ret   PROC EXIT: the wait(2) status (task exit_code: signal in bits 0-6, 0x80 core
 *         dumped, exit code in bits 8-15; -1 unreadable)
 *   state PROC EXIT: 1 if the process was in the owners map (a GPU process or descendant)
 *   path  HTTP: Host value, request path up to '?' and reason phrase at fixed offsets
 *         (SS_HTTP_*); VFS/NFS: leaf-first path components; NFS_RPC: "PROC\0prog\0"; RDMA: device
 *         name; SCHED runq: comm of the task that ran instead
 */
struct ss_event {
	__u64 ts_ns;       /* start, bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 dur_ns;
	__u64 cgroup_id;
	__s64 ret;         /* bytes transferred, or -errno (TCP: the retransmit's error) */
	__u64 ino;         /* file inode, or socket inode for TCP */
	__u64 key;         /* type-specific: block sector, rpc xid, qp number */
	__u32 pid;         /* tgid */
	__u32 tid;
	__u32 dev;         /* s_dev (VFS/NFS), block dev_t; TCP: tcp_sock.total_retrans */
	__u32 fs_magic;    /* super_block.s_magic */
	__u8 type;         /* enum ss_type */
	__u8 op;           /* enum ss_op */
	__u8 state;        /* TCP state */
	__u8 flags;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 segs;        /* TCP: segments in the retransmitted skb (pcount); VFS storm: other files */
	__u32 aux;         /* type-specific: rpc retransmits, block bytes, error */
	__u8 saddr[16];
	__u8 daddr[16];
	char comm[SS_COMM_LEN];
	char path[SS_PATH_LEN];
};

#endif
