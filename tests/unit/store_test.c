/*
 * store_test.c - unit tests of store/store.c on a real LMDB environment in
 * a fresh temporary directory per test, and a real libuv loop for the
 * asynchronous group commit.
 *
 * The thread pool is limited to one thread (UV_THREADPOOL_SIZE=1, set before
 * libuv starts it) so a test can park that thread on a semaphore: a commit
 * handed to the pool then provably has not run yet, which makes "invisible
 * before its callback" and "gathers while one is in flight" deterministic
 * rather than a race the test usually wins.
 */
#define _GNU_SOURCE /* nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/store.h"

/* --- Fixture --- */

struct blocker {
	uv_work_t work;
	uv_sem_t sem;
	int armed;
	int done;
};

struct fx {
	char root[PATH_MAX]; /* the mkdtemp dir, removed at the end */
	char dir[PATH_MAX];  /* the store's dir: root or below it */
	uv_loop_t loop;
	struct store *s;
	struct blocker blk;
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void rm_rf(const char *dir)
{
	nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof *fx);
	const char *tmp = getenv("TEST_TMPDIR");

	assert_non_null(fx);
	snprintf(fx->dir, sizeof fx->dir, "%s/store_test.XXXXXX", tmp ? tmp : "/tmp");
	assert_non_null(mkdtemp(fx->dir));
	memcpy(fx->root, fx->dir, sizeof fx->root);
	assert_int_equal(uv_loop_init(&fx->loop), 0);
	*state = fx;
	return 0;
}

static void block_work(uv_work_t *w)
{
	struct blocker *b = w->data;
	uv_sem_wait(&b->sem);
}

static void block_done(uv_work_t *w, int status)
{
	struct blocker *b = w->data;
	(void)status;
	b->done = 1;
}

/* Parks the (only) pool thread until release(). */
static void block_pool(struct fx *fx)
{
	struct blocker *b = &fx->blk;

	assert_int_equal(uv_sem_init(&b->sem, 0), 0);
	b->work.data = b;
	b->armed = 1;
	assert_int_equal(uv_queue_work(&fx->loop, &b->work, block_work, block_done), 0);
}

static void release_pool(struct fx *fx)
{
	if (fx->blk.armed) {
		uv_sem_post(&fx->blk.sem);
		fx->blk.armed = 0;
	}
}

static int teardown(void **state)
{
	struct fx *fx = *state;

	/* A failed assertion may leave the pool parked or commits in flight:
	 * let them finish so the store closes and the loop ends clean. */
	release_pool(fx);
	uv_run(&fx->loop, UV_RUN_DEFAULT);
	if (fx->s)
		store_close(fx->s);
	assert_int_equal(uv_loop_close(&fx->loop), 0);
	rm_rf(fx->root);
	free(fx);
	return 0;
}

static void open_store(struct fx *fx, uv_loop_t *loop, size_t map_size)
{
	struct store_options opt = { .map_size = map_size };
	struct kpl_err err;
	int rc = store_open(loop, fx->dir, &opt, &fx->s, &err);

	if (rc)
		fail_msg("store_open: %s: %s", kpl_err_name(rc), err.msg);
	assert_non_null(fx->s);
}

static void reopen_store(struct fx *fx)
{
	store_close(fx->s);
	fx->s = NULL;
	open_store(fx, &fx->loop, 0);
}

/* --- Records --- */

static void stage_run(struct store *s, const char *id, const char *pipeline, uint64_t next_seq)
{
	Kpl__V1__Run run = KPL__V1__RUN__INIT;
	Kpl__Store__V1__RunRecord rec = KPL__STORE__V1__RUN_RECORD__INIT;

	run.id = (char *)id;
	run.pipeline_name = (char *)pipeline;
	run.state = KPL__V1__RUN_STATE__RUN_STATE_RUNNING;
	rec.run = &run;
	rec.next_seq = next_seq;
	rec.stage_count = 3;
	store_stage_run(s, &rec);
}

/* An event with a global seq (0: none, not in the global index). */
static void stage_gevent(struct store *s, const char *run_id, uint64_t seq, uint64_t gseq)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;
	Google__Protobuf__Timestamp t = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	char msg[64];

	snprintf(msg, sizeof msg, "%s line %llu", run_id, (unsigned long long)seq);
	t.seconds = 1700000000 + (int64_t)seq;
	t.nanos = 5;
	ev.run_id = (char *)run_id;
	ev.seq = seq;
	ev.time = &t;
	ev.stage = "build";
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
	ev.stream = KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT;
	ev.message = msg;
	ev.attempt = 2;
	ev.global_seq = gseq;
	store_stage_event(s, &ev);
}

static void stage_event(struct store *s, const char *run_id, uint64_t seq)
{
	stage_gevent(s, run_id, seq, 0);
}

/* Events seen by store_read_events, checked field by field. */
struct evlog {
	const char *run_id;
	uint64_t seqs[1024];
	size_t n;
	size_t stop_at; /* return 7 after this many, 0 = never */
	int bad;        /* a field did not round-trip */
};

static int collect_event(void *data, const Kpl__V1__RunEvent *ev)
{
	struct evlog *l = data;
	char msg[64];

	snprintf(msg, sizeof msg, "%s line %llu", l->run_id, (unsigned long long)ev->seq);
	if (strcmp(ev->run_id, l->run_id) != 0 || strcmp(ev->message, msg) != 0 ||
	    strcmp(ev->stage, "build") != 0 || ev->kind != KPL__V1__EVENT_KIND__EVENT_KIND_LOG ||
	    ev->stream != KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT || ev->attempt != 2 || !ev->time ||
	    ev->time->seconds != 1700000000 + (int64_t)ev->seq || ev->time->nanos != 5)
		l->bad = 1;
	if (l->n < KPL_ARRAY_SIZE(l->seqs))
		l->seqs[l->n] = ev->seq;
	l->n++;
	return l->stop_at && l->n >= l->stop_at ? 7 : 0;
}

static int event_visible(struct store *s, const char *run_id, uint64_t seq)
{
	struct evlog l = { .run_id = run_id };
	int rc = store_read_events(s, run_id, seq, 1, collect_event, &l);

	if (rc)
		return -1;
	return l.n == 1 && l.seqs[0] == seq;
}

struct runlog {
	char ids[64][STORE_MAX_RUN_ID_LEN + 1];
	size_t n;
	size_t stop_at;
};

static int collect_run(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct runlog *l = data;

	if (l->n < KPL_ARRAY_SIZE(l->ids))
		snprintf(l->ids[l->n], sizeof l->ids[0], "%s", rec->run->id);
	l->n++;
	return l->stop_at && l->n >= l->stop_at ? 9 : 0;
}

/* --- Round trips --- */

static void test_run_roundtrip(void **state)
{
	struct fx *fx = *state;
	Kpl__V1__Run run = KPL__V1__RUN__INIT;
	Kpl__V1__Run__ParamsEntry p1 = KPL__V1__RUN__PARAMS_ENTRY__INIT;
	Kpl__V1__Run__ParamsEntry *params[] = { &p1 };
	Google__Protobuf__Timestamp created = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	Kpl__Store__V1__RunRecord rec = KPL__STORE__V1__RUN_RECORD__INIT;
	Kpl__Store__V1__RunRecord *got = NULL;

	open_store(fx, NULL, 0);
	run.id = "20260101T000000Z-0001";
	run.pipeline_name = "deploy-web";
	run.state = KPL__V1__RUN_STATE__RUN_STATE_QUEUED;
	run.message = "waiting";
	run.idempotency_key = "idem-1";
	run.last_seq = 41;
	created.seconds = 1767225600;
	run.created_at = &created;
	p1.key = "env";
	p1.value = "prod";
	run.n_params = 1;
	run.params = params;
	rec.run = &run;
	rec.next_seq = 42;
	rec.stage_count = 5;
	rec.cancel_requested = 1;

	store_stage_run(fx->s, &rec);
	assert_int_equal(store_staged(fx->s), 1);
	/* Staged is not committed. */
	assert_int_equal(store_get_run(fx->s, run.id, &got), KPL_ENOTFOUND);
	assert_null(got);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_staged(fx->s), 0);

	assert_int_equal(store_get_run(fx->s, run.id, &got), 0);
	assert_non_null(got);
	assert_non_null(got->run);
	assert_string_equal(got->run->id, run.id);
	assert_string_equal(got->run->pipeline_name, "deploy-web");
	assert_int_equal(got->run->state, KPL__V1__RUN_STATE__RUN_STATE_QUEUED);
	assert_string_equal(got->run->message, "waiting");
	assert_string_equal(got->run->idempotency_key, "idem-1");
	assert_int_equal(got->run->last_seq, 41);
	assert_non_null(got->run->created_at);
	assert_int_equal(got->run->created_at->seconds, 1767225600);
	assert_int_equal(got->run->n_params, 1);
	assert_string_equal(got->run->params[0]->key, "env");
	assert_string_equal(got->run->params[0]->value, "prod");
	assert_int_equal(got->next_seq, 42);
	assert_int_equal(got->stage_count, 5);
	assert_true(got->cancel_requested);
	kpl__store__v1__run_record__free_unpacked(got, NULL);

	/* A later write of the same key wins. */
	run.state = KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED;
	store_stage_run(fx->s, &rec);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_get_run(fx->s, run.id, &got), 0);
	assert_int_equal(got->run->state, KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED);
	kpl__store__v1__run_record__free_unpacked(got, NULL);

	/* A run id that is a prefix of a stored one is a different run. */
	assert_int_equal(store_get_run(fx->s, "20260101T000000Z-000", &got), KPL_ENOTFOUND);
}

