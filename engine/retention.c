/*
 * retention.c - forgets old runs: their records, every event (and its
 * global index entry), their pipeline text and their workspace directory.
 *
 * A finished run goes when it is older than the age limit, or when more
 * finished runs than the count limit are kept (oldest first). A run that has
 * not finished is never touched, and the newest run is always kept, so the
 * global event sequence never goes back. The sweep runs at start and then
 * every hour, deleting at most RETENTION_BATCH runs per loop turn so the
 * loop stays responsive; directories are removed on libuv's thread pool.
 */
#define _XOPEN_SOURCE 700
#include "engine/retention.h"

#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LOG "retention"
#define RETENTION_BATCH 500
#define RETENTION_PERIOD_MS (60 * 60 * 1000)
#define CLOCK_POLL_MS 50

static const int64_t day_ms = 24LL * 60 * 60 * 1000;

struct retention {
	uv_loop_t *loop;
	struct store *store;
	char *work_dir;
	struct retention_options opt;
	uv_timer_t timer;
	int pending_rm;     /* workspace removals in flight */
	bool stopping;
	bool closing;
	void (*stop_done)(void *);
	void *stop_data;
	uint64_t deleted_total;
	uint64_t sweeps;
	int64_t next_due;   /* on the test clock: when the next sweep is due */
};

struct rm_work {
	uv_work_t req;
	struct retention *r;
	char *path;
};

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

static void rm_work(uv_work_t *req)
{
	struct rm_work *w = req->data;
	nftw(w->path, rm_one, 32, FTW_DEPTH | FTW_PHYS);
}

static void timer_closed(uv_handle_t *h)
{
	struct retention *r = h->data;

	r->stop_done(r->stop_data);
}

/* Stopped once no removal is in flight; the owner frees r in done. */
static void maybe_stopped(struct retention *r)
{
	if (r->stopping && r->pending_rm == 0 && !r->closing) {
		r->closing = true;
		uv_close((uv_handle_t *)&r->timer, timer_closed);
	}
}

static void rm_done(uv_work_t *req, int status)
{
	struct rm_work *w = req->data;
	struct retention *r = w->r;

	(void)status;
	free(w->path);
	free(w);
	r->pending_rm--;
	maybe_stopped(r);
}

struct sweep {
	struct retention *r;
	int64_t cutoff;
	size_t total;      /* finished runs seen */
	size_t to_drop;    /* by count */
	char **ids;
	size_t n, cap;
	char newest[128];
};

static int newest_id(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct sweep *s = data;

	if (rec->run && rec->run->id)
		snprintf(s->newest, sizeof s->newest, "%s", rec->run->id);
	return 1;
}

static int count_runs(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct sweep *s = data;

	(void)rec;
	s->total++;
	return 0;
}

static bool final_state(Kpl__V1__RunState st)
{
	return st == KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED ||
	       st == KPL__V1__RUN_STATE__RUN_STATE_FAILED ||
	       st == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED;
}

static int pick_runs(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct sweep *s = data;
	const Kpl__V1__Run *run = rec->run;
	int64_t created;
	bool drop;

	if (s->n >= RETENTION_BATCH)
		return 1;
	if (!run || !run->id || strcmp(run->id, s->newest) == 0)
		return 0;
	if (!final_state(run->state))
		return 0;
	created = run->created_at ? run->created_at->seconds * 1000 : 0;
	drop = s->to_drop > 0 || (s->cutoff && created && created < s->cutoff);
	if (!drop)
		return 0;
	if (s->to_drop)
		s->to_drop--;
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 64;
		s->ids = kpl_realloc(s->ids, s->cap * sizeof *s->ids);
	}
	s->ids[s->n++] = kpl_strdup(run->id);
	return 0;
}

static void sweep_committed(void *data, int status)
{
	(void)data;
	if (status)
		kpl_warn(LOG, "deleting old runs failed: %s", kpl_strerror(status));
}

/* The sweep's now: the real clock, or the test clock's file (the real
 * clock while the file cannot be read). */
