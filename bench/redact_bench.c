/*
 * redact_bench.c - what redaction costs per log line: secrets_redact and
 * logline_utf8_clean (what kpld does to every line before it stores it)
 * over a 95-byte line with nothing secret in it, for 0, 20, 100 and 1000
 * secrets (and a 25-line PEM key, whose lines are patterns of their own).
 *
 *   bazel run //bench:redact_bench [-- LINES]
 *
 * Prints "redact_ns_per_line=N (secrets S, patterns P)" per count. Uses a
 * store in a temporary directory; removes it.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/kpl.h"
#include "base/logline.h"
#include "engine/secrets.h"
#include "store/store.h"

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int one(int ns, long lines)
{
	char dir[] = "/tmp/kpl-redact-bench-XXXXXX", cmd[64];
	const char *line = "line 12345 of a log that is about one hundred bytes long, with "
			   "nothing secret in it at all....";
	struct store_options opt = { 0 };
	struct kpl_err err = { 0 };
	struct store *st;
	struct secrets *sec;
	size_t n, len = strlen(line);
	double t0, dt;

	if (!mkdtemp(dir) || store_open(NULL, dir, &opt, &st, &err) ||
	    secrets_open(st, dir, &sec, &err)) {
		fprintf(stderr, "redact_bench: %s\n", err.msg);
		return 1;
	}
	for (int i = 0; i < ns; i++) {
		char name[16], v[80];
		snprintf(name, sizeof name, "S%d", i);
		/* Random-looking values, as real tokens are. */
		snprintf(v, sizeof v, "%08x%08x-tok-%d", (unsigned)rand(), (unsigned)rand(), i);
		secrets_set(sec, name, v, strlen(v), &err);
	}
	if (ns) {
		char pem[4096] = "-----BEGIN PRIVATE KEY-----\n";
		for (int i = 0; i < 25; i++) {
			char l[80];
			snprintf(l, sizeof l, "MII%02d%059x\n", i, (unsigned)rand());
			strcat(pem, l);
		}
		strcat(pem, "-----END PRIVATE KEY-----\n");
		secrets_set(sec, "PEM", pem, strlen(pem), &err);
	}
	t0 = now_s();
	for (long i = 0; i < lines; i++) {
		char *r = secrets_redact(sec, line, len, &n);
		char *c = logline_utf8_clean(r ? r : line, r ? n : len, &n);
		free(r);
		free(c);
	}
	dt = now_s() - t0;
	printf("redact_ns_per_line=%.0f (secrets %d, %ld lines of %zu bytes)\n",
	       dt / (double)lines * 1e9, ns + (ns ? 1 : 0), lines, len);
	secrets_free(sec);
	store_close(st);
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	return system(cmd) != 0;
}

int main(int argc, char **argv)
{
	long lines = argc > 1 ? atol(argv[1]) : 1000000;
	static const int counts[] = { 0, 20, 100, 1000 };

	kpl_log_threshold = KPL_LOG_WARN;
	for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
		if (one(counts[i], lines))
			return 1;
	return 0;
}