static void test_invalid_ids(void **state)
{
	struct fx *fx = *state;
	Kpl__Store__V1__RunRecord *got = NULL;
	Kpl__Store__V1__StageRecord **stages = NULL;
	struct evlog l = { .run_id = "x" };
	struct runlog rl = { 0 };
	char long_id[STORE_MAX_RUN_ID_LEN + 2];
	char max_id[STORE_MAX_RUN_ID_LEN + 1];
	char long_key[STORE_MAX_IDEM_KEY_LEN + 2];
	char *text = NULL, *rid = NULL;
	size_t n = 99, len = 99;

	open_store(fx, NULL, 0);
	memset(long_id, 'a', sizeof long_id - 1);
	long_id[sizeof long_id - 1] = '\0';
	memset(max_id, 'a', sizeof max_id - 1);
	max_id[sizeof max_id - 1] = '\0';
	memset(long_key, 'k', sizeof long_key - 1);
	long_key[sizeof long_key - 1] = '\0';

	assert_int_equal(store_get_run(fx->s, long_id, &got), KPL_EINVAL);
	assert_int_equal(store_get_run(fx->s, "", &got), KPL_EINVAL);
	assert_int_equal(store_get_run(fx->s, "a b", &got), KPL_EINVAL);
	assert_int_equal(store_get_run(fx->s, "caf\xc3\xa9", &got), KPL_EINVAL);
	assert_int_equal(store_get_run(fx->s, max_id, &got), KPL_ENOTFOUND);
	assert_int_equal(store_get_stages(fx->s, long_id, &stages, &n), KPL_EINVAL);
	assert_int_equal(store_get_pipeline(fx->s, "", &text, &len), KPL_EINVAL);
	assert_int_equal(store_read_events(fx->s, "a\tb", 0, 0, collect_event, &l), KPL_EINVAL);
	assert_int_equal(store_find_idem(fx->s, "", &rid), KPL_EINVAL);
	assert_int_equal(store_find_idem(fx->s, long_key, &rid), KPL_EINVAL);
	assert_int_equal(store_list_runs(fx->s, "bad id", collect_run, &rl), KPL_EINVAL);
	assert_null(got);
	assert_null(text);
	assert_null(rid);
	assert_int_equal(l.n, 0);
	assert_int_equal(rl.n, 0);

	/* The longest valid id is stored and found. */
	stage_run(fx->s, max_id, "p", 1);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_get_run(fx->s, max_id, &got), 0);
	assert_string_equal(got->run->id, max_id);
	kpl__store__v1__run_record__free_unpacked(got, NULL);
}

static void stage_stage(struct store *s, const char *run_id, uint32_t index)
{
	Kpl__V1__StageStatus st = KPL__V1__STAGE_STATUS__INIT;
	Kpl__Store__V1__StageRecord rec = KPL__STORE__V1__STAGE_RECORD__INIT;
	char name[32], resume[64];

	snprintf(name, sizeof name, "stage-%u", index);
	snprintf(resume, sizeof resume, "{\"build\":%u}", index);
	st.name = name;
	st.state = KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING;
	st.attempt = index + 1;
	st.kind = "shell";
	rec.status = &st;
	rec.index = index;
	rec.pid = 1000 + (int64_t)index;
	rec.pid_start_time = 77;
	rec.deadline_ms = -5;
	rec.resume = resume;
	store_stage_stage(s, run_id, &rec);
}

