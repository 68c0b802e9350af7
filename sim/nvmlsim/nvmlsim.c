/* nvmlsim.c: a simulated libnvidia-ml.so.1 for machines without an NVIDIA GPU.
 *
 * It exports the NVML C functions stallscope's tracer calls (through the real
 * pynvml bindings), with NVML's own types, struct layouts and return codes, so
 * the tracer code that runs here is the code that runs on a GPU node.
 *
 * Utilization follows what a workload does.  Workload processes write "kernel
 * running" spans and compute pids into a shared, mmap'ed state file
 * (sim/nvmlsim/__init__.py is the writer side); this library reads it.  On
 * each query the library turns the spans into one utilization sample per
 * sample period, as the driver does: util = percent of the period covered by
 * the union of the spans, timestamp = wall-clock microseconds at the end of
 * the period.  Samples are computed once per period and kept in a bounded ring
 * (the driver's GPU_UTILIZATION buffer holds 100), so a late span cannot
 * rewrite a sample that was already reported.
 *
 * Cross-process safety: every access to the state file holds flock() on it
 * (writers take it too) plus a mutex for threads of this process.
 *
 * Not simulated: memory/encoder/decoder utilization, power, clocks, MIG,
 * events, accounting, per-process utilization.  See README.md.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* ---- NVML types (the subset used here, as declared by nvml.h) ---------- */

typedef enum nvmlReturn_enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_NOT_SUPPORTED = 3,
	NVML_ERROR_NO_PERMISSION = 4,
	NVML_ERROR_ALREADY_INITIALIZED = 5,
	NVML_ERROR_NOT_FOUND = 6,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_INSUFFICIENT_POWER = 8,
	NVML_ERROR_DRIVER_NOT_LOADED = 9,
	NVML_ERROR_TIMEOUT = 10,
	NVML_ERROR_IRQ_ISSUE = 11,
	NVML_ERROR_LIBRARY_NOT_FOUND = 12,
	NVML_ERROR_FUNCTION_NOT_FOUND = 13,
	NVML_ERROR_CORRUPTED_INFOROM = 14,
	NVML_ERROR_GPU_IS_LOST = 15,
	NVML_ERROR_RESET_REQUIRED = 16,
	NVML_ERROR_OPERATING_SYSTEM = 17,
	NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
	NVML_ERROR_IN_USE = 19,
	NVML_ERROR_MEMORY = 20,
	NVML_ERROR_NO_DATA = 21,
	NVML_ERROR_UNKNOWN = 999,
} nvmlReturn_t;

typedef struct nvmlDevice_st *nvmlDevice_t;

typedef enum nvmlSamplingType_enum {
	NVML_TOTAL_POWER_SAMPLES = 0,
	NVML_GPU_UTILIZATION_SAMPLES = 1,
	NVML_SAMPLINGTYPE_COUNT = 10,
} nvmlSamplingType_t;

typedef enum nvmlValueType_enum {
	NVML_VALUE_TYPE_DOUBLE = 0,
	NVML_VALUE_TYPE_UNSIGNED_INT = 1,
} nvmlValueType_t;

typedef union nvmlValue_st {
	double dVal;
	int siVal;
	unsigned int uiVal;
	unsigned long ulVal;
	unsigned long long ullVal;
	signed long long sllVal;
	unsigned short usVal;
} nvmlValue_t;

typedef struct nvmlSample_st {
	unsigned long long timeStamp; /* CPU timestamp, microseconds */
	nvmlValue_t sampleValue;
} nvmlSample_t;

typedef struct nvmlUtilization_st {
	unsigned int gpu;
	unsigned int memory;
} nvmlUtilization_t;

