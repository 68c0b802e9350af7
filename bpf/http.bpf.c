/* http.bpf.c: HTTP/1.x requests and their outcome (status line), per process.
 *
 * A request runs from its head being written to its final status line (1xx interim
 * answers such as "100 Continue" are skipped) or to the connection's end without one.
 * Two sources feed the same parser:
 *   plaintext   syscall tracepoints, node-wide: sys_enter_{write,sendto,writev,sendmsg}
 *               look at the first bytes written for a method ("GET ", "PUT ", ...) on a
 *               socket; sys_{enter,exit}_{read,recvfrom,readv,recvmsg} feed the status
 *               parser only for a connection waiting for its status; sys_enter_close of
 *               such a connection ends the request without an answer. Key: (tgid, fd).
 *   TLS         (SS_HTTP_TLS) uprobes on libssl's internal write/read functions (the
 *               callees of SSL_write_ex/SSL_read_ex, at an instruction the kernel emulates,
 *               see tracer/uprobe_sites.py), attached per process by the tracer for GPU
 *               owners and their descendants only: ss_tls_write (entry), ss_tls_read
 *               (entry) + ss_tls_read_ret (return). Key: (tgid, SSL *), so memory-BIO
 *               clients (asyncio) work too. The socket write a TLS request head causes
 *               links its fd to the SSL *, so closing that fd (a client timeout) ends
 *               the request without an answer, as for plaintext.
 *
 * What leaves the kernel (struct ss_event, SS_T_HTTP): method, Host value (48 bytes),
 * path up to '?' (64 bytes), status code and reason phrase (16 bytes), times, pid/tid,
 * comm, cgroup, connection key. Bytes are parsed in the probe from small stack buffers
 * (bpf_loop over at most 64 bytes at a time); no body, query string or other header is
 * copied anywhere, and raw bytes never sit in a map.
 *
 * The status parser keeps its position per connection, so a status line split across
 * reads (botocore reads the answer to "Expect: 100-continue" one byte at a time) parses.
 *
 * Emitted: every request answered >= 400 or not at all; a success when it took at least
 * SS_MIN_NS or when the same thread's previous answer was an error (the end of a retry
 * episode); other successes only feed the histogram. Retries are joined into episodes
 * in user space (analysis/http_episodes.py).
 *
 * Cost: a write of >= 16 bytes reads 8 user bytes and compares them; a read looks up
 * (tgid, fd) in a hash; a TLS write is one emulated uprobe, a TLS read an emulated
 * uprobe + uretprobe (bench/bench_http.py measures them).
 * Not covered: HTTP/2 (HPACK), requests whose head is split before the request line,
 * pipelined requests (the newest one on a connection wins).
 */
#include "common.bpf.h"

#define HTTP_CONNS 16384
#define HEAD_CHUNK 64
#define HEAD_CHUNKS 16          /* up to 1 KiB of a request head is scanned for Host */
#define STATUS_SCAN 64          /* bytes of one read fed to the status parser */
#define EPISODE_NS 600000000000ULL  /* a success within 10 min of an error ends an episode */
#define HOST_LEN SS_HTTP_HOST_LEN
#define URL_LEN SS_HTTP_PATH_LEN
#define REASON_LEN SS_HTTP_REASON_LEN

#define LINE_LEN 32             /* status line bytes kept: "HTTP/1.1 NNN " + the reason */
#define SHORT_READ 8            /* reads up to this long feed the status-line accumulator */
#define R_LINE 0                /* accumulating the status line */
#define R_SKIP 1                /* after a 1xx answer: skipping to the empty line */
#define ST_IDLE 0               /* answered (or not HTTP): reads are ignored */
#define ST_AWAIT 1              /* head written: parse the status line */

#define SS_S_IFMT 0170000
#define SS_S_IFSOCK 0140000

struct conn_key {
	u32 tgid;
	u32 tls;
	u64 id;                 /* fd, or the SSL * */
};

struct http_conn {
	u64 ts;                 /* head written */
	u32 tid;
	u8 op;
	u8 stage;
	u8 r_state;             /* status parser: R_LINE or R_SKIP */
	u8 r_len;               /* bytes of the status line so far */
	u16 status;
	u32 r_sr;               /* R_SKIP: the last 4 bytes */
	u32 hoff;               /* on_write: where the Host value starts */
	char line[LINE_LEN];    /* the status line so far (only the status line) */
	char host[HOST_LEN];
	char path[URL_LEN];
	char reason[REASON_LEN];
};
BPF_TABLE("lru_hash", struct conn_key, struct http_conn, conns, HTTP_CONNS);
BPF_PERCPU_ARRAY(conn_scratch, struct http_conn, 1);
/* tid -> time of the last error answer, so the success that ends a retry episode is kept */
BPF_TABLE("lru_hash", u32, u64, last_error, 4096);

