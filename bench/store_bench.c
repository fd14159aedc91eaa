/*
 * store_bench.c - what LMDB alone can commit on this machine, as a ceiling
 * for the store's group commit: durable write transactions per second with
 * one state change each (a stage record and an event, ~200 + ~150 bytes),
 * and puts per second when 100 such changes share a transaction.
 *
 * Usage: store_bench [dir [N]]. dir (created if missing) must be on the
 * file system under test: a tmpfs gives numbers no disk will. Without dir a
 * mkdtemp directory under $TMPDIR (or /tmp) is used and removed. N is the
 * number of single-change transactions (default 2000); the grouped run
 * uses N/10 transactions of 100 changes.
 *
 * Default env flags, so every commit fsyncs, as in kpld.
 */
#include <errno.h>
#include <lmdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STAGE_VAL 200
#define EVENT_VAL 150
#define GROUP 100

struct bench {
	MDB_env *env;
	MDB_dbi stages, events;
	unsigned char stage_val[STAGE_VAL], event_val[EVENT_VAL];
	uint64_t seq;
};

static void die(const char *what, int rc)
{
	fprintf(stderr, "store_bench: %s: %s\n", what, mdb_strerror(rc));
	exit(1);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void put_be(unsigned char *p, uint64_t v, int n)
{
	for (int i = n - 1; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

/* One state change as the store writes it: the run's stage record (same
 * keys over and over, as stages change state) and the next event. */
static void put_change(struct bench *b, MDB_txn *txn)
{
	unsigned char key[64];
	int idlen = snprintf((char *)key, 32, "20260101T000000Z-%06llu",
			     (unsigned long long)(b->seq / 64));
	MDB_val k = { .mv_data = key }, v;
	int rc;

	key[idlen] = 0;
	put_be(key + idlen + 1, b->seq % 8, 4);
	k.mv_size = (size_t)idlen + 5;
	v.mv_size = STAGE_VAL;
	v.mv_data = b->stage_val;
	rc = mdb_put(txn, b->stages, &k, &v, 0);
	if (rc)
		die("mdb_put (stages)", rc);
	put_be(key + idlen + 1, b->seq, 8);
	k.mv_size = (size_t)idlen + 9;
	v.mv_size = EVENT_VAL;
	v.mv_data = b->event_val;
	rc = mdb_put(txn, b->events, &k, &v, 0);
	if (rc)
		die("mdb_put (events)", rc);
	b->seq++;
}

/* Runs ntxn transactions of per_txn changes; returns the seconds taken. */
static double run(struct bench *b, int ntxn, int per_txn)
{
	double t0 = now_s();

	for (int i = 0; i < ntxn; i++) {
		MDB_txn *txn;
		int rc = mdb_txn_begin(b->env, NULL, 0, &txn);

		if (rc)
			die("mdb_txn_begin", rc);
		for (int j = 0; j < per_txn; j++)
			put_change(b, txn);
		rc = mdb_txn_commit(txn);
		if (rc)
			die("mdb_txn_commit", rc);
	}
	return now_s() - t0;
}

static void remove_in(const char *dir, const char *name)
{
	char path[4096];

	snprintf(path, sizeof path, "%s/%s", dir, name);
	unlink(path);
}

int main(int argc, char **argv)
{
	struct bench b = { 0 };
	char tmpl[4096];
	const char *dir;
	int made = 0, existed = 0, n = 2000, rc;
	MDB_txn *txn;
	struct stat st;
	double secs;

	if (argc > 1) {
		dir = argv[1];
		if (stat(dir, &st) == 0)
			existed = 1;
		else if (mkdir(dir, 0700) != 0) {
			fprintf(stderr, "store_bench: cannot create %s: %s\n", dir, strerror(errno));
			return 1;
		}
	} else {
		const char *t = getenv("TMPDIR");

		snprintf(tmpl, sizeof tmpl, "%s/store_bench.XXXXXX", t && *t ? t : "/tmp");
		if (!mkdtemp(tmpl)) {
			fprintf(stderr, "store_bench: mkdtemp %s: %s\n", tmpl, strerror(errno));
			return 1;
		}
		dir = tmpl;
		made = 1;
	}
	if (argc > 2 && (n = atoi(argv[2])) < 10) {
		fprintf(stderr, "usage: store_bench [dir [N >= 10]]\n");
		return 2;
	}
	if (existed) {
		/* Start from an empty env so runs compare. */
		remove_in(dir, "data.mdb");
		remove_in(dir, "lock.mdb");
	}
	for (size_t i = 0; i < sizeof b.stage_val; i++)
		b.stage_val[i] = (unsigned char)(i * 7);
	for (size_t i = 0; i < sizeof b.event_val; i++)
		b.event_val[i] = (unsigned char)(i * 13);

	if ((rc = mdb_env_create(&b.env)) || (rc = mdb_env_set_maxdbs(b.env, 4)) ||
	    (rc = mdb_env_set_mapsize(b.env, (size_t)4 << 30)) ||
	    (rc = mdb_env_open(b.env, dir, 0, 0600)))
		die("opening the environment", rc);
	if ((rc = mdb_txn_begin(b.env, NULL, 0, &txn)) ||
	    (rc = mdb_dbi_open(txn, "stages", MDB_CREATE, &b.stages)) ||
	    (rc = mdb_dbi_open(txn, "events", MDB_CREATE, &b.events)) ||
	    (rc = mdb_txn_commit(txn)))
		die("creating the databases", rc);
	fprintf(stderr, "store_bench: dir=%s\n", dir);

	secs = run(&b, n, 1);
	printf("lmdb_commits_per_sec=%.0f (N=%d, 2 puts/txn)\n", n / secs, n);
	fflush(stdout);
	secs = run(&b, n / 10, GROUP);
	printf("lmdb_puts_per_sec_grouped=%.0f (N=%d, %d puts/txn, %.0f commits/sec)\n",
	       (double)(n / 10) * GROUP * 2 / secs, n / 10, GROUP * 2, (n / 10) / secs);

	mdb_env_close(b.env);
	if (made || !existed) {
		remove_in(dir, "data.mdb");
		remove_in(dir, "lock.mdb");
		rmdir(dir);
	}
	return 0;
}
