/*
 * spawn_limit.c - the physical limit a script stage is measured against:
 * how many times per second this machine starts a program and waits for it,
 * with nothing of kpl in the way.
 *
 *   spawn_limit [--name NAME] [--seconds S] [--loops N] -- ARGV...
 *
 * N loops (default: one per core), each a thread that posix_spawn()s ARGV
 * (glibc spawns with clone(CLONE_VM|CLONE_VFORK): no page tables copied)
 * and waitpid()s it, for S seconds (default 5). Prints one line
 * "NAME=value (details)" (NAME defaults to spawn_limit_per_sec). bench/run.sh
 * runs it with /bin/true, and with bwrap set up like a sandboxed stage.
 * Exit status 0 if every spawn succeeded with status 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

struct shared {
	char **argv;
	double t_end;
	atomic_long done, failed;
	char first_err[256];
	atomic_int have_err;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void note_err(struct shared *sh, const char *fmt, int v)
{
	if (atomic_exchange(&sh->have_err, 1) == 0)
		snprintf(sh->first_err, sizeof sh->first_err, fmt, v);
	atomic_fetch_add(&sh->failed, 1);
}

static void *loop(void *data)
{
	struct shared *sh = data;
	posix_spawn_file_actions_t fa;

	/* The program's output is not what is measured. */
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	while (now_s() < sh->t_end) {
		pid_t pid;
		int st, rc = posix_spawnp(&pid, sh->argv[0], &fa, NULL, sh->argv, environ);

		if (rc != 0) {
			note_err(sh, "posix_spawn: error %d", rc);
			continue;
		}
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
			atomic_fetch_add(&sh->done, 1);
		else
			note_err(sh, "child ended with wait status %d", st);
	}
	posix_spawn_file_actions_destroy(&fa);
	return NULL;
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "name", required_argument, NULL, 'n' },
		{ "seconds", required_argument, NULL, 's' },
		{ "loops", required_argument, NULL, 'l' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *name = "spawn_limit_per_sec";
	double seconds = 5, t0, took;
	long loops = sysconf(_SC_NPROCESSORS_ONLN);
	struct shared sh = { 0 };
	pthread_t *th;
	int c;

	while ((c = getopt_long(argc, argv, "h", lopts, NULL)) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 's': seconds = atof(optarg); break;
		case 'l': loops = atol(optarg); break;
		case 'h':
			printf("usage: spawn_limit [--name NAME] [--seconds S] [--loops N] -- ARGV...\n");
			return 0;
		default: return 2;
		}
	}
	if (optind >= argc || seconds <= 0 || loops < 1 || loops > 256) {
		fprintf(stderr, "usage: spawn_limit [--name NAME] [--seconds S] [--loops N] -- ARGV...\n");
		return 2;
	}
	sh.argv = argv + optind;
	th = calloc((size_t)loops, sizeof *th);
	t0 = now_s();
	sh.t_end = t0 + seconds;
	for (long i = 0; i < loops; i++)
		if (pthread_create(&th[i], NULL, loop, &sh) != 0) {
			fprintf(stderr, "spawn_limit: pthread_create failed\n");
			return 1;
		}
	for (long i = 0; i < loops; i++)
		pthread_join(th[i], NULL);
	took = now_s() - t0;
	printf("%s=%.0f (%ld spawns of %s in %.1f s, %ld loop(s), posix_spawn + waitpid; "
	       "failures: %ld%s%s)\n", name, (double)atomic_load(&sh.done) / took,
	       atomic_load(&sh.done), sh.argv[0], took, loops, atomic_load(&sh.failed),
	       atomic_load(&sh.have_err) ? ", first: " : "", sh.first_err);
	free(th);
	return atomic_load(&sh.failed) ? 1 : 0;
}