/* a read in flight on a connection waiting for its status, by tid */
struct rd_slot {
	u32 tid;
	u32 tls;
	u64 id;
	u64 buf;
	u64 nread_ptr;          /* TLS: size_t *readbytes */
};
BPF_ARRAY(rd_plain, struct rd_slot, SS_INFLIGHT_SLOTS);
BPF_ARRAY(rd_tls, struct rd_slot, SS_INFLIGHT_SLOTS);

/* ------------------------------------------------------------------ request head */

/* method of a request head, 0 if the bytes do not start one; *skip = its length + 1 */
static __always_inline u8 method_of(const char *w, u32 *skip)
{
	u32 a = (u8)w[0] | (u8)w[1] << 8 | (u8)w[2] << 16 | (u32)(u8)w[3] << 24;
	if (a == 0x20544547) { *skip = 4; return SS_OP_HTTP_GET; }          /* "GET " */
	if (a == 0x20545550) { *skip = 4; return SS_OP_HTTP_PUT; }          /* "PUT " */
	if (a == 0x54534f50 && w[4] == ' ') { *skip = 5; return SS_OP_HTTP_POST; }
	if (a == 0x44414548 && w[4] == ' ') { *skip = 5; return SS_OP_HTTP_HEAD; }
	if (a == 0x454c4544 && w[4] == 'T' && w[5] == 'E' && w[6] == ' ') {
		*skip = 7; return SS_OP_HTTP_DELETE;
	}
	if (a == 0x43544150 && w[4] == 'H' && w[5] == ' ') { *skip = 6; return SS_OP_HTTP_PATCH; }
	if (a == 0x4954504f && w[4] == 'O' && w[5] == 'N' && w[6] == 'S') {
		*skip = 8; return SS_OP_HTTP_OPTIONS;
	}
	return 0;
}

static __always_inline int fd_is_socket(u64 fd)
{
	void *file = ss_fd_to_file(fd);
	if (!file)
		return 0;
	void *inode = 0;
	u16 mode = 0;
	ss_read(inode, file + OFF_FILE_INODE);
	if (inode)
		ss_read(mode, inode + OFF_INODE_MODE);
	return (mode & SS_S_IFMT) == SS_S_IFSOCK;
}

/* Copy up to N-1 bytes of src into dst, stopping at the first byte for which CUT holds
 * (the rest zeroed): the classified field, never the bytes after it. */
#define COPY_CUT(dst, src, N, lower, CUT)                                       \
	do {                                                                    \
		int cut = 0;                                                    \
		_Pragma("clang loop unroll(disable)")                           \
		for (int i = 0; i < (N) - 1; i++) {                             \
			char ch = (src)[i];                                     \
			if (CUT)                                                \
				cut = 1;                                        \
			if (lower && ch >= 'A' && ch <= 'Z')                    \
				ch += 32;                                       \
			(dst)[i] = cut ? 0 : ch;                                \
		}                                                               \
		(dst)[(N) - 1] = 0;                                             \
	} while (0)

/* Sets h->hoff to the offset just past "\nHost:" (any case) in the first
 * HEAD_CHUNKS * HEAD_CHUNK bytes of a head of len bytes; 0 if the head ends (empty line)
 * or the bytes run out first. A shift register of the last 8 bytes: a few ALU ops and
 * two compares per byte. The result goes to the map value, so every exit of the loop
 * leaves the same verifier state. */
static __always_inline void find_host(struct http_conn *h, const char *ubuf, u64 len)
{
	u64 sr = 0;
	char b[HEAD_CHUNK];
	h->hoff = 0;
#pragma clang loop unroll(disable)
	for (u32 base = 0; base < HEAD_CHUNKS * HEAD_CHUNK; base += HEAD_CHUNK) {
		if (base >= len)
			return;
		u32 n = len - base > HEAD_CHUNK ? HEAD_CHUNK : len - base;
		if (bpf_probe_read_user(b, n, ubuf + base))
			return;
#pragma clang loop unroll(disable)
		for (u32 i = 0; i < HEAD_CHUNK; i++) {
			if (i >= n)
				return;
			sr = (sr << 8) | (u8)b[i];
			if (((sr | 0x2020202000ULL) & 0xffffffffffffULL) == 0x0a686f73743aULL) {
				h->hoff = base + i + 1;
				return;
			}
			if ((sr & 0xffffffffULL) == 0x0d0a0d0aULL)
				return;
		}
	}
}