typedef struct nvmlProcessInfo_v1_st {
	unsigned int pid;
	unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct nvmlProcessInfo_v2_st {
	unsigned int pid;
	unsigned long long usedGpuMemory;
	unsigned int gpuInstanceId;     /* 0xFFFFFFFF without MIG */
	unsigned int computeInstanceId; /* 0xFFFFFFFF without MIG */
} nvmlProcessInfo_v2_t, nvmlProcessInfo_t;

#define NVML_NO_MIG_ID 0xFFFFFFFFu

/* ---- the state file: shared with sim/nvmlsim/__init__.py ------------ */
/* Any layout change: bump NVMLSIM_VERSION and mirror it in __init__.py;
 * tests/unit/test_nvml.py checks both sides agree through nvmlsim_abi. */

#define NVMLSIM_MAGIC "NVMLSIM"
#define NVMLSIM_VERSION 1
#define NVMLSIM_MAX_GPUS 16
#define NVMLSIM_MAX_PROCS 64
#define NVMLSIM_MAX_OPEN 16
#define NVMLSIM_MAX_SPANS 4096
#define NVMLSIM_MAX_SAMPLES 128
#define NVMLSIM_STR 96
#define NVMLSIM_DRIVER_STR 80

#define NVMLSIM_GPU_LOST (1u << 0)       /* every query: NVML_ERROR_GPU_IS_LOST */
#define NVMLSIM_GPU_NO_SAMPLES (1u << 1) /* nvmlDeviceGetSamples: NOT_SUPPORTED */

struct nvmlsim_header {
	char magic[8];             /* "NVMLSIM\0" */
	uint32_t version;          /* NVMLSIM_VERSION */
	uint32_t n_gpus;
	uint64_t period_us;        /* sample period; period ends are multiples of it */
	uint64_t created_ns;       /* wall clock */
	uint32_t history;          /* samples the buffer keeps (<= NVMLSIM_MAX_SAMPLES) */
	uint32_t idle_quiet_ms;    /* 0: idle periods give 0% samples; >0: no samples after this long idle */
	char driver_version[NVMLSIM_DRIVER_STR];
	uint8_t reserved[136];
};

struct nvmlsim_span {
	uint64_t start_ns;         /* wall clock */
	uint64_t end_ns;
};

struct nvmlsim_open {
	uint64_t start_ns;         /* 0: slot free */
	uint32_t pid;              /* owner: ignored once it has exited */
	uint32_t pad;
};

struct nvmlsim_proc {
	uint32_t pid;              /* 0: slot free */
	uint32_t pad;
	uint64_t used_bytes;
};

struct nvmlsim_sample {
	uint64_t ts_us;
	uint32_t util;
	uint32_t pad;
};

struct nvmlsim_gpu {
	char name[NVMLSIM_STR];
	char uuid[NVMLSIM_STR];
	uint32_t flags;            /* NVMLSIM_GPU_* */
	uint32_t last_util;        /* util of the newest complete period (quiet or not) */
	uint64_t span_count;       /* spans ever written; slot = count % NVMLSIM_MAX_SPANS */
	uint64_t next_end_us;      /* end of the next period to turn into a sample; 0 = not started */
	uint64_t last_busy_ns;     /* end of the newest busy time seen by the sampler */
	uint64_t sample_count;     /* samples ever stored; slot = count % NVMLSIM_MAX_SAMPLES */
	struct nvmlsim_open open[NVMLSIM_MAX_OPEN];
	struct nvmlsim_proc procs[NVMLSIM_MAX_PROCS];
	struct nvmlsim_span spans[NVMLSIM_MAX_SPANS];
	struct nvmlsim_sample samples[NVMLSIM_MAX_SAMPLES];
};

_Static_assert(sizeof(struct nvmlsim_header) == 256, "header layout");
_Static_assert(sizeof(struct nvmlsim_gpu) % 8 == 0, "gpu layout");

/* Layout facts for the Python writer's self-check. */
API const uint64_t nvmlsim_abi[] = {
	NVMLSIM_VERSION,
	sizeof(struct nvmlsim_header),
	sizeof(struct nvmlsim_gpu),
	offsetof(struct nvmlsim_gpu, flags),
	offsetof(struct nvmlsim_gpu, span_count),
	offsetof(struct nvmlsim_gpu, open),
	offsetof(struct nvmlsim_gpu, procs),
	offsetof(struct nvmlsim_gpu, spans),
	offsetof(struct nvmlsim_gpu, samples),
	NVMLSIM_MAX_GPUS, NVMLSIM_MAX_PROCS, NVMLSIM_MAX_OPEN, NVMLSIM_MAX_SPANS,
	NVMLSIM_MAX_SAMPLES,
};

/* ---- library state ------------------------------------------------------ */

struct nvmlDevice_st {
	unsigned int index;
};

static pthread_mutex_t lib_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned int refcount;
static int state_fd = -1;
static size_t state_len;
static struct nvmlsim_header *hdr;
static struct nvmlDevice_st devices[NVMLSIM_MAX_GPUS];

static const char *default_state_path = "/run/stallscope/nvmlsim.state";

static void debug(const char *fmt, const char *arg)
{
	const char *d = getenv("STALLSCOPE_NVMLSIM_DEBUG");

	if (d && *d && strcmp(d, "0") != 0) {
		fputs("nvmlsim: ", stderr);
		fprintf(stderr, fmt, arg);
		fputc('\n', stderr);
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct nvmlsim_gpu *gpu_at(unsigned int i)
{
	return (struct nvmlsim_gpu *)((char *)hdr + sizeof(*hdr)) + i;
}

static int pid_alive(uint32_t pid)
{
	return pid != 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM);
}

/* Takes the thread mutex and the file lock; returns non-zero when NVML is
 * not initialized (nothing is held then). */
static int lock_state(void)
{
	pthread_mutex_lock(&lib_mu);
	if (!hdr) {
		pthread_mutex_unlock(&lib_mu);
		return 1;
	}
	while (flock(state_fd, LOCK_EX) != 0 && errno == EINTR)
		;
	return 0;
}

static void unlock_state(void)
{
	flock(state_fd, LOCK_UN);
	pthread_mutex_unlock(&lib_mu);
}

/* Resolves a handle under the lock.  On success the lock is held. */
static nvmlReturn_t enter_device(nvmlDevice_t dev, struct nvmlsim_gpu **g)
{
	uintptr_t a = (uintptr_t)dev, lo = (uintptr_t)devices;

	if (lock_state())
		return NVML_ERROR_UNINITIALIZED;
	if (a < lo || a >= lo + sizeof(devices) || (a - lo) % sizeof(devices[0]) ||
	    dev->index >= hdr->n_gpus) {
		unlock_state();
		return NVML_ERROR_INVALID_ARGUMENT;
	}
	*g = gpu_at(dev->index);
	if ((*g)->flags & NVMLSIM_GPU_LOST) {
		unlock_state();
		return NVML_ERROR_GPU_IS_LOST;
	}
	return NVML_SUCCESS;
}

/* ---- spans -> samples ---------------------------------------------------- */

static struct nvmlsim_span ivs[NVMLSIM_MAX_SPANS + NVMLSIM_MAX_OPEN];

static int cmp_span(const void *a, const void *b)
{
	const struct nvmlsim_span *x = a, *y = b;

	return (x->start_ns > y->start_ns) - (x->start_ns < y->start_ns);
}

/* Turns every period that has ended since the last call into a sample. */
static void materialize(struct nvmlsim_gpu *g, uint64_t t_ns)
{
	uint64_t p_us = hdr->period_us, p_ns = p_us * 1000;
	uint64_t last_end = (t_ns / 1000) / p_us * p_us; /* newest complete period */
	uint64_t hist = hdr->history, first, lo, hi, quiet_ns, e;
	uint64_t nspans, i;
	size_t n = 0, m = 0, j = 0;

	if (g->next_end_us == 0) /* first query: start at the state's creation */
		g->next_end_us = (hdr->created_ns / 1000) / p_us * p_us + p_us;
	first = g->next_end_us;
	if (first > last_end)
		return;
	if ((last_end - first) / p_us + 1 > hist)  /* older ones would fall off anyway */
		first = last_end - (hist - 1) * p_us;
	lo = (first - p_us) * 1000;
	hi = last_end * 1000;

	/* Gather the spans that touch [lo, hi), clip, sort and merge them. */
	nspans = g->span_count < NVMLSIM_MAX_SPANS ? g->span_count : NVMLSIM_MAX_SPANS;
	for (i = 0; i < nspans; i++) {
		struct nvmlsim_span s = g->spans[i];

		if (s.end_ns > lo && s.start_ns < hi && s.end_ns > s.start_ns)
			ivs[n++] = s;
	}
	for (i = 0; i < NVMLSIM_MAX_OPEN; i++) {
		struct nvmlsim_open o = g->open[i];

		if (o.start_ns && o.start_ns < hi && pid_alive(o.pid)) {
			ivs[n].start_ns = o.start_ns;
			ivs[n++].end_ns = t_ns;
		}
	}
	qsort(ivs, n, sizeof(ivs[0]), cmp_span);
	for (i = 0; i < n; i++) {
		if (m && ivs[i].start_ns <= ivs[m - 1].end_ns) {
			if (ivs[i].end_ns > ivs[m - 1].end_ns)
				ivs[m - 1].end_ns = ivs[i].end_ns;
		} else {
			ivs[m++] = ivs[i];
		}
	}

	quiet_ns = (uint64_t)hdr->idle_quiet_ms * 1000000ull;
	if (g->last_busy_ns < hdr->created_ns)
		g->last_busy_ns = hdr->created_ns;
	for (e = first; e <= last_end; e += p_us) {
		uint64_t ps = (e - p_us) * 1000, pe = e * 1000, busy = 0, util;
		size_t k;

		while (j < m && ivs[j].end_ns <= ps)
			j++;
		for (k = j; k < m && ivs[k].start_ns < pe; k++) {
			uint64_t s = ivs[k].start_ns > ps ? ivs[k].start_ns : ps;
			uint64_t f = ivs[k].end_ns < pe ? ivs[k].end_ns : pe;

			if (f > s) {
				busy += f - s;
				if (f > g->last_busy_ns)
					g->last_busy_ns = f;
			}
		}
		util = (busy * 100 + p_ns / 2) / p_ns;
		if (util > 100)
			util = 100;
		g->last_util = (uint32_t)util;
		if (util == 0 && quiet_ns && pe >= g->last_busy_ns + quiet_ns)
			continue; /* an idle GPU's buffer runs dry */
		g->samples[g->sample_count % NVMLSIM_MAX_SAMPLES] =
			(struct nvmlsim_sample){ .ts_us = e, .util = (uint32_t)util };
		g->sample_count++;
	}
	g->next_end_us = last_end + p_us;
}

/* ---- initialization ----------------------------------------------------- */

static nvmlReturn_t map_state(void)
{
	const char *path = getenv("STALLSCOPE_NVMLSIM_STATE");
	struct stat st;
	void *p;
	int fd;

	if (!path || !*path)
		path = default_state_path;
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		debug("cannot open state file %s (driver not loaded)", path);
		return errno == EACCES ? NVML_ERROR_NO_PERMISSION : NVML_ERROR_DRIVER_NOT_LOADED;
	}
	if (fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(struct nvmlsim_header)) {
		debug("state file %s is truncated", path);
		close(fd);
		return NVML_ERROR_UNKNOWN;
	}
	p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		close(fd);
		return NVML_ERROR_MEMORY;
	}
	hdr = p;
	if (memcmp(hdr->magic, NVMLSIM_MAGIC, sizeof(NVMLSIM_MAGIC)) != 0 ||
	    hdr->n_gpus > NVMLSIM_MAX_GPUS || hdr->period_us == 0 ||
	    hdr->history == 0 || hdr->history > NVMLSIM_MAX_SAMPLES ||
	    (size_t)st.st_size < sizeof(*hdr) + hdr->n_gpus * sizeof(struct nvmlsim_gpu)) {
		debug("state file %s is not a valid nvmlsim state", path);
		munmap(p, (size_t)st.st_size);
		hdr = NULL;
		close(fd);
		return NVML_ERROR_UNKNOWN;
	}
	if (hdr->version != NVMLSIM_VERSION) {
		debug("state file %s has another layout version", path);
		munmap(p, (size_t)st.st_size);
		hdr = NULL;
		close(fd);
		return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
	}
	state_fd = fd;
	state_len = (size_t)st.st_size;
	for (unsigned int i = 0; i < NVMLSIM_MAX_GPUS; i++)
		devices[i].index = i;
	return NVML_SUCCESS;
}

API nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
	nvmlReturn_t r = NVML_SUCCESS;

	(void)flags; /* NO_GPUS / NO_ATTACH change nothing for a simulated driver */
	pthread_mutex_lock(&lib_mu);
	if (refcount == 0)
		r = map_state();
	if (r == NVML_SUCCESS)
		refcount++;
	pthread_mutex_unlock(&lib_mu);
	return r;
}

API nvmlReturn_t nvmlInit_v2(void)
{
	return nvmlInitWithFlags(0);
}

API nvmlReturn_t nvmlShutdown(void)
{
	pthread_mutex_lock(&lib_mu);
	/* Like NVML: extra shutdowns are not an error. */
	if (refcount > 0 && --refcount == 0) {
		munmap(hdr, state_len);
		close(state_fd);
		hdr = NULL;
		state_fd = -1;
	}
	pthread_mutex_unlock(&lib_mu);
	return NVML_SUCCESS;
}

API const char *nvmlErrorString(nvmlReturn_t result)
{
	switch (result) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
	case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
	case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
	case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
	case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
	case NVML_ERROR_NOT_FOUND: return "Not Found";
	case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
	case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
	case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
	case NVML_ERROR_TIMEOUT: return "Timeout";
	case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
	case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
	case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
	case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
	case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
	case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
	case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
	case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
	case NVML_ERROR_IN_USE: return "In use by another client";
	case NVML_ERROR_MEMORY: return "Insufficient Memory";
	case NVML_ERROR_NO_DATA: return "No data";
	default: return "Unknown Error";
	}
}