static void test_stages_roundtrip(void **state)
{
	struct fx *fx = *state;
	/* 255 -> 256 is where a little-endian key would sort wrong. */
	static const uint32_t order[] = { 256, 0, 255, 1, 70000 };
	static const uint32_t sorted[] = { 0, 1, 255, 256, 70000 };
	Kpl__Store__V1__StageRecord **st = NULL;
	size_t n = 0;

	open_store(fx, NULL, 0);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(order); i++)
		stage_stage(fx->s, "r1", order[i]);
	/* Runs whose ids share a prefix with r1, on both sides of it. */
	stage_stage(fx->s, "r10", 3);
	stage_stage(fx->s, "r", 9);
	assert_int_equal(store_commit_sync(fx->s), 0);

	assert_int_equal(store_get_stages(fx->s, "r1", &st, &n), 0);
	assert_int_equal(n, KPL_ARRAY_SIZE(sorted));
	for (size_t i = 0; i < n; i++) {
		char name[32], resume[64];

		snprintf(name, sizeof name, "stage-%u", sorted[i]);
		snprintf(resume, sizeof resume, "{\"build\":%u}", sorted[i]);
		assert_int_equal(st[i]->index, sorted[i]);
		assert_non_null(st[i]->status);
		assert_string_equal(st[i]->status->name, name);
		assert_string_equal(st[i]->status->kind, "shell");
		assert_int_equal(st[i]->status->state, KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING);
		assert_int_equal(st[i]->status->attempt, sorted[i] + 1);
		assert_int_equal(st[i]->pid, 1000 + (int64_t)sorted[i]);
		assert_int_equal(st[i]->pid_start_time, 77);
		assert_int_equal(st[i]->deadline_ms, -5);
		assert_string_equal(st[i]->resume, resume);
	}
	store_free_stages(st, n);

	assert_int_equal(store_get_stages(fx->s, "r10", &st, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(st[0]->index, 3);
	store_free_stages(st, n);

	assert_int_equal(store_get_stages(fx->s, "r", &st, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(st[0]->index, 9);
	store_free_stages(st, n);

	st = (void *)1;
	n = 5;
	assert_int_equal(store_get_stages(fx->s, "none", &st, &n), 0);
	assert_null(st);
	assert_int_equal(n, 0);
}

static void test_events_roundtrip(void **state)
{
	struct fx *fx = *state;
	struct evlog l;

	open_store(fx, NULL, 0);
	/* Staged newest first: the key, not the order of writes, orders them. */
	for (uint64_t seq = 300; seq >= 1; seq--)
		stage_event(fx->s, "r1", seq);
	stage_event(fx->s, "r10", 1);
	stage_event(fx->s, "r", 5000);
	stage_event(fx->s, "r1", (uint64_t)1 << 40);
	assert_int_equal(store_commit_sync(fx->s), 0);

	memset(&l, 0, sizeof l);
	l.run_id = "r1";
	assert_int_equal(store_read_events(fx->s, "r1", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 301);
	assert_false(l.bad);
	for (size_t i = 0; i < 300; i++)
		assert_int_equal(l.seqs[i], i + 1);
	assert_int_equal(l.seqs[300], (uint64_t)1 << 40);

	/* From the middle. */
	memset(&l, 0, sizeof l);
	l.run_id = "r1";
	assert_int_equal(store_read_events(fx->s, "r1", 150, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 152);
	assert_int_equal(l.seqs[0], 150);
	assert_int_equal(l.seqs[150], 300);

	/* From the middle, at most 10. */
	memset(&l, 0, sizeof l);
	l.run_id = "r1";
	assert_int_equal(store_read_events(fx->s, "r1", 255, 10, collect_event, &l), 0);
	assert_int_equal(l.n, 10);
	for (size_t i = 0; i < 10; i++)
		assert_int_equal(l.seqs[i], 255 + i);

	/* fn stops the walk and its value comes back. */
	memset(&l, 0, sizeof l);
	l.run_id = "r1";
	l.stop_at = 3;
	assert_int_equal(store_read_events(fx->s, "r1", 1, 0, collect_event, &l), 7);
	assert_int_equal(l.n, 3);

	/* Past the end, and runs sharing a prefix stay apart. */
	memset(&l, 0, sizeof l);
	l.run_id = "r1";
	assert_int_equal(store_read_events(fx->s, "r1", ((uint64_t)1 << 40) + 1, 0, collect_event,
					   &l),
			 0);
	assert_int_equal(l.n, 0);
	memset(&l, 0, sizeof l);
	l.run_id = "r10";
	assert_int_equal(store_read_events(fx->s, "r10", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.seqs[0], 1);
	assert_false(l.bad);
	memset(&l, 0, sizeof l);
	l.run_id = "r";
	assert_int_equal(store_read_events(fx->s, "r", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.seqs[0], 5000);
	memset(&l, 0, sizeof l);
	l.run_id = "none";
	assert_int_equal(store_read_events(fx->s, "none", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 0);
}

static void test_pipeline_idem_active(void **state)
{
	struct fx *fx = *state;
	static const char text[] = "name: web\nstages:\n  - name: build\n\0binary\xff";
	struct runlog rl = { 0 };
	char *got = NULL, *rid = NULL;
	size_t len = 0;

	open_store(fx, NULL, 0);
	store_stage_pipeline(fx->s, "r1", text, sizeof text - 1);
	store_stage_pipeline(fx->s, "r2", "", 0);
	store_stage_idem(fx->s, "client-key-1", "r1");
	for (int i = 1; i <= 4; i++) {
		char id[8];

		snprintf(id, sizeof id, "r%d", i);
		stage_run(fx->s, id, "web", 1);
		store_stage_active(fx->s, id, 1);
	}
	assert_int_equal(store_staged(fx->s), 11);
	assert_int_equal(store_commit_sync(fx->s), 0);

	assert_int_equal(store_get_pipeline(fx->s, "r1", &got, &len), 0);
	assert_int_equal(len, sizeof text - 1);
	assert_memory_equal(got, text, len);
	assert_int_equal(got[len], '\0');
	free(got);
	assert_int_equal(store_get_pipeline(fx->s, "r2", &got, &len), 0);
	assert_int_equal(len, 0);
	assert_string_equal(got, "");
	free(got);
	assert_int_equal(store_get_pipeline(fx->s, "r3", &got, &len), KPL_ENOTFOUND);
	assert_null(got);

	assert_int_equal(store_find_idem(fx->s, "client-key-1", &rid), 0);
	assert_string_equal(rid, "r1");
	free(rid);
	assert_int_equal(store_find_idem(fx->s, "client-key-2", &rid), KPL_ENOTFOUND);
	assert_null(rid);

	assert_int_equal(store_list_active(fx->s, collect_run, &rl), 0);
	assert_int_equal(rl.n, 4);

	/* Off is a delete; off for a run never active is fine. */
	store_stage_active(fx->s, "r2", 0);
	store_stage_active(fx->s, "r4", 0);
	store_stage_active(fx->s, "r9", 0);
	assert_int_equal(store_commit_sync(fx->s), 0);
	memset(&rl, 0, sizeof rl);
	assert_int_equal(store_list_active(fx->s, collect_run, &rl), 0);
	assert_int_equal(rl.n, 2);
	assert_string_equal(rl.ids[0], "r1");
	assert_string_equal(rl.ids[1], "r3");

	/* An active entry without a run record is skipped, not fatal. */
	store_stage_active(fx->s, "r0", 1);
	assert_int_equal(store_commit_sync(fx->s), 0);
	memset(&rl, 0, sizeof rl);
	assert_int_equal(store_list_active(fx->s, collect_run, &rl), 0);
	assert_int_equal(rl.n, 2);
	assert_string_equal(rl.ids[0], "r1");

	/* fn stops the walk. */
	memset(&rl, 0, sizeof rl);
	rl.stop_at = 1;
	assert_int_equal(store_list_active(fx->s, collect_run, &rl), 9);
	assert_int_equal(rl.n, 1);
}

/* --- Open, reopen, schema --- */

/* Raw LMDB, not the store: what is really on disk. */
static MDB_env *raw_open(const char *dir)
{
	MDB_env *env = NULL;

	assert_int_equal(mdb_env_create(&env), 0);
	assert_int_equal(mdb_env_set_maxdbs(env, 16), 0);
	assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
	return env;
}

static void raw_put(const char *dir, const char *db, const void *key, size_t klen,
		    const void *val, size_t vlen)
{
	MDB_env *env = raw_open(dir);
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_val k = { klen, (void *)key }, v = { vlen, (void *)val };

	assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
	assert_int_equal(mdb_dbi_open(txn, db, MDB_CREATE, &dbi), 0);
	assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
	assert_int_equal(mdb_txn_commit(txn), 0);
	mdb_env_close(env);
}

static void test_reopen_and_schema(void **state)
{
	struct fx *fx = *state;
	Kpl__Store__V1__RunRecord *got = NULL;
	Kpl__Store__V1__StageRecord **st = NULL;
	struct evlog l = { .run_id = "r1" };
	char *text = NULL, *rid = NULL;
	size_t n, len;
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_val k = { strlen("schema_version"), "schema_version" }, v;
	struct stat sb;
	char sub[PATH_MAX + 16];

	/* mkdir -p, mode 0700. */
	snprintf(sub, sizeof sub, "%s/a/b", fx->dir);
	snprintf(fx->dir + strlen(fx->dir), sizeof fx->dir - strlen(fx->dir), "/a/b");
	open_store(fx, &fx->loop, 0);
	assert_int_equal(stat(sub, &sb), 0);
	assert_true(S_ISDIR(sb.st_mode));
	assert_int_equal(sb.st_mode & 0777, 0700);
	assert_int_equal(store_schema_version(fx->s), STORE_SCHEMA_VERSION);

	stage_run(fx->s, "r1", "web", 4);
	stage_stage(fx->s, "r1", 0);
	stage_event(fx->s, "r1", 1);
	stage_event(fx->s, "r1", 2);
	store_stage_pipeline(fx->s, "r1", "text", 4);
	store_stage_idem(fx->s, "k", "r1");
	store_stage_active(fx->s, "r1", 1);
	/* Staged only: store_close commits it. */
	reopen_store(fx);
	assert_int_equal(store_schema_version(fx->s), STORE_SCHEMA_VERSION);

	assert_int_equal(store_get_run(fx->s, "r1", &got), 0);
	assert_int_equal(got->next_seq, 4);
	kpl__store__v1__run_record__free_unpacked(got, NULL);
	assert_int_equal(store_get_stages(fx->s, "r1", &st, &n), 0);
	assert_int_equal(n, 1);
	store_free_stages(st, n);
	assert_int_equal(store_read_events(fx->s, "r1", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 2);
	assert_int_equal(store_get_pipeline(fx->s, "r1", &text, &len), 0);
	assert_string_equal(text, "text");
	free(text);
	assert_int_equal(store_find_idem(fx->s, "k", &rid), 0);
	assert_string_equal(rid, "r1");
	free(rid);

	store_close(fx->s);
	fx->s = NULL;

	/* The version is really in meta, as be32. */
	env = raw_open(fx->dir);
	assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
	assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
	assert_int_equal(mdb_get(txn, dbi, &k, &v), 0);
	assert_int_equal(v.mv_size, 4);
	assert_memory_equal(v.mv_data, "\0\0\0\1", 4);
	mdb_txn_abort(txn);
	mdb_env_close(env);
}

static void test_schema_newer_refused(void **state)
{
	struct fx *fx = *state;
	struct store_options opt = { 0 };
	struct kpl_err err;
	char want[64];
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;

	raw_put(fx->dir, "meta", "schema_version", strlen("schema_version"), "\0\0\0\2", 4);
	assert_int_equal(store_open(&fx->loop, fx->dir, &opt, &fx->s, &err), KPL_ESCHEMA);
	assert_null(fx->s);
	assert_int_equal(err.code, KPL_ESCHEMA);
	assert_non_null(strstr(err.msg, fx->dir));
	snprintf(want, sizeof want, "schema version %u", STORE_SCHEMA_VERSION + 1);
	assert_non_null(strstr(err.msg, want));
	snprintf(want, sizeof want, "version %u", STORE_SCHEMA_VERSION);
	assert_non_null(strstr(err.msg, want));

	/* Refused before anything was written: no runs db was created. */
	env = raw_open(fx->dir);
	assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
	assert_int_equal(mdb_dbi_open(txn, "runs", 0, &dbi), MDB_NOTFOUND);
	mdb_txn_abort(txn);
	mdb_env_close(env);

	/* A version that is not 4 bytes is corruption, not a version. */
	raw_put(fx->dir, "meta", "schema_version", strlen("schema_version"), "\1", 1);
	assert_int_equal(store_open(&fx->loop, fx->dir, &opt, &fx->s, &err), KPL_ECORRUPT);
	assert_null(fx->s);
}

static void test_open_errors(void **state)
{
	struct fx *fx = *state;
	struct kpl_err err;
	char path[PATH_MAX + 16];
	FILE *f;

	/* A file where the directory should be. */
	snprintf(path, sizeof path, "%s/file", fx->dir);
	f = fopen(path, "w");
	assert_non_null(f);
	fclose(f);
	assert_int_equal(store_open(NULL, path, NULL, &fx->s, &err), KPL_EIO);
	assert_non_null(strstr(err.msg, path));
	snprintf(path, sizeof path, "%s/file/sub", fx->dir);
	assert_int_equal(store_open(NULL, path, NULL, &fx->s, &err), KPL_EIO);
	assert_non_null(strstr(err.msg, "cannot create"));
	assert_int_equal(store_open(NULL, "", NULL, &fx->s, &err), KPL_EINVAL);
	assert_null(fx->s);
}

/* --- Listing --- */

static void test_list_runs(void **state)
{
	struct fx *fx = *state;
	static const char *ids[] = {
		"20260101T000000Z-0003", "20260101T000000Z-0001", "20260101T000000Z-0005",
		"20260101T000000Z-0002", "20260101T000000Z-0004",
	};
	struct runlog l = { 0 };

	open_store(fx, NULL, 0);
	assert_int_equal(store_list_runs(fx->s, NULL, collect_run, &l), 0);
	assert_int_equal(l.n, 0);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(ids); i++)
		stage_run(fx->s, ids[i], "web", 1);
	assert_int_equal(store_commit_sync(fx->s), 0);

	assert_int_equal(store_list_runs(fx->s, NULL, collect_run, &l), 0);
	assert_int_equal(l.n, 5);
	for (size_t i = 0; i < 5; i++) {
		char want[32];

		snprintf(want, sizeof want, "20260101T000000Z-%04zu", 5 - i);
		assert_string_equal(l.ids[i], want);
	}

	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "", collect_run, &l), 0);
	assert_int_equal(l.n, 5);

	/* Paging: after is exclusive. */
	memset(&l, 0, sizeof l);
	l.stop_at = 2;
	assert_int_equal(store_list_runs(fx->s, NULL, collect_run, &l), 9);
	assert_int_equal(l.n, 2);
	assert_string_equal(l.ids[1], "20260101T000000Z-0004");
	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "20260101T000000Z-0004", collect_run, &l), 0);
	assert_int_equal(l.n, 3);
	assert_string_equal(l.ids[0], "20260101T000000Z-0003");
	assert_string_equal(l.ids[2], "20260101T000000Z-0001");

	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "20260101T000000Z-0001", collect_run, &l), 0);
	assert_int_equal(l.n, 0);

	/* after need not exist: between 0002 and 0003. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "20260101T000000Z-00025", collect_run, &l), 0);
	assert_int_equal(l.n, 2);
	assert_string_equal(l.ids[0], "20260101T000000Z-0002");

	/* Newer than all, older than all. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "20270101T000000Z-0000", collect_run, &l), 0);
	assert_int_equal(l.n, 5);
	assert_string_equal(l.ids[0], "20260101T000000Z-0005");
	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs(fx->s, "1", collect_run, &l), 0);
	assert_int_equal(l.n, 0);
}

/* --- Group commit on a loop --- */

struct step {
	struct fx *fx;
	int id;
	int called;
	int status;
	/* What the callback saw: seq visible (1), not (0), error (-1). */
	uint64_t probe[3];
	int seen[3];
	size_t pending_in_cb;
	void (*then)(struct step *);
	struct step *next;
};

static int order_log[512];
static size_t order_n;

static void on_commit(void *data, int status)
{
	struct step *st = data;

	st->called++;
	st->status = status;
	if (order_n < KPL_ARRAY_SIZE(order_log))
		order_log[order_n] = st->id;
	order_n++;
	for (size_t i = 0; i < 3; i++)
		if (st->probe[i])
			st->seen[i] = event_visible(st->fx->s, "r1", st->probe[i]);
	st->pending_in_cb = store_pending_commits(st->fx->s);
	if (st->then)
		st->then(st);
}

static void then_stage_4(struct step *st)
{
	stage_event(st->fx->s, "r1", 4);
	store_commit(st->fx->s, on_commit, st->next);
}

/* Staged while s4's group is in flight, but never committed. */
static void then_stage_5(struct step *st)
{
	stage_event(st->fx->s, "r1", 5);
}

static void test_group_commit_async(void **state)
{
	struct fx *fx = *state;
	struct step s1 = { fx, 1 }, s2 = { fx, 2 }, s3 = { fx, 3 }, s4 = { fx, 4 };
	Kpl__Store__V1__RunRecord *got = NULL;

	order_n = 0;
	open_store(fx, &fx->loop, 0);
	block_pool(fx);

	stage_run(fx->s, "r1", "web", 2);
	stage_event(fx->s, "r1", 1);
	assert_int_equal(store_staged(fx->s), 2);
	s1.probe[0] = 1;
	s1.probe[1] = 2; /* staged while s1's group was in flight: not yet */
	s1.then = then_stage_4;
	s1.next = &s4;
	store_commit(fx->s, on_commit, &s1);
	assert_int_equal(store_staged(fx->s), 0);
	assert_int_equal(store_pending_commits(fx->s), 1);

	stage_event(fx->s, "r1", 2);
	assert_int_equal(store_staged(fx->s), 1);
	store_commit(fx->s, on_commit, &s2);
	assert_int_equal(store_staged(fx->s), 0);
	assert_int_equal(store_pending_commits(fx->s), 2);
	stage_event(fx->s, "r1", 3);
	store_commit(fx->s, on_commit, &s3);
	assert_int_equal(store_pending_commits(fx->s), 2);
	s2.probe[0] = 2;
	s2.probe[1] = 3;
	s2.probe[2] = 4; /* staged by s1's callback: rides in s2's group */
	s4.probe[0] = 4;
	s4.then = then_stage_5;

	/* Nothing is visible while the pool is parked, and no callback ran. */
	assert_int_equal(event_visible(fx->s, "r1", 1), 0);
	assert_int_equal(event_visible(fx->s, "r1", 2), 0);
	assert_int_equal(store_get_run(fx->s, "r1", &got), KPL_ENOTFOUND);
	assert_int_equal(order_n, 0);

	release_pool(fx);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);

	assert_int_equal(order_n, 4);
	assert_int_equal(order_log[0], 1);
	assert_int_equal(order_log[1], 2);
	assert_int_equal(order_log[2], 3);
	assert_int_equal(order_log[3], 4);
	assert_int_equal(s1.called, 1);
	assert_int_equal(s2.called, 1);
	assert_int_equal(s3.called, 1);
	assert_int_equal(s4.called, 1);
	assert_int_equal(s1.status | s2.status | s3.status | s4.status, 0);
	assert_int_equal(s1.seen[0], 1);
	assert_int_equal(s1.seen[1], 0);
	/* During s1's callback: its group in flight, s2's waiting. */
	assert_int_equal(s1.pending_in_cb, 2);
	assert_int_equal(s2.seen[0], 1);
	assert_int_equal(s2.seen[1], 1);
	assert_int_equal(s2.seen[2], 1);
	assert_int_equal(s4.seen[0], 1);
	assert_int_equal(store_pending_commits(fx->s), 0);
	assert_int_equal(store_get_run(fx->s, "r1", &got), 0);
	kpl__store__v1__run_record__free_unpacked(got, NULL);

	/* Staged without a commit: still waiting for one, not written. */
	assert_int_equal(store_staged(fx->s), 1);
	assert_int_equal(event_visible(fx->s, "r1", 5), 0);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(event_visible(fx->s, "r1", 5), 1);
}

#define MANY 100
#define CHAIN 5

static void then_chain(struct step *st)
{
	if (!st->next)
		return;
	stage_event(st->fx->s, "r1", st->next->probe[0]);
	store_commit(st->fx->s, on_commit, st->next);
}

static void test_many_groups_in_flight(void **state)
{
	struct fx *fx = *state;
	static struct step steps[MANY + 1], chain[CHAIN], empty, late;
	struct evlog l = { .run_id = "r1" };

	order_n = 0;
	memset(steps, 0, sizeof steps);
	memset(chain, 0, sizeof chain);
	memset(&empty, 0, sizeof empty);
	memset(&late, 0, sizeof late);
	open_store(fx, &fx->loop, 0);
	block_pool(fx);

	for (int i = 0; i <= MANY; i++) {
		steps[i].fx = fx;
		steps[i].id = i;
		steps[i].probe[0] = (uint64_t)i + 1;
		steps[i].probe[1] = MANY + 1; /* last of the second group */
		stage_event(fx->s, "r1", (uint64_t)i + 1);
		store_commit(fx->s, on_commit, &steps[i]);
	}
	/* One in flight, all the rest gathered into one waiting group. */
	assert_int_equal(store_pending_commits(fx->s), 2);
	/* The last callback starts a chain: each link commits from the
	 * previous one's callback, so each is a group of its own. */
	steps[MANY].then = then_chain;
	steps[MANY].next = &chain[0];
	for (int i = 0; i < CHAIN; i++) {
		chain[i].fx = fx;
		chain[i].id = 1000 + i;
		chain[i].probe[0] = MANY + 2 + (uint64_t)i;
		chain[i].probe[1] = MANY + 3 + (uint64_t)i; /* the next link's: not yet */
		chain[i].then = then_chain;
		chain[i].next = i + 1 < CHAIN ? &chain[i + 1] : NULL;
	}

	release_pool(fx);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);

	assert_int_equal(order_n, MANY + 1 + CHAIN);
	for (int i = 0; i <= MANY; i++) {
		assert_int_equal(order_log[i], i);
		assert_int_equal(steps[i].called, 1);
		assert_int_equal(steps[i].status, 0);
		assert_int_equal(steps[i].seen[0], 1);
	}
	/* The first group was only event 1. */
	assert_int_equal(steps[0].seen[1], 0);
	assert_int_equal(steps[1].seen[1], 1);
	for (int i = 0; i < CHAIN; i++) {
		assert_int_equal(order_log[MANY + 1 + i], 1000 + i);
		assert_int_equal(chain[i].status, 0);
		assert_int_equal(chain[i].seen[0], 1);
		assert_int_equal(chain[i].seen[1], 0);
		/* Its own group is still in flight during its callback; the next
		 * link is committed only after the callback reads pending. */
		assert_int_equal(chain[i].pending_in_cb, 1);
	}
	assert_int_equal(store_read_events(fx->s, "r1", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, MANY + 1 + CHAIN);
	assert_false(l.bad);

	/* A commit with nothing staged still calls back, later, in order; a
	 * commit without a callback still commits. */
	empty.fx = fx;
	empty.id = 2000;
	store_commit(fx->s, on_commit, &empty);
	stage_event(fx->s, "r1", MANY + CHAIN + 2);
	store_commit(fx->s, NULL, NULL);
	late.fx = fx;
	late.id = 2001;
	late.probe[0] = MANY + CHAIN + 2;
	store_commit(fx->s, on_commit, &late);
	assert_int_equal(empty.called, 0);
	assert_int_equal(store_pending_commits(fx->s), 2);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(empty.called, 1);
	assert_int_equal(empty.status, 0);
	assert_int_equal(late.called, 1);
	assert_int_equal(late.seen[0], 1);
	assert_int_equal(order_log[order_n - 2], 2000);
	assert_int_equal(order_log[order_n - 1], 2001);
	assert_int_equal(store_pending_commits(fx->s), 0);
}

static void test_commit_failure(void **state)
{
	struct fx *fx = *state;
	size_t big_len = 2 << 20;
	char *big = malloc(big_len);
	struct step s1 = { fx, 1 }, s2 = { fx, 2 };
	Kpl__Store__V1__RunRecord *got = NULL;
	char *text = NULL;
	size_t len;

	assert_non_null(big);
	memset(big, 'x', big_len);
	/* A 1 MiB map cannot take a 2 MiB pipeline: MDB_MAP_FULL. */
	open_store(fx, &fx->loop, 1 << 20);
	stage_run(fx->s, "r1", "web", 1);
	store_stage_pipeline(fx->s, "r1", big, big_len);
	store_commit(fx->s, on_commit, &s1);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s1.called, 1);
	assert_int_equal(s1.status, KPL_EFULL);
	/* Nothing of the failed group was written. */
	assert_int_equal(store_get_run(fx->s, "r1", &got), KPL_ENOTFOUND);

	/* The store goes on working. */
	stage_run(fx->s, "r1", "web", 1);
	store_stage_pipeline(fx->s, "r1", "small", 5);
	store_commit(fx->s, on_commit, &s2);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s2.status, 0);
	assert_int_equal(store_get_pipeline(fx->s, "r1", &text, &len), 0);
	assert_string_equal(text, "small");
	free(text);

	/* The same through store_commit_sync: error, staged writes dropped. */
	store_stage_pipeline(fx->s, "r2", big, big_len);
	assert_int_equal(store_commit_sync(fx->s), KPL_EFULL);
	assert_int_equal(store_staged(fx->s), 0);
	assert_int_equal(store_get_pipeline(fx->s, "r2", &text, &len), KPL_ENOTFOUND);
	assert_int_equal(store_commit_sync(fx->s), 0);
	free(big);
}