/* A write of len bytes at ubuf on connection (tls, id): a request head starts a request
 * (returns 1 then, else 0). */
static __always_inline int on_write(u32 tls, u64 id, const char *ubuf, u64 len, int check_sock)
{
	if (len < 16 || !ubuf)
		return 0;
	u64 pid_tgid = bpf_get_current_pid_tgid();
	if (!ss_wanted(pid_tgid))
		return 0;
	char w[8];
	if (bpf_probe_read_user(w, sizeof(w), ubuf))
		return 0;
	u32 skip = 0;
	u8 op = method_of(w, &skip);
	if (!op)
		return 0;
	if (check_sock && !fd_is_socket(id))
		return 0;
	int zero = 0;
	struct http_conn *h = conn_scratch.lookup(&zero);
	if (!h)
		return 0;
	char tmp[URL_LEN];
	__builtin_memset(tmp, 0, sizeof(tmp));
	u64 left = len - skip;
	bpf_probe_read_user(tmp, left > URL_LEN ? URL_LEN : left, ubuf + skip);
	COPY_CUT(h->path, tmp, URL_LEN, 0, ch == '?' || ch == ' ' || ch == '\r' || ch == '\n' || !ch);
	__builtin_memset(tmp, 0, HOST_LEN);
	find_host(h, ubuf, len);
	u64 hoff = h->hoff;
	if (hoff && hoff < len) {
		bpf_probe_read_user(tmp, 1, ubuf + hoff);
		hoff += tmp[0] == ' ' || tmp[0] == '\t';
		left = len - hoff;
		if (hoff < len)
			bpf_probe_read_user(tmp, left > HOST_LEN ? HOST_LEN : left, ubuf + hoff);
		else
			tmp[0] = 0;
	}
	COPY_CUT(h->host, tmp, HOST_LEN, 1, ch == '\r' || ch == '\n' || ch == ' ' || !ch);
	h->ts = bpf_ktime_get_ns();
	h->tid = (u32)pid_tgid;
	h->op = op;
	h->stage = ST_AWAIT;
	h->r_state = R_LINE;
	h->r_len = 0;
	h->status = 0;
	h->r_sr = 0;
	__builtin_memset(h->line, 0, LINE_LEN);
	__builtin_memset(h->reason, 0, REASON_LEN);
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = tls, .id = id };
	conns.update(&key, h);
	return 1;
}

/* ------------------------------------------------------------------ status line */

/* "HTTP/1.x NNN reason" in l: the status code, 0 if l is not such a line */
static __always_inline u16 parse_status(const char *l)
{
	if (l[0] != 'H' || l[1] != 'T' || l[2] != 'T' || l[3] != 'P' || l[4] != '/' || l[8] != ' ')
		return 0;
	if (l[9] < '0' || l[9] > '9' || l[10] < '0' || l[10] > '9' || l[11] < '0' || l[11] > '9')
		return 0;
	return (l[9] - '0') * 100 + (l[10] - '0') * 10 + (l[11] - '0');
}

/* A whole status line is in l (stack or the connection's accumulator): take its code and
 * reason. Returns 1 for a final answer, 0 for 1xx (its headers are skipped next), -1 if
 * it is not a status line. */
static __always_inline int take_status(struct http_conn *h, const char *l)
{
	u16 st = parse_status(l);
	if (!st)
		return -1;
	h->status = st;
	COPY_CUT(h->reason, l + 13, REASON_LEN, 0, ch == '\r' || ch == '\n' || !ch);
	if (st >= 200)
		return 1;
	h->r_state = R_SKIP;
	h->r_sr = 0x0d0a;
	h->r_len = 0;
	return 0;
}