/* ---- system queries ----------------------------------------------------- */

static nvmlReturn_t copy_str(char *dst, unsigned int length, const char *src, size_t max)
{
	size_t n = strnlen(src, max - 1);

	if (!dst)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (length < n + 1)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	memcpy(dst, src, n);
	dst[n] = '\0';
	return NVML_SUCCESS;
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
	nvmlReturn_t r;

	if (lock_state())
		return NVML_ERROR_UNINITIALIZED;
	r = copy_str(version, length, hdr->driver_version, sizeof(hdr->driver_version));
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
	/* Works before nvmlInit, as in NVML. */
	return copy_str(version, length, "nvmlsim-1", 80);
}

/* ---- device queries ----------------------------------------------------- */

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
	if (lock_state())
		return NVML_ERROR_UNINITIALIZED;
	if (!deviceCount) {
		unlock_state();
		return NVML_ERROR_INVALID_ARGUMENT;
	}
	*deviceCount = hdr->n_gpus;
	unlock_state();
	return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
	nvmlReturn_t r = NVML_SUCCESS;

	if (lock_state())
		return NVML_ERROR_UNINITIALIZED;
	if (!device || index >= hdr->n_gpus)
		r = NVML_ERROR_INVALID_ARGUMENT;
	else if (gpu_at(index)->flags & NVMLSIM_GPU_LOST)
		r = NVML_ERROR_GPU_IS_LOST;
	else
		*device = &devices[index];
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
	struct nvmlsim_gpu *g;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	if (!index)
		r = NVML_ERROR_INVALID_ARGUMENT;
	else
		*index = device->index;
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
	struct nvmlsim_gpu *g;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	r = copy_str(uuid, length, g->uuid, sizeof(g->uuid));
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
	struct nvmlsim_gpu *g;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	r = copy_str(name, length, g->name, sizeof(g->name));
	unlock_state();
	return r;
}