/*
 * A callback registered while a commit is in flight cannot know whether its
 * writes were staged before that commit started (then they are in it): if
 * that commit fails, so does the callback, though its own group commits.
 * (SetSecret staged its secret, an audit entry's commit took it, and its
 * own callback, a group later, said it was stored.)
 */
static void test_failure_reaches_callbacks_in_flight(void **state)
{
	struct fx *fx = *state;
	size_t big_len = 2 << 20;
	char *big = malloc(big_len);
	struct step s1 = { fx, 1 }, s2 = { fx, 2 }, s3 = { fx, 3 };
	Kpl__Store__V1__RunRecord *got = NULL;

	assert_non_null(big);
	memset(big, 'x', big_len);
	open_store(fx, &fx->loop, 1 << 20);
	block_pool(fx);
	store_stage_pipeline(fx->s, "r1", big, big_len);
	store_commit(fx->s, on_commit, &s1);   /* in flight, then MDB_MAP_FULL */
	stage_run(fx->s, "r2", "web", 1);
	store_commit(fx->s, on_commit, &s2);   /* registered while it is in flight */
	release_pool(fx);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s1.status, KPL_EFULL);
	assert_int_equal(s2.status, KPL_EFULL);
	/* Its own group was written all the same. */
	assert_int_equal(store_get_run(fx->s, "r2", &got), 0);
	kpl__store__v1__run_record__free_unpacked(got, NULL);
	/* A commit after the failure is not told of it. */
	stage_run(fx->s, "r3", "web", 1);
	store_commit(fx->s, on_commit, &s3);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s3.status, 0);
	free(big);
}