static __always_inline void emit(struct http_conn *h, struct conn_key *key, u64 now, u8 flags)
{
	u64 dur = now - h->ts;
	u32 tid = h->tid;
	u16 status = (flags & SS_F_HTTP_NOANSWER) ? 0 : h->status;
	int keep = status >= 400 || status == 0 || dur >= SS_MIN_NS;
	if (status >= 400 || status == 0) {
		last_error.update(&tid, &now);
	} else {
		u64 *t = last_error.lookup(&tid);
		if (t) {
			if (now - *t < EPISODE_NS)
				keep = 1;             /* the answer that ends a retry episode */
			last_error.delete(&tid);
		}
	}
	if (!keep) {
		ss_hist_add(h->op, dur);
		ss_count(SS_C_BELOW);
		return;
	}
	struct ss_event *e = ss_reserve();
	if (!e)
		return;
	ss_init(e, SS_T_HTTP, h->op);
	e->ts_ns = h->ts;
	e->dur_ns = dur;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ret = status;
	e->key = key->id;
	e->pid = key->tgid;
	e->tid = tid;
	e->flags = flags | (key->tls ? SS_F_HTTP_TLS : 0);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__builtin_memcpy(e->path, h->host, HOST_LEN);
	__builtin_memcpy(e->path + SS_HTTP_PATH_OFF, h->path, URL_LEN);
	__builtin_memcpy(e->path + SS_HTTP_REASON_OFF, h->reason, REASON_LEN);
	ss_submit(e);
}

/* n bytes were read at ubuf on a connection waiting for its status. Three cases:
 *  - the status line starts the read (buffered clients): parsed from the stack, at once;
 *  - short reads (botocore reads the answer to Expect: 100-continue byte by byte): up to
 *    SHORT_READ bytes a read are added to the connection's status-line accumulator, which
 *    is parsed when its line ends;
 *  - after a 1xx answer: its header lines are skipped up to the empty line (a shift
 *    register of the last 4 bytes), then the next status line is awaited.
 * A read that holds a 1xx answer and more is taken as far as the 1xx line; a read that
 * then starts with "HTTP/" starts the next answer. */
static __always_inline void on_read(struct conn_key *key, const char *ubuf, long n)
{
	struct http_conn *h = conns.lookup(key);
	if (!h || h->stage != ST_AWAIT)
		return;
	u64 now = bpf_ktime_get_ns();
	if (n == 0) {                         /* the server closed the connection */
		h->stage = ST_IDLE;
		emit(h, key, now, SS_F_HTTP_NOANSWER);
		return;
	}
	if (n < 0)
		return;
	char b[LINE_LEN];
	__builtin_memset(b, 0, sizeof(b));
	u32 len = n > LINE_LEN ? LINE_LEN : n;
	if (bpf_probe_read_user(b, len, ubuf))
		return;
	int r = 0;
	if (h->r_state == R_SKIP && len >= 13 && b[0] == 'H' && b[1] == 'T' && b[2] == 'T' &&
	    b[3] == 'P' && b[4] == '/') {
		h->r_state = R_LINE;              /* a read that starts the next answer: the rest of */
		h->r_len = 0;                     /* the 1xx answer came with the 1xx line */
	}
	if (h->r_state == R_SKIP) {
		u32 sr = h->r_sr;
#pragma unroll
		for (int k = 0; k < SHORT_READ; k++) {
			if (k < len && sr != 0x0d0a0d0a)
				sr = (sr << 8) | (u8)b[k];
		}
		h->r_sr = sr;
		if (sr == 0x0d0a0d0a) {
			h->r_state = R_LINE;      /* the empty line: the next answer begins */
			h->r_len = 0;
		}
		return;
	}
	if (h->r_len == 0 && len >= 13 && b[0] == 'H') {
		r = take_status(h, b);
	} else if (len <= SHORT_READ) {
		u8 at = h->r_len;
		int eol = 0;
#pragma unroll
		for (int k = 0; k < SHORT_READ; k++) {
			if (k < len && !eol) {
				char ch = b[k];
				if (ch == '\n' || at >= LINE_LEN - 1)
					eol = 1;
				else {
					u32 idx = at;
					asm volatile("" : "+r"(idx));   /* keep the mask for the verifier */
					h->line[idx & (LINE_LEN - 1)] = ch;
					at++;
				}
			}
		}
		h->r_len = at;
		if (!eol) {
			if (at >= 5 && parse_status(h->line) == 0 &&
			    (h->line[0] != 'H' || h->line[4] != '/'))
				r = -1;           /* five bytes in and still not "HTTP/" */
			else
				return;
		} else {
			r = take_status(h, h->line);
		}
	} else {
		r = -1;
	}
	if (r < 0) {
		h->stage = ST_IDLE;                /* not HTTP/1.x after all */
	} else if (r > 0) {
		h->stage = ST_IDLE;
		emit(h, key, now, 0);
	}
}