/* The driver's contract, which this follows: samples == NULL asks for the
 * buffer size (the capacity, not the number of new samples);
 * NVML_ERROR_NOT_FOUND when no sample is newer than lastSeenTimeStamp;
 * otherwise fills up to *sampleCount samples, oldest first, and sets
 * *sampleCount to the number written. */
API nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t device, nvmlSamplingType_t type,
				      unsigned long long lastSeenTimeStamp,
				      nvmlValueType_t *sampleValType, unsigned int *sampleCount,
				      nvmlSample_t *samples)
{
	struct nvmlsim_gpu *g;
	uint64_t avail, i, n_new = 0, first_new = 0;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	if (!sampleCount || (samples && *sampleCount == 0) ||
	    (unsigned int)type >= NVML_SAMPLINGTYPE_COUNT) {
		r = NVML_ERROR_INVALID_ARGUMENT;
		goto out;
	}
	if (type != NVML_GPU_UTILIZATION_SAMPLES || (g->flags & NVMLSIM_GPU_NO_SAMPLES)) {
		r = NVML_ERROR_NOT_SUPPORTED;
		goto out;
	}
	materialize(g, now_ns());
	avail = g->sample_count < hdr->history ? g->sample_count : hdr->history;
	for (i = g->sample_count - avail; i < g->sample_count; i++) {
		if (g->samples[i % NVMLSIM_MAX_SAMPLES].ts_us > lastSeenTimeStamp) {
			if (n_new++ == 0)
				first_new = i;
		}
	}
	if (n_new == 0) {
		r = NVML_ERROR_NOT_FOUND;
		goto out;
	}
	if (sampleValType)
		*sampleValType = NVML_VALUE_TYPE_UNSIGNED_INT;
	if (!samples) {
		*sampleCount = hdr->history;
		goto out;
	}
	if (n_new > *sampleCount)
		n_new = *sampleCount;
	for (i = 0; i < n_new; i++) {
		struct nvmlsim_sample s = g->samples[(first_new + i) % NVMLSIM_MAX_SAMPLES];

		memset(&samples[i], 0, sizeof(samples[i]));
		samples[i].timeStamp = s.ts_us;
		samples[i].sampleValue.uiVal = s.util;
	}
	*sampleCount = (unsigned int)n_new;
out:
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
	struct nvmlsim_gpu *g;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	if (!utilization) {
		r = NVML_ERROR_INVALID_ARGUMENT;
	} else {
		materialize(g, now_ns());
		utilization->gpu = g->last_util;
		utilization->memory = 0; /* not simulated */
	}
	unlock_state();
	return r;
}

