/* readloop: N reads of `size` bytes from a file, as fast as possible; prints ns per call.
 * Used by the benchmarks as the traced workload (a C loop, so the probe cost
 * is not hidden behind interpreter overhead). With READLOOP_FILES=N it opens FILE.0 ..
 * FILE.<N-1> and cycles through them, one pread each (no two records in a row alike).
 * With READLOOP_CLOSE=1 each call is a close() of a dup() of the file instead (the
 * close() cost benchmark; ns per dup+close pair). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: readloop FILE COUNT [SIZE] [--wait]\n");
		return 2;
	}
	long n = atol(argv[2]);
	size_t size = argc > 3 ? (size_t)atol(argv[3]) : 8;
	int nfiles = getenv("READLOOP_FILES") ? atoi(getenv("READLOOP_FILES")) : 0;
	int fds[256];
	if (nfiles > 256)
		nfiles = 256;
	for (int i = 0; i < (nfiles > 0 ? nfiles : 1); i++) {
		char name[4096];
		if (nfiles > 0)
			snprintf(name, sizeof(name), "%s.%d", argv[1], i);
		else
			snprintf(name, sizeof(name), "%s", argv[1]);
		fds[i] = open(name, O_RDONLY);
		if (fds[i] < 0) {
			perror(name);
			return 1;
		}
	}
	if (nfiles < 1)
		nfiles = 1;
	char buf[65536];
	if (size > sizeof(buf))
		size = sizeof(buf);
	if (argc > 4) {            /* --wait: let the caller attach before starting */
		printf("ready %d\n", getpid());
		fflush(stdout);
		char c;
		if (read(0, &c, 1) != 1)
			return 1;
	}
	struct timespec a, b;
	int closing = getenv("READLOOP_CLOSE") != NULL;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; closing && i < n; i++) {
		int d = dup(fds[0]);
		if (d < 0 || close(d) < 0) {
			perror("dup/close");
			return 1;
		}
	}
	for (long i = 0; !closing && i < n; i++) {
		if (pread(fds[i % nfiles], buf, size, 0) < 0) {
			perror("pread");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
	printf("%.1f\n", ns / n);
	return 0;
}
