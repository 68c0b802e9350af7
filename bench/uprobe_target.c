/* uprobe_target: N calls of one of two tiny functions, prints ns per call. The uprobe cost
 * benchmark (bench/tracer_bench.py uprobe_cost) probes their first instruction: f_emul starts
 * with `push %rbp`, which the x86 kernel emulates; f_step with `mov %rdi,%rax`, which it must
 * single-step out of line (a second trap). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long f_emul(long x);
long f_step(long x);
__asm__(".text\n.globl f_emul\n.type f_emul,@function\nf_emul:\n"
	"\tpush %rbp\n\tmov %rsp, %rbp\n\tlea 1(%rdi), %rax\n\tpop %rbp\n\tret\n"
	".size f_emul, .-f_emul\n"
	".globl f_step\n.type f_step,@function\nf_step:\n"
	"\tmov %rdi, %rax\n\tadd $1, %rax\n\tret\n"
	".size f_step, .-f_step\n");

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: uprobe_target COUNT emul|step\n");
		return 2;
	}
	long n = atol(argv[1]);
	long (*volatile fn)(long) = strcmp(argv[2], "step") ? f_emul : f_step;
	long acc = 0;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++)
		acc = fn(acc);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
	printf("%.1f %ld\n", ns / n, acc);
	return 0;
}