/* Shared by the three ABI versions: call with *infoCount == 0 to learn the
 * count (NVML_ERROR_INSUFFICIENT_SIZE, or NVML_SUCCESS when there are none). */
static nvmlReturn_t running_procs(nvmlDevice_t device, unsigned int *infoCount, void *infos, int v1)
{
	struct nvmlsim_gpu *g;
	struct nvmlsim_proc live[NVMLSIM_MAX_PROCS];
	unsigned int n = 0, i;
	nvmlReturn_t r = enter_device(device, &g);

	if (r != NVML_SUCCESS)
		return r;
	if (!infoCount) {
		r = NVML_ERROR_INVALID_ARGUMENT;
		goto out;
	}
	for (i = 0; i < NVMLSIM_MAX_PROCS; i++) /* a process's context dies with it */
		if (pid_alive(g->procs[i].pid))
			live[n++] = g->procs[i];
	if (*infoCount < n) {
		*infoCount = n;
		r = NVML_ERROR_INSUFFICIENT_SIZE;
		goto out;
	}
	if (n && !infos) {
		r = NVML_ERROR_INVALID_ARGUMENT;
		goto out;
	}
	for (i = 0; i < n; i++) {
		if (v1) {
			nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)infos + i;

			memset(p, 0, sizeof(*p));
			p->pid = live[i].pid;
			p->usedGpuMemory = live[i].used_bytes;
		} else {
			nvmlProcessInfo_v2_t *p = (nvmlProcessInfo_v2_t *)infos + i;

			memset(p, 0, sizeof(*p));
			p->pid = live[i].pid;
			p->usedGpuMemory = live[i].used_bytes;
			p->gpuInstanceId = NVML_NO_MIG_ID;
			p->computeInstanceId = NVML_NO_MIG_ID;
		}
	}
	*infoCount = n;
out:
	unlock_state();
	return r;
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
							 nvmlProcessInfo_t *infos)
{
	return running_procs(device, infoCount, infos, 0);
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
							 nvmlProcessInfo_v2_t *infos)
{
	return running_procs(device, infoCount, infos, 0);
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
						      nvmlProcessInfo_v1_t *infos)
{
	return running_procs(device, infoCount, infos, 1);
}
