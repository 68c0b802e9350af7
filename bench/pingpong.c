/* pingpong: two processes bounce a byte over two pipes N times, both pinned to one CPU;
 * prints ns per round trip (two context switches and two wakeups), by the wall clock and by
 * the CPU time of both processes (which holds the probes' cost: the sched_switch program
 * runs in prev's context, the wakeup program in the waker's; but not the time other jobs
 * of a shared machine take from that CPU). The context-switch-heavy workload of the sched
 * family's cost benchmark (bench/tracer_bench.py sched_cost).
 * usage: pingpong COUNT CPU [--wait]   (--wait: print "ready PARENT CHILD", start on a byte
 * from stdin, so the caller can make both processes GPU owners first) */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: pingpong COUNT CPU [--wait]\n");
		return 2;
	}
	long n = atol(argv[1]);
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(atoi(argv[2]), &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("sched_setaffinity");
		return 1;
	}
	int a[2], b[2];
	if (pipe(a) || pipe(b)) {
		perror("pipe");
		return 1;
	}
	char c = 'x';
	pid_t child = fork();
	if (child == 0) {
		for (long i = 0; i < n; i++)
			if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1)
				_exit(1);
		_exit(0);
	}
	if (argc > 3) {
		printf("ready %d %d\n", getpid(), child);
		fflush(stdout);
		if (read(0, &c, 1) != 1)
			return 1;
	}
	struct timespec t0, t1;
	struct rusage r0, r1, rc;
	getrusage(RUSAGE_SELF, &r0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
		if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1) {
			perror("pingpong");
			return 1;
		}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	getrusage(RUSAGE_SELF, &r1);
	int st = 0;
	waitpid(child, &st, 0);
	getrusage(RUSAGE_CHILDREN, &rc);     /* the child did nothing but the loop */
#define US(tv) ((tv).tv_sec * 1e6 + (tv).tv_usec)
	double cpu_us = US(r1.ru_utime) + US(r1.ru_stime) - US(r0.ru_utime) - US(r0.ru_stime) +
			US(rc.ru_utime) + US(rc.ru_stime);
	printf("%.1f %.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n,
	       cpu_us * 1e3 / n);
	return st != 0;
}