/* ------------------------------------------------------------------ plaintext */

static __always_inline struct rd_slot *slot_of(void *arr, u32 tid)
{
	int idx = tid & (SS_INFLIGHT_SLOTS - 1);
	return bpf_map_lookup_elem(arr, &idx);
}

static __always_inline int plain_read_enter(u64 fd, u64 buf)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 0, .id = fd };
	struct http_conn *h = conns.lookup(&key);
	if (!h || h->stage != ST_AWAIT)
		return 0;
	int idx = (u32)pid_tgid & (SS_INFLIGHT_SLOTS - 1);
	struct rd_slot *s = rd_plain.lookup(&idx);
	if (!s)
		return 0;
	s->tid = (u32)pid_tgid;
	s->tls = 0;
	s->id = fd;
	s->buf = buf;
	return 0;
}

static __always_inline int plain_read_exit(long ret)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tid = (u32)pid_tgid;
	int idx = tid & (SS_INFLIGHT_SLOTS - 1);
	struct rd_slot *s = rd_plain.lookup(&idx);
	if (!s || s->tid != tid || !s->buf)
		return 0;
	u64 buf = s->buf;
	s->buf = 0;
	if (ret == -11 || ret == -4)          /* EAGAIN, EINTR: nothing read yet */
		return 0;
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 0, .id = s->id };
	on_read(&key, (const char *)buf, ret);
	return 0;
}

struct iovec_user {
	u64 base;
	u64 len;
};

static __always_inline u64 first_iov(const void *vec, u64 *len)
{
	struct iovec_user v = {};
	if (!vec || bpf_probe_read_user(&v, sizeof(v), vec))
		return 0;
	*len = v.len;
	return v.base;
}

static __always_inline u64 msg_iov(const void *msg, u64 *len)
{
	u64 iov = 0;
	if (!msg || bpf_probe_read_user(&iov, sizeof(iov), msg + 16))   /* user_msghdr.msg_iov */
		return 0;
	return first_iov((const void *)iov, len);
}

/* ------------------------------------------------------------------ TLS socket link
 *
 * A TLS request is keyed by its SSL *, but a client that gives up on it (a timeout)
 * closes the socket, not the SSL. So the first socket write a thread makes after a TLS
 * request head (the encrypted head itself, sent from inside SSL_write) links that
 * socket's fd to the SSL *; closing the fd then ends the TLS request without an answer,
 * as it does a plaintext one. Memory-BIO clients (asyncio) link too when the event loop
 * sends the record from the same thread, which it does at once while the socket is
 * writable. Cost for other writes: one array lookup (the thread's pending slot). */
#ifdef SS_HTTP_TLS
#define TLS_LINK_NS 1000000000ULL   /* a head's socket write comes within this, or never */
struct tls_pending {
	u32 tid;
	u32 pad;
	u64 ssl;
	u64 ts;
};
BPF_ARRAY(tls_wr, struct tls_pending, SS_INFLIGHT_SLOTS);
/* (tgid, 0, fd) -> the SSL * whose request head went out on that socket */
BPF_TABLE("lru_hash", struct conn_key, u64, tls_fds, HTTP_CONNS);

static __always_inline void tls_link(u64 fd, int check_sock)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	int idx = (u32)pid_tgid & (SS_INFLIGHT_SLOTS - 1);
	struct tls_pending *p = tls_wr.lookup(&idx);
	if (!p || !p->ssl || p->tid != (u32)pid_tgid)
		return;
	u64 ssl = p->ssl;
	p->ssl = 0;
	if (bpf_ktime_get_ns() - p->ts > TLS_LINK_NS)
		return;
	if (check_sock && !fd_is_socket(fd))
		return;
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 0, .id = fd };
	tls_fds.update(&key, &ssl);
}