/* --- Space --- */

static void log_event(Kpl__V1__RunEvent *ev, const char *run_id, uint64_t seq)
{
	kpl__v1__run_event__init(ev);
	ev->run_id = (char *)run_id;
	ev->seq = seq;
	ev->global_seq = seq;
	ev->pipeline_name = (char *)"flood";
	ev->stage = (char *)"s";
	ev->kind = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
	ev->message = (char *)"";
}

/* An event's cost is its records' real size: an empty line costs its key,
 * its packed value and LMDB's per-record overhead, twice (the global
 * index entry too). */
static void test_event_cost(void **state)
{
	const char *id = "01m91c1qskf5djv1";
	size_t klen = strlen(id) + 1 + 8, empty;
	Kpl__V1__RunEvent ev;

	(void)state;
	log_event(&ev, id, 7);
	empty = store_event_cost(&ev);
	assert_true(empty >= klen + kpl__v1__run_event__get_packed_size(&ev) + 8 + klen);
	assert_true(empty >= 80);
	ev.message = (char *)"hello";
	assert_int_equal(store_event_cost(&ev), empty + 2 + 5);
	ev.global_seq = 0;
	assert_true(store_event_cost(&ev) < empty);
}

/*
 * A 1 MiB map: ordinary writes stop at store_has_room's limit, well before
 * LMDB would say MDB_MAP_FULL; the reserve still takes a run's last writes
 * and a delete; the delete makes room again.
 */
static void test_room_and_reserve(void **state)
{
	struct fx *fx = *state;
	struct store_space sp;
	Kpl__V1__RunEvent ev;
	uint64_t seq = 1;
	size_t before;

	open_store(fx, &fx->loop, 1 << 20);
	store_space(fx->s, &sp);
	assert_int_equal(sp.map_size, 1 << 20);
	assert_int_equal(sp.reserve, 512 << 10);
	assert_true(sp.used > 0 && sp.used < (64 << 10));
	before = sp.used;
	stage_run(fx->s, "flood", "flood", 1);
	for (;;) {
		log_event(&ev, "flood", seq);
		if (!store_has_room(fx->s, store_event_cost(&ev)))
			break;
		store_stage_event(fx->s, &ev);
		seq++;
		if (seq % 100 == 0)
			assert_int_equal(store_commit_sync(fx->s), 0);
		assert_true(seq < 100000);
	}
	assert_int_equal(store_commit_sync(fx->s), 0);
	store_space(fx->s, &sp);
	assert_true(seq > 1000);
	assert_true(sp.used > before);
	assert_true(sp.used <= sp.map_size - sp.reserve);
	/* Full stays full (no taking and refusing in turns). */
	assert_int_equal(store_has_room(fx->s, 1), 0);

	/* The reserve takes what failing a run writes. */
	for (int i = 0; i < 50; i++) {
		log_event(&ev, "flood", seq++);
		ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE;
		ev.message = (char *)"the store is full";
		store_stage_event(fx->s, &ev);
	}
	stage_run(fx->s, "flood", "flood", seq);
	assert_int_equal(store_commit_sync(fx->s), 0);

	/* Deleting the run frees its pages: room again. */
	store_stage_delete_run(fx->s, "flood");
	assert_int_equal(store_commit_sync(fx->s), 0);
	store_space(fx->s, &sp);
	if (sp.used >= (256 << 10))
		fail_msg("used %zu after the delete", sp.used);
	assert_int_equal(store_has_room(fx->s, 1000), 1);
}

/* --- Global event index, deleting runs, oldest first --- */

/* Events seen by store_read_global: run id, seq and global seq of each. */
struct glog {
	char runs[256][STORE_MAX_RUN_ID_LEN + 1];
	uint64_t seqs[256];
	uint64_t gseqs[256];
	size_t n;
	size_t stop_at; /* return 5 after this many, 0 = never */
	int bad;        /* a field did not round-trip */
};

static int collect_global(void *data, const Kpl__V1__RunEvent *ev)
{
	struct glog *l = data;
	char msg[96];

	snprintf(msg, sizeof msg, "%s line %llu", ev->run_id, (unsigned long long)ev->seq);
	if (strcmp(ev->message, msg) != 0 || strcmp(ev->stage, "build") != 0 || ev->attempt != 2 ||
	    !ev->time || ev->time->seconds != 1700000000 + (int64_t)ev->seq)
		l->bad = 1;
	if (l->n < KPL_ARRAY_SIZE(l->seqs)) {
		snprintf(l->runs[l->n], sizeof l->runs[0], "%s", ev->run_id);
		l->seqs[l->n] = ev->seq;
		l->gseqs[l->n] = ev->global_seq;
	}
	l->n++;
	return l->stop_at && l->n >= l->stop_at ? 5 : 0;
}

/* Where each global seq of test_global_index lives. */
struct gwant {
	const char *run;
	uint64_t seq;
};