static int64_t clock_now(const struct retention *r)
{
	char buf[32] = "", *end;
	long long v;
	FILE *f;

	if (!r->opt.clock_file || !(f = fopen(r->opt.clock_file, "re")))
		return kpl_now_ms();
	if (!fgets(buf, sizeof buf, f))
		buf[0] = '\0';
	fclose(f);
	v = strtoll(buf, &end, 10);
	return end != buf && v > 0 ? (int64_t)v : kpl_now_ms();
}

/* One batch; returns how many runs it deleted. */
static size_t sweep_once(struct retention *r, int64_t now)
{
	struct sweep s = { .r = r };

	if (r->opt.max_age_days > 0)
		s.cutoff = now - (int64_t)r->opt.max_age_days * day_ms;
	store_list_runs(r->store, NULL, newest_id, &s);
	store_list_runs_oldest(r->store, count_runs, &s);
	if (r->opt.max_runs > 0 && s.total > r->opt.max_runs)
		s.to_drop = s.total - r->opt.max_runs;
	store_list_runs_oldest(r->store, pick_runs, &s);
	for (size_t i = 0; i < s.n; i++) {
		struct rm_work *w = kpl_calloc(1, sizeof *w);
		store_stage_delete_run(r->store, s.ids[i]);
		w->req.data = w;
		w->r = r;
		w->path = kpl_asprintf("%s/%s", r->work_dir, s.ids[i]);
		r->pending_rm++;
		uv_queue_work(r->loop, &w->req, rm_work, rm_done);
		free(s.ids[i]);
	}
	free(s.ids);
	if (s.n)
		store_commit(r->store, sweep_committed, r);
	r->deleted_total += s.n;
	return s.n;
}

static void on_timer(uv_timer_t *t)
{
	struct retention *r = t->data;
	int64_t now = clock_now(r);
	size_t n;

	if (r->stopping)
		return;
	if (r->opt.clock_file && now < r->next_due) {
		uv_timer_start(&r->timer, on_timer, CLOCK_POLL_MS, 0);
		return;
	}
	n = sweep_once(r, now);
	r->sweeps++;
	if (n)
		kpl_info(LOG, "deleted %zu old run%s (older than %u days or beyond the newest %u)",
			 n, n == 1 ? "" : "s", r->opt.max_age_days, r->opt.max_runs);
	/* Tests wait for this line. */
	if (r->opt.clock_file)
		kpl_info(LOG, "sweep %llu done: %zu deleted", (unsigned long long)r->sweeps, n);
	else
		kpl_debug(LOG, "sweep %llu done: %zu deleted", (unsigned long long)r->sweeps, n);
	/* A full batch: go on at once (next loop turn), else wait an hour. */
	r->next_due = n == RETENTION_BATCH ? now : now + RETENTION_PERIOD_MS;
	uv_timer_start(&r->timer, on_timer, n == RETENTION_BATCH ? 0
			: r->opt.clock_file ? CLOCK_POLL_MS : RETENTION_PERIOD_MS, 0);
}

int retention_start(uv_loop_t *loop, struct store *store, const char *work_dir,
		    const struct retention_options *opt, struct retention **out)
{
	struct retention *r = kpl_calloc(1, sizeof *r);

	r->loop = loop;
	r->store = store;
	r->work_dir = kpl_strdup(work_dir);
	r->opt = *opt;
	r->opt.clock_file = opt->clock_file ? kpl_strdup(opt->clock_file) : NULL;
	if (r->opt.clock_file)
		kpl_warn(LOG, "KPL_TEST_RETENTION_CLOCK: the sweep's clock is %s (tests only)",
			 r->opt.clock_file);
	uv_timer_init(loop, &r->timer);
	r->timer.data = r;
	if (opt->max_age_days || opt->max_runs)
		uv_timer_start(&r->timer, on_timer, 0, 0);
	*out = r;
	return 0;
}

void retention_stop(struct retention *r, void (*done)(void *data), void *data)
{
	r->stopping = true;
	r->stop_done = done;
	r->stop_data = data;
	uv_timer_stop(&r->timer);
	maybe_stopped(r);
}

void retention_free(struct retention *r)
{
	free(r->work_dir);
	free((char *)r->opt.clock_file);
	free(r);
}

uint64_t retention_deleted(const struct retention *r)
{
	return r->deleted_total;
}