/* the fd is closing: its TLS request, if one still waits, got no answer */
static __always_inline void tls_close(struct conn_key *fdkey, u64 now)
{
	u64 *ssl = tls_fds.lookup(fdkey);
	if (!ssl)
		return;
	struct conn_key key = { .tgid = fdkey->tgid, .tls = 1, .id = *ssl };
	tls_fds.delete(fdkey);
	struct http_conn *h = conns.lookup(&key);
	if (!h)
		return;
	if (h->stage == ST_AWAIT)
		emit(h, &key, now, SS_F_HTTP_NOANSWER);
	conns.delete(&key);
}
#else
static __always_inline void tls_link(u64 fd, int check_sock) {}
static __always_inline void tls_close(struct conn_key *fdkey, u64 now) {}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
	tls_link(args->fd, 1);
	return on_write(0, args->fd, args->buf, args->count, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
	tls_link(args->fd, 0);
	return on_write(0, args->fd, args->buff, args->len, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_writev)
{
	u64 len = 0;
	tls_link(args->fd, 1);
	u64 base = first_iov(args->vec, &len);
	return on_write(0, args->fd, (const char *)base, len, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
	u64 len = 0;
	tls_link(args->fd, 0);
	u64 base = msg_iov(args->msg, &len);
	return on_write(0, args->fd, (const char *)base, len, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return plain_read_enter(args->fd, (u64)args->buf); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return plain_read_enter(args->fd, (u64)args->ubuf); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
	u64 len = 0;
	return plain_read_enter(args->fd, first_iov(args->vec, &len));
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{
	u64 len = 0;
	return plain_read_enter(args->fd, msg_iov(args->msg, &len));
}
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return plain_read_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return plain_read_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return plain_read_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return plain_read_exit(args->ret); }

/* the client gave up (a timeout) or is done with the connection */
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 0, .id = args->fd };
	tls_close(&key, bpf_ktime_get_ns());
	struct http_conn *h = conns.lookup(&key);
	if (!h)
		return 0;
	if (h->stage == ST_AWAIT)
		emit(h, &key, bpf_ktime_get_ns(), SS_F_HTTP_NOANSWER);
	conns.delete(&key);
	return 0;
}

/* ------------------------------------------------------------------ TLS (libssl) */

#ifdef SS_HTTP_TLS

/* ssl_write_internal(SSL *s, const void *buf, size_t num, ...) */
int ss_tls_write(struct pt_regs *ctx)
{
	u64 ssl = PT_REGS_PARM1(ctx);
	if (!on_write(1, ssl, (const char *)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), 0))
		return 0;
	u64 pid_tgid = bpf_get_current_pid_tgid();    /* a request head: link its socket (above) */
	int idx = (u32)pid_tgid & (SS_INFLIGHT_SLOTS - 1);
	struct tls_pending *p = tls_wr.lookup(&idx);
	if (p) {
		p->tid = (u32)pid_tgid;
		p->ssl = ssl;
		p->ts = bpf_ktime_get_ns();
	}
	return 0;
}

/* ssl_read_internal(SSL *s, void *buf, size_t num, size_t *readbytes) */
int ss_tls_read(struct pt_regs *ctx)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 1, .id = PT_REGS_PARM1(ctx) };
	struct http_conn *h = conns.lookup(&key);
	if (!h || h->stage != ST_AWAIT)
		return 0;
	int idx = (u32)pid_tgid & (SS_INFLIGHT_SLOTS - 1);
	struct rd_slot *s = rd_tls.lookup(&idx);
	if (!s)
		return 0;
	s->tid = (u32)pid_tgid;
	s->tls = 1;
	s->id = key.id;
	s->buf = PT_REGS_PARM2(ctx);
	s->nread_ptr = PT_REGS_PARM4(ctx);
	return 0;
}

int ss_tls_read_ret(struct pt_regs *ctx)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tid = (u32)pid_tgid;
	int idx = tid & (SS_INFLIGHT_SLOTS - 1);
	struct rd_slot *s = rd_tls.lookup(&idx);
	if (!s || s->tid != tid || !s->buf)
		return 0;
	u64 buf = s->buf;
	s->buf = 0;
	int rc = PT_REGS_RC(ctx);
	if (rc <= 0)
		return 0;                         /* WANT_READ, error or close_notify: no bytes */
	u64 n = 0;
	if (bpf_probe_read_user(&n, sizeof(n), (void *)s->nread_ptr) || !n)
		return 0;
	struct conn_key key = { .tgid = pid_tgid >> 32, .tls = 1, .id = s->id };
	on_read(&key, (const char *)buf, n > 0x7fffffff ? 0x7fffffff : (long)n);
	return 0;
}

#endif