static void test_global_index(void **state)
{
	struct fx *fx = *state;
	struct gwant want[16];
	struct glog l;
	struct step s1 = { fx, 1 };
	size_t nwant = 0;

	open_store(fx, &fx->loop, 0);
	assert_int_equal(store_last_global_seq(fx->s), 0);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 0);
	assert_int_equal(l.n, 0);

	/* Group 1: "ab" and "abc" (a run id that is a prefix of another)
	 * interleaved; staged out of global order. */
	stage_gevent(fx->s, "ab", 1, 1);
	stage_gevent(fx->s, "abc", 1, 3);
	stage_gevent(fx->s, "ab", 2, 2);
	stage_gevent(fx->s, "ab", 3, 4);
	/* Not in the global index. */
	stage_gevent(fx->s, "nog", 1, 0);
	stage_gevent(fx->s, "nog", 2, 0);
	/* Each event with a global seq is two writes. */
	assert_int_equal(store_staged(fx->s), 10);
	assert_int_equal(store_commit_sync(fx->s), 0);
	want[nwant++] = (struct gwant){ "ab", 1 };
	want[nwant++] = (struct gwant){ "ab", 2 };
	want[nwant++] = (struct gwant){ "abc", 1 };
	want[nwant++] = (struct gwant){ "ab", 3 };
	assert_int_equal(store_last_global_seq(fx->s), 4);

	/* Group 2, on the loop: invisible until its commit. 255 -> 256 is
	 * where a little-endian key would sort wrong. */
	block_pool(fx);
	stage_gevent(fx->s, "abc", 2, 5);
	stage_gevent(fx->s, "x", 1, 255);
	stage_gevent(fx->s, "ab", 4, 256);
	stage_gevent(fx->s, "x", 2, (uint64_t)1 << 40);
	store_commit(fx->s, on_commit, &s1);
	assert_int_equal(store_last_global_seq(fx->s), 4);
	assert_int_equal(store_last_event_seq(fx->s, "x"), 0);
	release_pool(fx);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s1.status, 0);
	want[nwant++] = (struct gwant){ "abc", 2 };
	want[nwant++] = (struct gwant){ "x", 1 };
	want[nwant++] = (struct gwant){ "ab", 4 };
	want[nwant++] = (struct gwant){ "x", 2 };

	/* Group 3: the highest possible seq, and a run with no events. */
	stage_gevent(fx->s, "z", UINT64_MAX, ((uint64_t)1 << 40) + 1);
	stage_run(fx->s, "empty", "web", 1);
	assert_int_equal(store_commit_sync(fx->s), 0);
	want[nwant++] = (struct gwant){ "z", UINT64_MAX };

	static const uint64_t gseqs[] = { 1, 2, 3, 4, 5, 255, 256, (uint64_t)1 << 40,
					  ((uint64_t)1 << 40) + 1 };
	assert_int_equal(nwant, KPL_ARRAY_SIZE(gseqs));
	assert_int_equal(store_last_global_seq(fx->s), ((uint64_t)1 << 40) + 1);

	/* Everything, in global order, from 0 and from 1. */
	for (uint64_t from = 0; from <= 1; from++) {
		memset(&l, 0, sizeof l);
		assert_int_equal(store_read_global(fx->s, from, 0, collect_global, &l), 0);
		assert_int_equal(l.n, nwant);
		assert_false(l.bad);
		for (size_t i = 0; i < nwant; i++) {
			assert_string_equal(l.runs[i], want[i].run);
			assert_int_equal(l.seqs[i], want[i].seq);
			assert_int_equal(l.gseqs[i], gseqs[i]);
		}
	}

	/* From the middle: an exact global seq, and one between two. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 4, 0, collect_global, &l), 0);
	assert_int_equal(l.n, nwant - 3);
	assert_int_equal(l.gseqs[0], 4);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 6, 0, collect_global, &l), 0);
	assert_int_equal(l.n, 4);
	assert_int_equal(l.gseqs[0], 255);
	assert_string_equal(l.runs[0], "x");

	/* At most max. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 2, 3, collect_global, &l), 0);
	assert_int_equal(l.n, 3);
	assert_int_equal(l.gseqs[0], 2);
	assert_int_equal(l.gseqs[2], 4);

	/* fn stops the walk and its value comes back. */
	memset(&l, 0, sizeof l);
	l.stop_at = 2;
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 5);
	assert_int_equal(l.n, 2);

	/* Past the end. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, ((uint64_t)1 << 40) + 2, 0, collect_global, &l),
			 0);
	assert_int_equal(l.n, 0);
	assert_int_equal(store_read_global(fx->s, UINT64_MAX, 0, collect_global, &l), 0);
	assert_int_equal(l.n, 0);

	/* Last seq of a run: prefixes of other runs' ids on both sides, the
	 * first and the last run in the db, no events, UINT64_MAX. */
	assert_int_equal(store_last_event_seq(fx->s, "ab"), 4);
	assert_int_equal(store_last_event_seq(fx->s, "abc"), 2);
	assert_int_equal(store_last_event_seq(fx->s, "a"), 0);
	assert_int_equal(store_last_event_seq(fx->s, "abcd"), 0);
	assert_int_equal(store_last_event_seq(fx->s, "empty"), 0);
	assert_int_equal(store_last_event_seq(fx->s, "nog"), 2);
	assert_int_equal(store_last_event_seq(fx->s, "x"), 2);
	assert_int_equal(store_last_event_seq(fx->s, "z"), UINT64_MAX);
	assert_int_equal(store_last_event_seq(fx->s, "zz"), 0);
	assert_int_equal(store_last_event_seq(fx->s, "bad id"), 0);

	/* An event written again under a new global seq is read once, at the
	 * new one. */
	stage_gevent(fx->s, "abc", 2, ((uint64_t)1 << 40) + 2);
	assert_int_equal(store_commit_sync(fx->s), 0);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 0);
	assert_int_equal(l.n, nwant);
	assert_int_equal(l.gseqs[4], 255);
	assert_string_equal(l.runs[nwant - 1], "abc");
	assert_int_equal(l.seqs[nwant - 1], 2);
	/* The stale entry does not count towards max either. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 4, 2, collect_global, &l), 0);
	assert_int_equal(l.n, 2);
	assert_int_equal(l.gseqs[1], 255);

	/* Durable across a reopen. */
	reopen_store(fx);
	assert_int_equal(store_last_global_seq(fx->s), ((uint64_t)1 << 40) + 2);
	assert_int_equal(store_last_event_seq(fx->s, "ab"), 4);
}

/* Keys of db (raw, what is on disk) that start with prefix (plen bytes;
 * all keys if plen is 0), or that are prefix if exact; the same for
 * gevents values if db is "gevents:val". */
static size_t raw_count_keys(const char *dir, const char *db, const void *prefix, size_t plen,
			     int exact)
{
	int by_val = strcmp(db, "gevents:val") == 0;
	MDB_env *env = raw_open(dir);
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_cursor *cur;
	MDB_val k, v;
	size_t n = 0;
	int rc;

	assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
	assert_int_equal(mdb_dbi_open(txn, by_val ? "gevents" : db, 0, &dbi), 0);
	assert_int_equal(mdb_cursor_open(txn, dbi, &cur), 0);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		MDB_val *x = by_val ? &v : &k;

		if ((exact ? x->mv_size == plen : x->mv_size >= plen) &&
		    memcmp(x->mv_data, prefix, plen) == 0)
			n++;
	}
	assert_int_equal(rc, MDB_NOTFOUND);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	mdb_env_close(env);
	return n;
}

static size_t raw_count(const char *dir, const char *db, const void *prefix, size_t plen)
{
	return raw_count_keys(dir, db, prefix, plen, 0);
}

static const char *const all_dbs[] = { "runs",	"stages", "events",	 "pipelines",
				       "idem",	"active", "gevents", "gevents:val" };

/* Per db: keys (values for gevents:val) of a run (the id, or id + 0x00 +
 * a number), and all keys, counted on disk with the store closed. idem and
 * gevents keys are not run ids: own is 0 for them. */
struct census {
	size_t own[KPL_ARRAY_SIZE(all_dbs)];
	size_t total[KPL_ARRAY_SIZE(all_dbs)];
};

static void take_census(struct fx *fx, const char *id, struct census *c)
{
	char prefix[STORE_MAX_RUN_ID_LEN + 2];
	size_t len = strlen(id);

	memcpy(prefix, id, len + 1); /* with the 0x00 */
	store_close(fx->s);
	fx->s = NULL;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(all_dbs); i++) {
		int by_id = strcmp(all_dbs[i], "runs") == 0 || strcmp(all_dbs[i], "pipelines") == 0 ||
			    strcmp(all_dbs[i], "active") == 0;

		c->total[i] = raw_count(fx->dir, all_dbs[i], "", 0);
		if (strcmp(all_dbs[i], "idem") == 0 || strcmp(all_dbs[i], "gevents") == 0)
			c->own[i] = 0;
		else if (by_id)
			c->own[i] = raw_count_keys(fx->dir, all_dbs[i], id, len, 1);
		else
			c->own[i] = raw_count(fx->dir, all_dbs[i], prefix, len + 1);
	}
	open_store(fx, &fx->loop, 0);
}

static void stage_full_run(struct store *s, const char *id, const char *idem_key,
			   uint64_t nevents, uint64_t *gseq)
{
	Kpl__V1__Run run = KPL__V1__RUN__INIT;
	Kpl__Store__V1__RunRecord rec = KPL__STORE__V1__RUN_RECORD__INIT;

	run.id = (char *)id;
	run.pipeline_name = "web";
	run.idempotency_key = (char *)(idem_key ? idem_key : "");
	rec.run = &run;
	rec.next_seq = nevents + 1;
	rec.stage_count = 3;
	store_stage_run(s, &rec);
	for (uint32_t i = 0; i < 3; i++)
		stage_stage(s, id, i);
	for (uint64_t seq = 1; seq <= nevents; seq++)
		stage_gevent(s, id, seq, ++*gseq);
	store_stage_pipeline(s, id, "name: web\n", 10);
	store_stage_active(s, id, 1);
	if (idem_key)
		store_stage_idem(s, idem_key, id);
}

static int run_exists(struct store *s, const char *id)
{
	Kpl__Store__V1__RunRecord *got = NULL;
	int rc = store_get_run(s, id, &got);

	kpl__store__v1__run_record__free_unpacked(got, NULL);
	return rc == 0;
}

static void test_delete_run(void **state)
{
	struct fx *fx = *state;
	struct census before, after;
	struct glog l;
	struct step s1 = { fx, 1 };
	Kpl__Store__V1__StageRecord **st = NULL;
	char *text = NULL, *rid = NULL;
	size_t n = 0, len = 0;
	uint64_t gseq = 0;

	open_store(fx, &fx->loop, 0);
	/* Run ids that are prefixes of each other, on both sides of "ab". */
	stage_full_run(fx->s, "a", "key-a", 3, &gseq);      /* gseq 1..3 */
	stage_full_run(fx->s, "ab", "key-ab", 5, &gseq);    /* 4..8 */
	stage_full_run(fx->s, "abc", "key-abc", 4, &gseq);  /* 9..12 */
	stage_full_run(fx->s, "ab!", NULL, 2, &gseq);       /* 13..14; sorts between */
	assert_int_equal(store_commit_sync(fx->s), 0);
	/* "ab" also has an event without a global seq. */
	stage_gevent(fx->s, "ab", 6, 0);
	assert_int_equal(store_commit_sync(fx->s), 0);

	take_census(fx, "ab", &before);
	/* runs, stages, events, pipelines, idem, active, gevents, gevents:val */
	assert_int_equal(before.own[0], 1);
	assert_int_equal(before.own[3], 1);
	assert_int_equal(before.own[5], 1);
	assert_int_equal(before.own[1], 3);
	assert_int_equal(before.own[2], 6);
	assert_int_equal(before.own[7], 5);
	assert_int_equal(before.total[0], 4);
	assert_int_equal(before.total[4], 3);
	assert_int_equal(before.total[6], 14);

	/* In one group on the loop, in order: an event staged before the
	 * delete goes with the run, writes staged after it stay. */
	block_pool(fx);
	stage_gevent(fx->s, "ab", 7, ++gseq);          /* 15: deleted */
	stage_gevent(fx->s, "abc", 5, ++gseq);         /* 16: kept */
	store_stage_delete_run(fx->s, "ab");
	store_stage_delete_run(fx->s, "never-was");    /* missing is fine */
	stage_gevent(fx->s, "ab", 100, ++gseq);         /* 17: kept */
	store_commit(fx->s, on_commit, &s1);
	assert_true(run_exists(fx->s, "ab"));
	release_pool(fx);
	assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	assert_int_equal(s1.status, 0);

	assert_false(run_exists(fx->s, "ab"));
	assert_int_equal(store_last_event_seq(fx->s, "ab"), 100);
	assert_int_equal(store_get_stages(fx->s, "ab", &st, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(store_get_pipeline(fx->s, "ab", &text, &len), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem(fx->s, "key-ab", &rid), KPL_ENOTFOUND);

	/* The global index: "ab"'s old events are gone, everyone else's and
	 * the one written after the delete are there, in order. */
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 0);
	assert_false(l.bad);
	assert_int_equal(l.n, 3 + 4 + 2 + 2);
	for (size_t i = 0; i < l.n; i++) {
		assert_true(strcmp(l.runs[i], "ab") != 0 || l.seqs[i] == 100);
		assert_true(i == 0 || l.gseqs[i] > l.gseqs[i - 1]);
	}
	assert_int_equal(l.gseqs[3], 9);
	assert_int_equal(l.gseqs[l.n - 1], 17);

	/* On disk: no key of "ab" but the event written after the delete, and
	 * every key of the others. */
	take_census(fx, "ab", &after);
	assert_int_equal(after.own[0], 0);
	assert_int_equal(after.own[1], 0);
	assert_int_equal(after.own[2], 1);
	assert_int_equal(after.own[3], 0);
	assert_int_equal(after.own[5], 0);
	assert_int_equal(after.own[7], 1);
	assert_int_equal(after.total[0], before.total[0] - 1);
	assert_int_equal(after.total[1], before.total[1] - 3);
	assert_int_equal(after.total[2], before.total[2] - 6 + 2);
	assert_int_equal(after.total[3], before.total[3] - 1);
	assert_int_equal(after.total[4], before.total[4] - 1);
	assert_int_equal(after.total[5], before.total[5] - 1);
	assert_int_equal(after.total[6], before.total[6] - 5 + 2);
	assert_int_equal(raw_count(fx->dir, "runs", "ab", 2), 2); /* "ab!", "abc" */

	/* The others read as before. */
	static const char *const others[] = { "a", "abc", "ab!" };
	static const size_t nev[] = { 3, 5, 2 };
	for (size_t i = 0; i < KPL_ARRAY_SIZE(others); i++) {
		assert_true(run_exists(fx->s, others[i]));
		assert_int_equal(store_last_event_seq(fx->s, others[i]), nev[i]);
		assert_int_equal(store_get_stages(fx->s, others[i], &st, &n), 0);
		assert_int_equal(n, 3);
		store_free_stages(st, n);
		assert_int_equal(store_get_pipeline(fx->s, others[i], &text, &len), 0);
		free(text);
	}
	assert_int_equal(store_find_idem(fx->s, "key-abc", &rid), 0);
	assert_string_equal(rid, "abc");
	free(rid);

	/* The idem entry goes only if it maps to the deleted run: "abc"'s
	 * key now belongs to "a". */
	store_stage_idem(fx->s, "key-abc", "a");
	store_stage_delete_run(fx->s, "abc");
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_find_idem(fx->s, "key-abc", &rid), 0);
	assert_string_equal(rid, "a");
	free(rid);
	assert_int_equal(store_find_idem(fx->s, "key-a", &rid), 0);
	free(rid);
	assert_int_equal(store_last_event_seq(fx->s, "abc"), 0);
	assert_int_equal(store_last_event_seq(fx->s, "ab"), 100);

	/* A run without a run record: the rest still goes. */
	store_stage_delete_run(fx->s, "ab");
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_last_event_seq(fx->s, "ab"), 0);

	/* Deleting the newest events' run lowers the last global seq. */
	assert_int_equal(store_last_global_seq(fx->s), 14);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 0);
	assert_int_equal(l.n, 3 + 2);
	take_census(fx, "ab", &after);
	assert_int_equal(after.total[6], 5);
	assert_int_equal(after.total[7], 5);
}

/* An index entry whose event is gone is skipped, and not counted in max. */
static void test_global_dangling(void **state)
{
	struct fx *fx = *state;
	unsigned char gkey[8] = { 0, 0, 0, 0, 0, 0, 0, 2 };
	unsigned char gval[3 + 8] = { 'r', '9', 0, 0, 0, 0, 0, 0, 0, 0, 1 };
	unsigned char bkey[8] = { 0, 0, 0, 0, 0, 0, 0, 9 };
	struct glog l;

	open_store(fx, NULL, 0);
	stage_gevent(fx->s, "r1", 1, 1);
	stage_gevent(fx->s, "r1", 2, 3);
	stage_gevent(fx->s, "r1", 3, 4);
	store_close(fx->s);
	fx->s = NULL;
	raw_put(fx->dir, "gevents", gkey, sizeof gkey, gval, sizeof gval);
	open_store(fx, NULL, 0);

	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 2, collect_global, &l), 0);
	assert_int_equal(l.n, 2);
	assert_int_equal(l.gseqs[0], 1);
	assert_int_equal(l.gseqs[1], 3);

	/* An entry that is not an event key is corruption. */
	store_close(fx->s);
	fx->s = NULL;
	raw_put(fx->dir, "gevents", bkey, sizeof bkey, "r1", 2);
	open_store(fx, NULL, 0);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), KPL_ECORRUPT);
	assert_int_equal(l.n, 3);
	assert_int_equal(store_last_global_seq(fx->s), 9);
}

#define BIG_RUN 100000

/* A run with many events goes in one transaction. */
static void test_delete_big_run(void **state)
{
	struct fx *fx = *state;
	struct glog l;
	uint64_t gseq = 0;

	open_store(fx, NULL, 0);
	stage_full_run(fx->s, "big", "key-big", BIG_RUN, &gseq);
	stage_full_run(fx->s, "bi", NULL, 2, &gseq);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_last_event_seq(fx->s, "big"), BIG_RUN);
	assert_int_equal(store_last_global_seq(fx->s), BIG_RUN + 2);

	store_stage_delete_run(fx->s, "big");
	assert_int_equal(store_staged(fx->s), 1);
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_last_event_seq(fx->s, "big"), 0);
	assert_false(run_exists(fx->s, "big"));
	memset(&l, 0, sizeof l);
	assert_int_equal(store_read_global(fx->s, 0, 0, collect_global, &l), 0);
	assert_int_equal(l.n, 2);
	assert_string_equal(l.runs[0], "bi");
	assert_int_equal(l.gseqs[0], BIG_RUN + 1);
	store_close(fx->s);
	fx->s = NULL;
	assert_int_equal(raw_count(fx->dir, "events", "", 0), 2);
	assert_int_equal(raw_count(fx->dir, "gevents", "", 0), 2);
	assert_int_equal(raw_count(fx->dir, "stages", "", 0), 3);
	assert_int_equal(raw_count(fx->dir, "idem", "", 0), 0);
}

static void test_list_runs_oldest(void **state)
{
	struct fx *fx = *state;
	static const char *ids[] = {
		"20260101T000000Z-0003", "20260101T000000Z-0001", "20260101T000000Z-0005",
		"20260101T000000Z-0002", "20260101T000000Z-0004",
	};
	struct runlog l = { 0 };

	open_store(fx, NULL, 0);
	assert_int_equal(store_list_runs_oldest(fx->s, collect_run, &l), 0);
	assert_int_equal(l.n, 0);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(ids); i++)
		stage_run(fx->s, ids[i], "web", 1);
	assert_int_equal(store_commit_sync(fx->s), 0);

	assert_int_equal(store_list_runs_oldest(fx->s, collect_run, &l), 0);
	assert_int_equal(l.n, 5);
	for (size_t i = 0; i < 5; i++) {
		char want[32];

		snprintf(want, sizeof want, "20260101T000000Z-%04zu", i + 1);
		assert_string_equal(l.ids[i], want);
	}

	/* fn stops the walk and its value comes back. */
	memset(&l, 0, sizeof l);
	l.stop_at = 2;
	assert_int_equal(store_list_runs_oldest(fx->s, collect_run, &l), 9);
	assert_int_equal(l.n, 2);
	assert_string_equal(l.ids[1], "20260101T000000Z-0002");

	/* Deleted runs are not listed. */
	store_stage_delete_run(fx->s, "20260101T000000Z-0001");
	assert_int_equal(store_commit_sync(fx->s), 0);
	memset(&l, 0, sizeof l);
	assert_int_equal(store_list_runs_oldest(fx->s, collect_run, &l), 0);
	assert_int_equal(l.n, 4);
	assert_string_equal(l.ids[0], "20260101T000000Z-0002");
}

/* --- Corruption --- */

static void test_corrupt_records(void **state)
{
	struct fx *fx = *state;
	/* Field 1, length 16, but only 2 bytes follow. */
	static const char bad[] = "\x0a\x10" "ab";
	unsigned char skey[3 + 4] = { 'r', '1', 0, 0, 0, 0, 0 };
	unsigned char ekey[3 + 8] = { 'r', '1', 0, 0, 0, 0, 0, 0, 0, 0, 1 };
	Kpl__Store__V1__RunRecord *got = NULL;
	Kpl__Store__V1__StageRecord **st = NULL;
	struct evlog l = { .run_id = "r1" };
	struct runlog rl = { 0 };
	char *rid = NULL;
	size_t n = 0;

	open_store(fx, NULL, 0);
	stage_run(fx->s, "r2", "web", 1);
	stage_event(fx->s, "r2", 1);
	store_stage_active(fx->s, "r1", 1);
	store_close(fx->s);
	fx->s = NULL;

	raw_put(fx->dir, "runs", "r1", 2, bad, sizeof bad - 1);
	raw_put(fx->dir, "stages", skey, sizeof skey, bad, sizeof bad - 1);
	raw_put(fx->dir, "events", ekey, sizeof ekey, bad, sizeof bad - 1);
	raw_put(fx->dir, "idem", "k", 1, "r 1", 3);
	open_store(fx, NULL, 0);

	assert_int_equal(store_get_run(fx->s, "r1", &got), KPL_ECORRUPT);
	assert_null(got);
	assert_int_equal(store_get_stages(fx->s, "r1", &st, &n), KPL_ECORRUPT);
	assert_null(st);
	assert_int_equal(n, 0);
	assert_int_equal(store_read_events(fx->s, "r1", 0, 0, collect_event, &l), KPL_ECORRUPT);
	assert_int_equal(l.n, 0);
	/* Newest first: r2 is fine, then r1 is not. */
	assert_int_equal(store_list_runs(fx->s, NULL, collect_run, &rl), KPL_ECORRUPT);
	assert_int_equal(rl.n, 1);
	assert_string_equal(rl.ids[0], "r2");
	memset(&rl, 0, sizeof rl);
	assert_int_equal(store_list_active(fx->s, collect_run, &rl), KPL_ECORRUPT);
	assert_int_equal(store_find_idem(fx->s, "k", &rid), KPL_ECORRUPT);
	assert_null(rid);

	/* Good records next to bad ones still read. */
	assert_int_equal(store_get_run(fx->s, "r2", &got), 0);
	kpl__store__v1__run_record__free_unpacked(got, NULL);
	memset(&l, 0, sizeof l);
	l.run_id = "r2";
	assert_int_equal(store_read_events(fx->s, "r2", 0, 0, collect_event, &l), 0);
	assert_int_equal(l.n, 1);
}

/* Idempotency keys per pipeline: one key under two pipelines is two entries,
 * apart from an entry of before (key alone); deleting a run deletes its own
 * entry of either kind and nothing of the other pipeline's. */
static void test_idem_per_pipeline(void **state)
{
	struct fx *fx = *state;
	uint64_t gseq = 0;
	char *rid = NULL;

	open_store(fx, &fx->loop, 0);
	stage_full_run(fx->s, "w1", NULL, 1, &gseq); /* pipeline "web" */
	store_stage_idem_scoped(fx->s, "web", "k", "w1");
	store_stage_idem_scoped(fx->s, "api", "k", "a1");
	store_stage_idem(fx->s, "old", "o1");
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_find_idem_scoped(fx->s, "web", "k", &rid), 0);
	assert_string_equal(rid, "w1");
	free(rid);
	assert_int_equal(store_find_idem_scoped(fx->s, "api", "k", &rid), 0);
	assert_string_equal(rid, "a1");
	free(rid);
	assert_int_equal(store_find_idem_scoped(fx->s, "ap", "k", &rid), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem_scoped(fx->s, "web", "old", &rid), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem(fx->s, "k", &rid), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem(fx->s, "old", &rid), 0);
	free(rid);
	assert_int_equal(store_find_idem_scoped(fx->s, "", "k", &rid), KPL_EINVAL);
	/* Any pipeline: the first by name ("api"); "k" is not "k2"'s prefix. */
	assert_int_equal(store_find_idem_any(fx->s, "k", &rid), 0);
	assert_string_equal(rid, "a1");
	free(rid);
	assert_int_equal(store_find_idem_any(fx->s, "ok", &rid), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem_any(fx->s, "ol", &rid), KPL_ENOTFOUND);
	/* w1's record says key "k" and pipeline "web": only that entry goes. */
	{
		Kpl__V1__Run run = KPL__V1__RUN__INIT;
		Kpl__Store__V1__RunRecord rec = KPL__STORE__V1__RUN_RECORD__INIT;

		run.id = "w1";
		run.pipeline_name = "web";
		run.idempotency_key = "k";
		rec.run = &run;
		store_stage_run(fx->s, &rec);
	}
	store_stage_delete_run(fx->s, "w1");
	assert_int_equal(store_commit_sync(fx->s), 0);
	assert_int_equal(store_find_idem_scoped(fx->s, "web", "k", &rid), KPL_ENOTFOUND);
	assert_int_equal(store_find_idem_scoped(fx->s, "api", "k", &rid), 0);
	free(rid);
}

int main(void)
{
	/* Before libuv starts its pool (first uv_queue_work): see the top. */
	setenv("UV_THREADPOOL_SIZE", "1", 1);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_run_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_invalid_ids, setup, teardown),
		cmocka_unit_test_setup_teardown(test_stages_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_events_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pipeline_idem_active, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reopen_and_schema, setup, teardown),
		cmocka_unit_test_setup_teardown(test_schema_newer_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_open_errors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_list_runs, setup, teardown),
		cmocka_unit_test_setup_teardown(test_group_commit_async, setup, teardown),
		cmocka_unit_test_setup_teardown(test_many_groups_in_flight, setup, teardown),
		cmocka_unit_test_setup_teardown(test_commit_failure, setup, teardown),
		cmocka_unit_test_setup_teardown(test_failure_reaches_callbacks_in_flight, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_event_cost, setup, teardown),
		cmocka_unit_test_setup_teardown(test_room_and_reserve, setup, teardown),
		cmocka_unit_test_setup_teardown(test_corrupt_records, setup, teardown),
		cmocka_unit_test_setup_teardown(test_global_index, setup, teardown),
		cmocka_unit_test_setup_teardown(test_global_dangling, setup, teardown),
		cmocka_unit_test_setup_teardown(test_delete_run, setup, teardown),
		cmocka_unit_test_setup_teardown(test_delete_big_run, setup, teardown),
		cmocka_unit_test_setup_teardown(test_list_runs_oldest, setup, teardown),
		cmocka_unit_test_setup_teardown(test_idem_per_pipeline, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
