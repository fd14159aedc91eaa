/*
 * engine.c - runs, stages, their state machines and the scheduler.
 *
 * Every change of a run or stage goes through run_set_state() or
 * stage_set_state(): they check the transition against one table, stage the
 * records and one event in the store, and ask for a commit. Work that must
 * not happen before its state is durable (starting a stage's process) waits
 * for that commit's callback.
 */
#include "engine/engine.h"

#include <dirent.h>
#include <errno.h>
#include <openssl/sha.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "google/protobuf/timestamp.pb-c.h"
#include "base/logline.h"
#include "engine/metrics.h"
#include "engine/notify.h"
#include "pipelines/expr.h"
#include "pipelines/pipeline.h"
#include "pipelines/runs_on.h"
#include "pipelines/reuse.h"
#include "pipelines/template.h"
#include "base/http.h"
#include "stages/stage.h"

/* Buckets of run subscribers (a power of two). */
#define ENGINE_SUB_BUCKETS 256
#define LOG "engine"
#define ENGINE_PL_CACHE 32 /* parsed pipelines kept (struct engine) */
#define ENGINE_DEFAULT_LOG_CAP ((uint64_t)16 * 1024 * 1024)
#define ENGINE_DEFAULT_RUN_BUDGET ((uint64_t)256 * 1024 * 1024)
/* What a submit needs beyond its pipeline text before it is refused. */
#define ENGINE_SUBMIT_ROOM ((size_t)64 * 1024)
#define ENGINE_DEFAULT_BACKOFF_MS 1000
#define ENGINE_DEFAULT_MAX_BACKOFF_MS (5 * 60 * 1000)

struct run;

/* A CancelRun caller waiting for the run to end. */
struct waiter {
	engine_submit_cb cb;
	void *data;
	struct waiter *next;
};

struct stage {
	struct run *run;                 /* owner */
	uint32_t index;
	const struct pl_stage *spec;     /* borrowed from run->pl */
	const struct stage_kind *kind;   /* static */
	Kpl__V1__StageState state;
	uint32_t attempt;
	char *message;                   /* owned */
	int64_t started_ms, finished_ms;
	char **out_keys, **out_values;   /* owned outputs */
	size_t n_out;
	int64_t pid;                     /* resume data, see stage_record_resume */
	uint64_t pid_start;
	char *resume;                    /* owned */
	int64_t deadline_ms;
	void *impl;                      /* the kind's */
	bool live;        /* start returned 0 and stage_done not yet called */
	bool cancel_sent; /* kind->cancel called for this attempt */
	bool timed_out;   /* the engine's timer fired for this attempt */
	bool no_retry;    /* this attempt's failure is final (a rejection) */
	uv_timer_t *timer;               /* deadline timer; freed in close cb */
	uint32_t tries;                  /* attempts in the run's current attempt */
	int64_t retry_at_ms;             /* PENDING until then after a failure */
	uv_timer_t *retry_timer;         /* freed in close cb */
	uint64_t log_bytes;              /* store bytes of this attempt's log */
	bool log_cut;
	/* Templates of `with` expanded for this attempt, and the env. */
	const struct pl_node **tpl_nodes;
	char **tpl_values;
	size_t n_tpl;
	char **env_names, **env_values;
	size_t n_env;
};

struct run {
	struct engine *eng;
	struct run *next, *prev;         /* engine->runs */
	struct run *hnext;               /* engine->by_id chain */
	bool linked;                     /* in engine->runs and by_id */
	char id[KPL_RUN_ID_LEN + 1];
	struct pipeline *pl;             /* owned */
	char **param_names, **param_values; /* owned, n_params */
	size_t n_params;
	char *idem_key;                  /* owned, NULL if none */
	Kpl__V1__RunState state;
	int64_t created_ms, started_ms, finished_ms;
	char *message;                   /* owned */
	uint64_t next_seq;
	uint64_t store_bytes;            /* of its events (store_event_cost) */
	/* Owned; set when kpld stops the run itself (budget, store full, a
	 * failed commit): it stops like a cancel and ends FAILED with this. */
	char *stop_msg;
	bool commit_failed;              /* run_commit_failed ran once */
	bool cancel_requested;
	bool finally_started;
	uint32_t attempt;                /* 1, then +1 per RetryRun */
	bool advancing, advance_again;   /* see run_advance */
	uint64_t commits_issued, commits_done, final_commit_no; /* run_commit calls */
	char *group;                     /* concurrency group key, or NULL */
	/* The pipeline's `timeout:`, armed while RUNNING to started_ms plus
	 * it (started_at is stored, so a restart arms it again to the same
	 * deadline); freed in its close callback. */
	uv_timer_t *timer;
	/* Owned; where the text came from (kpl.v1.PipelineSource), NULL
	 * members unknown (runs stored before kpl kept it). */
	char *src_repo, *src_commit, *src_path, *src_ref, *src_sha256;
	/* A fork's pull request (engine_source): no ${{ secrets.X }}. */
	bool secrets_withheld;
	/* Owned; the stage templates the pipeline uses (reuse.h), n_tpl. */
	struct run_file {
		char *path, *sha256, *text;
		size_t len;
	} *tpl;
	size_t n_tpl;
	bool stored;                     /* first commit done */
	bool final_durable;
	struct stage *stages;            /* owned, n_stages */
	size_t n_stages;
	char *workspace;                 /* owned */
	/* A stage asked for the workspace (so it may exist), or the run was
	 * recovered: only then is there raw output to forget. */
	bool workspace_used;
	int refs;                        /* pending commit callbacks */
	struct waiter *waiters;          /* owned list */
	struct waiter *submit_waiters;   /* same idempotency key, before stored */
	engine_submit_cb submit_cb;      /* until the first commit */
	void *submit_data;
};

struct engine {
	uv_loop_t *loop;
	struct store *store;
	const struct cfg *cfg;
	struct secrets *secrets;
	struct http_client *http;         /* shared by every kind that speaks HTTP */
	struct notify *notify;            /* pipelines' notify: (notify.h) */
	char *work_dir;
	struct run *runs;
	/* The runs in memory by id, chained (run_link/run_unlink): every RPC,
	 * commit callback and recovery finds its run here. A walk of the list
	 * made a restart with 10,000 runs in flight take 8 s. Owned, by_id_cap
	 * buckets (a power of two). */
	struct run **by_id;
	size_t by_id_cap, n_runs;
	/* Subscribers: subs[0] hear of every run, subs[1 + hash of the run
	 * id] of one run each, so a commit walks its own run's (and the
	 * every-run ones), not every subscriber of every run. */
	struct engine_sub *subs[1 + ENGINE_SUB_BUCKETS];
	/* Pipelines parsed lately, by the SHA-256 of their text (those without
	 * template files only): the parse was a sixth of the loop's time per
	 * noop run, and a team submits the same file again and again. Each
	 * entry owns one reference (pipeline_ref). */
	struct pl_cached {
		char sha256[2 * SHA256_DIGEST_LENGTH + 1];
		struct pipeline *pl;
		uint64_t used;
	} pl_cache[ENGINE_PL_CACHE];
	uint64_t pl_cache_tick;
	uint64_t next_gseq;              /* global event sequence */
	uint64_t log_cap;
	uint64_t run_budget;
	bool stopping;
	void (*stop_done)(void *);
	void *stop_data;
};

static void run_advance(struct run *r);
static void run_maybe_free(struct run *r);
static void group_kick(struct engine *e, const struct run *r);
static void stage_attempt_failed(struct stage *st, const char *msg);

/* ---------------------------------------------------------------------- */
/* Run ids */

void engine_new_run_id(char out[KPL_RUN_ID_LEN + 1])
{
	static const char b32[] = "0123456789abcdefghjkmnpqrstvwxyz";
	static uint64_t last_ms, last_rand;
	uint64_t ms = (uint64_t)kpl_now_ms(), rnd;

	/* 10 chars of time (50 bits, ms) then 6 of randomness (30 bits). Ids
	 * made in the same millisecond count up, so ids always sort in the
	 * order they were made. */
	if (ms <= last_ms) {
		ms = last_ms;
		rnd = last_rand + 1;
	} else {
		rnd = ((uint64_t)random() ^ ((uint64_t)random() << 15)) & 0x1fffffff;
	}
	last_ms = ms;
	last_rand = rnd;
	for (int i = 9; i >= 0; i--, ms >>= 5)
		out[i] = b32[ms & 31];
	for (int i = 15; i >= 10; i--, rnd >>= 5)
		out[i] = b32[rnd & 31];
	out[16] = '\0';
}

/* ---------------------------------------------------------------------- */
/* Transition tables: the only legal moves. */

static bool run_state_final(Kpl__V1__RunState s)
{
	return s == KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED ||
	       s == KPL__V1__RUN_STATE__RUN_STATE_FAILED ||
	       s == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED;
}

static bool stage_state_final(Kpl__V1__StageState s)
{
	return s == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED ||
	       s == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED ||
	       s == KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED ||
	       s == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
}

static bool run_transition_ok(Kpl__V1__RunState from, Kpl__V1__RunState to)
{
	switch (from) {
	case KPL__V1__RUN_STATE__RUN_STATE_UNSPECIFIED:
		return to == KPL__V1__RUN_STATE__RUN_STATE_QUEUED;
	case KPL__V1__RUN_STATE__RUN_STATE_QUEUED:
		return to == KPL__V1__RUN_STATE__RUN_STATE_RUNNING ||
		       to == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED ||
		       to == KPL__V1__RUN_STATE__RUN_STATE_FAILED;
	case KPL__V1__RUN_STATE__RUN_STATE_RUNNING:
		return run_state_final(to);
	case KPL__V1__RUN_STATE__RUN_STATE_FAILED:
	case KPL__V1__RUN_STATE__RUN_STATE_CANCELLED:
		/* RetryRun only. */
		return to == KPL__V1__RUN_STATE__RUN_STATE_QUEUED;
	default:
		return false;
	}
}

static bool stage_transition_ok(Kpl__V1__StageState from, Kpl__V1__StageState to)
{
	switch (from) {
	case KPL__V1__STAGE_STATE__STAGE_STATE_PENDING:
		return to == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
	case KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING:
		return to == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_WAITING ||
		       to == KPL__V1__STAGE_STATE__STAGE_STATE_PENDING;
	case KPL__V1__STAGE_STATE__STAGE_STATE_WAITING:
		return to == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
		       stage_state_final(to);
	default:
		/* From a final state only back to PENDING, by RetryRun. */
		return to == KPL__V1__STAGE_STATE__STAGE_STATE_PENDING;
	}
}

static const char *run_state_name(Kpl__V1__RunState s)
{
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&kpl__v1__run_state__descriptor, s);
	return v ? v->name + strlen("RUN_STATE_") : "?";
}

static const char *stage_state_name(Kpl__V1__StageState s)
{
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&kpl__v1__stage_state__descriptor, s);
	return v ? v->name + strlen("STAGE_STATE_") : "?";
}

/* ---------------------------------------------------------------------- */
/* Records and events */

static Google__Protobuf__Timestamp *ts_set(Google__Protobuf__Timestamp *ts, int64_t ms)
{
	if (!ms)
		return NULL;
	google__protobuf__timestamp__init(ts);
	ts->seconds = ms / 1000;
	ts->nanos = (int32_t)(ms % 1000) * 1000000;
	return ts;
}

static void run_stage_record(struct run *r)
{
	Kpl__Store__V1__RunRecord rec = KPL__STORE__V1__RUN_RECORD__INIT;
	Kpl__V1__Run run = KPL__V1__RUN__INIT;
	Kpl__V1__PipelineSource src;
	Google__Protobuf__Timestamp tc, ts, tf;
	Kpl__V1__Run__ParamsEntry *entries = NULL, **eptrs = NULL;

	run.id = r->id;
	run.pipeline_name = r->pl->name;
	run.state = r->state;
	run.created_at = ts_set(&tc, r->created_ms);
	run.started_at = ts_set(&ts, r->started_ms);
	run.finished_at = ts_set(&tf, r->finished_ms);
	run.message = r->message ? r->message : "";
	run.idempotency_key = r->idem_key ? r->idem_key : "";
	run.last_seq = r->next_seq - 1;
	run.attempt = r->attempt;
	run.concurrency_group = r->group ? r->group : "";
	if (r->src_sha256) {
		kpl__v1__pipeline_source__init(&src);
		src.repo = r->src_repo ? r->src_repo : "";
		src.commit = r->src_commit ? r->src_commit : "";
		src.path = r->src_path ? r->src_path : "";
		src.ref = r->src_ref ? r->src_ref : "";
		src.sha256 = r->src_sha256;
		src.secrets_withheld = r->secrets_withheld;
		run.source = &src;
	}
	Kpl__V1__PipelineFile *pf = NULL, **pub = NULL, **full = NULL;
	if (r->n_tpl) {
		/* The record keeps the texts; the public view only names them. */
		pf = kpl_calloc(2 * r->n_tpl, sizeof *pf);
		pub = kpl_calloc(r->n_tpl, sizeof *pub);
		full = kpl_calloc(r->n_tpl, sizeof *full);
		for (size_t i = 0; i < r->n_tpl; i++) {
			kpl__v1__pipeline_file__init(&pf[2 * i]);
			kpl__v1__pipeline_file__init(&pf[2 * i + 1]);
			pf[2 * i].path = pf[2 * i + 1].path = r->tpl[i].path;
			pf[2 * i].sha256 = pf[2 * i + 1].sha256 = r->tpl[i].sha256;
			pf[2 * i + 1].text = r->tpl[i].text;
			pub[i] = &pf[2 * i];
			full[i] = &pf[2 * i + 1];
		}
		src.n_templates = r->n_tpl;
		src.templates = pub;
		rec.n_templates = r->n_tpl;
		rec.templates = full;
	}
	if (r->n_params) {
		entries = kpl_calloc(r->n_params, sizeof *entries);
		eptrs = kpl_calloc(r->n_params, sizeof *eptrs);
		for (size_t i = 0; i < r->n_params; i++) {
			kpl__v1__run__params_entry__init(&entries[i]);
			entries[i].key = r->param_names[i];
			entries[i].value = r->param_values[i];
			eptrs[i] = &entries[i];
		}
	}
	run.n_params = r->n_params;
	run.params = eptrs;
	rec.run = &run;
	rec.next_seq = r->next_seq;
	rec.stage_count = (uint32_t)r->n_stages;
	rec.cancel_requested = r->cancel_requested;
	rec.store_bytes = r->store_bytes;
	rec.stop_message = r->stop_msg ? r->stop_msg : "";
	store_stage_run(r->eng->store, &rec);
	free(entries);
	free(eptrs);
	free(pf);
	free(pub);
	free(full);
}

static void stage_stage_record(struct stage *st)
{
	Kpl__Store__V1__StageRecord rec = KPL__STORE__V1__STAGE_RECORD__INIT;
	Kpl__V1__StageStatus s = KPL__V1__STAGE_STATUS__INIT;
	Google__Protobuf__Timestamp ts, tf;
	Kpl__V1__StageStatus__OutputsEntry *entries = NULL, **eptrs = NULL;

	s.name = st->spec->name;
	s.state = st->state;
	s.message = st->message ? st->message : "";
	s.attempt = st->attempt;
	s.started_at = ts_set(&ts, st->started_ms);
	s.finished_at = ts_set(&tf, st->finished_ms);
	s.kind = st->spec->kind;
	s.n_needs = st->spec->n_needs;
	s.needs = st->spec->needs;
	if (st->n_out) {
		entries = kpl_calloc(st->n_out, sizeof *entries);
		eptrs = kpl_calloc(st->n_out, sizeof *eptrs);
		for (size_t i = 0; i < st->n_out; i++) {
			kpl__v1__stage_status__outputs_entry__init(&entries[i]);
			entries[i].key = st->out_keys[i];
			entries[i].value = st->out_values[i];
			eptrs[i] = &entries[i];
		}
	}
	s.n_outputs = st->n_out;
	s.outputs = eptrs;
	rec.status = &s;
	rec.index = st->index;
	rec.pid = st->pid;
	rec.pid_start_time = st->pid_start;
	rec.deadline_ms = st->deadline_ms;
	rec.resume = st->resume ? st->resume : "";
	rec.retry_at_ms = st->retry_at_ms;
	rec.log_bytes = st->log_bytes;
	rec.log_cut = st->log_cut;
	rec.tries = st->tries;
	store_stage_stage(st->run->eng->store, st->run->id, &rec);
	free(entries);
	free(eptrs);
}

/*
 * Text from commands and remote systems as kpl keeps it: every secret
 * redacted (cut: SECRETS_CUT_* for a piece of a longer line), then valid
 * UTF-8 (protobuf strings must be). Returns a malloc'd, NUL-terminated copy
 * and its length in *out_len.
 */
static char *clean_text(struct engine *e, const char *text, size_t len, unsigned cut,
			size_t *out_len)
{
	size_t rlen;
	char *red = secrets_redact_cut(e->secrets, text, len, cut, &rlen);
	char *out = logline_utf8_clean(red ? red : text, red ? rlen : len, out_len);

	free(red);
	return out;
}

static size_t run_event_as_is(struct run *r, Kpl__V1__EventKind kind, struct stage *st,
			      Kpl__V1__LogStream stream, const char *msg);

/* Stages one event of the run; seq numbers have no gaps. msg is cleaned
 * (clean_text) on the way. Returns the bytes it takes in the store, which
 * count against the run's budget. */
static size_t run_event(struct run *r, Kpl__V1__EventKind kind, struct stage *st,
			Kpl__V1__LogStream stream, const char *msg, size_t msg_len)
{
	size_t n, cost;
	char *copy = msg ? clean_text(r->eng, msg, msg_len, 0, &n) : NULL;

	cost = run_event_as_is(r, kind, st, stream, copy);
	free(copy);
	return cost;
}

/* Fills ev with an event of the run as it would be staged now (the next
 * seq and global seq, not taken yet), msg (NULL for none) already clean. */
static void event_init(struct run *r, Kpl__V1__RunEvent *ev, Google__Protobuf__Timestamp *t,
		       Kpl__V1__EventKind kind, struct stage *st, Kpl__V1__LogStream stream,
		       const char *msg)
{
	kpl__v1__run_event__init(ev);
	ev->run_id = r->id;
	ev->seq = r->next_seq;
	ev->global_seq = r->eng->next_gseq;
	ev->pipeline_name = r->pl->name;
	ev->time = ts_set(t, kpl_now_ms());
	ev->kind = kind;
	ev->run_state = r->state;
	if (st) {
		ev->stage = st->spec->name;
		ev->stage_state = st->state;
		ev->attempt = st->attempt;
	} else {
		ev->stage = "";
	}
	ev->stream = stream;
	ev->message = msg ? (char *)msg : "";
}

/* The same with msg (NULL for none) already clean. */
static size_t run_event_as_is(struct run *r, Kpl__V1__EventKind kind, struct stage *st,
			      Kpl__V1__LogStream stream, const char *msg)
{
	Kpl__V1__RunEvent ev;
	Google__Protobuf__Timestamp t;
	size_t cost;

	event_init(r, &ev, &t, kind, st, stream, msg);
	r->next_seq++;
	r->eng->next_gseq++;
	store_stage_event(r->eng->store, &ev);
	cost = store_event_cost(&ev);
	r->store_bytes += cost;
	/* notify: its outbox records go into the same commit as the event. */
	if (r->pl->n_notify && r->eng->notify)
		notify_event(r->eng->notify, r->pl, &ev);
	return cost;
}

static size_t run_hash(const char *id, size_t cap);

static struct engine_sub **sub_bucket(struct engine *e, const char *run_id)
{
	return &e->subs[run_id[0] ? 1 + run_hash(run_id, ENGINE_SUB_BUCKETS) : 0];
}

static void notify_subs(struct engine *e, const char *run_id)
{
	struct engine_sub *s, *next;

	for (s = e->subs[0]; s; s = next) {
		next = s->next; /* notify may unsubscribe itself */
		s->notify(s);
	}
	for (s = *sub_bucket(e, run_id); s; s = next) {
		next = s->next;
		if (strcmp(s->run_id, run_id) == 0)
			s->notify(s);
	}
}

static void run_commit_failed(struct run *r, int status);

/*
 * What the run's commands printed reached kpld through files in their
 * attempts' directories (WORKSPACE/.kpl/STAGE.N/output, and the outputs
 * they wrote), raw, before redaction. Once the run's final state is
 * durable nothing reads them again (a restart resumes no attempt of a
 * final run), so no secret a command printed is kept on disk past it.
 */
static void forget_raw_output(const struct run *r)
{
	char *kdir = kpl_asprintf("%s/.kpl", r->workspace);
	/* The commands could write there: no symlink is followed (a planted
	 * one would have kpld delete files elsewhere). */
	int kfd = kpl_open_ws(kdir, O_RDONLY | O_DIRECTORY), sfd;
	struct dirent *de;
	DIR *d = kfd >= 0 ? fdopendir(kfd) : NULL;

	if (!d && kfd >= 0)
		close(kfd);
	while (d && (de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		sfd = openat(dirfd(d), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (sfd < 0)
			continue;
		unlinkat(sfd, "output", 0);
		unlinkat(sfd, "outputs", 0);
		close(sfd);
	}
	if (d)
		closedir(d);
	free(kdir);
}

static void run_committed(void *data, int status)
{
	struct run *r = data;
	struct engine *e = r->eng;

	r->refs--;
	if (status) {
		r->commits_done++; /* done, if not written: see run_commit_failed */
		run_commit_failed(r, status);
		run_maybe_free(r);
		return;
	}
	if (!r->stored) {
		struct waiter *w = r->submit_waiters, *next;
		r->stored = true;
		r->submit_waiters = NULL;
		if (r->submit_cb) {
			engine_submit_cb cb = r->submit_cb;
			r->submit_cb = NULL;
			cb(r->submit_data, 0, r->id);
		}
		for (; w; w = next) {
			next = w->next;
			w->cb(w->data, 0, r->id);
			free(w);
		}
	}
	r->commits_done++;
	if (r->final_commit_no && r->commits_done >= r->final_commit_no && !r->final_durable) {
		struct waiter *w = r->waiters, *next;
		r->final_durable = true;
		/* A path walk per run that never had a workspace was a tenth of
		 * the loop's time for noop runs. */
		if (r->workspace_used)
			forget_raw_output(r);
		r->waiters = NULL;
		for (; w; w = next) {
			next = w->next;
			w->cb(w->data, 0, r->id);
			free(w);
		}
	}
	if (!e->stopping)
		notify_subs(e, r->id);
	run_maybe_free(r);
}

/* Asks for everything staged so far to be made durable, for this run. */
static void run_commit(struct run *r)
{
	r->refs++;
	r->commits_issued++;
	store_commit(r->eng->store, run_committed, r);
}

static void set_str(char **dst, const char *s)
{
	free(*dst);
	*dst = s ? kpl_strdup(s) : NULL;
}

/* Messages come from commands and remote systems: no secret is kept in one. */
static void set_redacted(struct engine *e, char **dst, const char *s)
{
	size_t n;

	free(*dst);
	*dst = s ? clean_text(e, s, strlen(s), 0, &n) : NULL;
}

/*
 * kpld stops the run itself: like a cancel (running stages are stopped, the
 * rest not started, `finally` runs), but the run ends FAILED with msg, which
 * names why (its budget, the store full). Once per run; a final run is left
 * alone. Recorded on the run record, so a restart ends it the same way.
 */
static void run_stop(struct run *r, const char *msg)
{
	if (r->stop_msg || run_state_final(r->state))
		return;
	kpl_warn(LOG, "run %s: stopped: %s", r->id, msg);
	r->stop_msg = kpl_strdup(msg);
	r->cancel_requested = true;
	run_stage_record(r);
	run_commit(r);
	run_advance(r);
}

/*
 * A commit that held this run's writes failed (the map full past the
 * reserve, or the disk): none of that group was written, so memory is
 * ahead of the store. Rather than stop kpld, the store is brought back in
 * line and the run is stopped: its events go on from the last durable seq
 * (the lost ones stay lost; a later write of the same seq replaces one
 * still staged), and its run and stage records are staged whole again. A
 * submit still waiting hears the error. Once per run, so a store that
 * fails every commit cannot make this loop; the run is then left as the
 * store has it, for the next start.
 */
static void run_commit_failed(struct run *r, int status)
{
	struct engine *e = r->eng;
	char why[400];
	struct waiter *w, *next;

	if (status == KPL_EFULL)
		store_full_msg(e->store, why, sizeof why);
	else
		snprintf(why, sizeof why, "a store write failed: %s", kpl_strerror(status));
	kpl_error(LOG, "run %s: commit failed: %s", r->id, why);
	if (!r->stored) {
		w = r->submit_waiters;
		r->submit_waiters = NULL;
		if (r->submit_cb) {
			engine_submit_cb cb = r->submit_cb;
			r->submit_cb = NULL;
			cb(r->submit_data, status, r->id);
		}
		for (; w; w = next) {
			next = w->next;
			w->cb(w->data, status, r->id);
			free(w);
		}
	}
	if (r->commit_failed || e->stopping)
		return;
	r->commit_failed = true;
	r->next_seq = store_last_event_seq(e->store, r->id) + 1;
	for (size_t i = 0; i < r->n_stages; i++)
		stage_stage_record(&r->stages[i]);
	if (!run_state_final(r->state)) {
		store_stage_active(e->store, r->id, 1);
		run_stop(r, why);
	} else {
		/* Its final event was lost: record the end again. */
		run_event(r, KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE, NULL,
			  KPL__V1__LOG_STREAM__LOG_STREAM_UNSPECIFIED, r->message,
			  r->message ? strlen(r->message) : 0);
		store_stage_active(e->store, r->id, 0);
		run_stage_record(r);
		run_commit(r);
		r->final_commit_no = r->commits_issued;
	}
}

static void run_timer_closed(uv_handle_t *h)
{
	free(h);
}

static void run_stop_timeout(struct run *r)
{
	if (r->timer) {
		uv_close((uv_handle_t *)r->timer, run_timer_closed);
		r->timer = NULL;
	}
}

static void run_timeout_fired(uv_timer_t *t)
{
	struct run *r = t->data;
	char d[40], msg[120];

	run_stop_timeout(r);
	/* A cancel already under way ends CANCELLED, as asked. */
	if (run_state_final(r->state) || r->cancel_requested || r->eng->stopping)
		return;
	if (r->pl->timeout_ms % 3600000 == 0)
		snprintf(d, sizeof d, "%lldh", (long long)(r->pl->timeout_ms / 3600000));
	else if (r->pl->timeout_ms % 1000)
		snprintf(d, sizeof d, "%lldms", (long long)r->pl->timeout_ms);
	else if (r->pl->timeout_ms % 60000)
		snprintf(d, sizeof d, "%llds", (long long)(r->pl->timeout_ms / 1000));
	else
		snprintf(d, sizeof d, "%lldm", (long long)(r->pl->timeout_ms / 60000));
	snprintf(msg, sizeof msg, "the run exceeded its timeout of %s (the pipeline's "
		 "timeout:)", d);
	run_stop(r, msg);
}

/* Arms the run's timeout if it has one and is RUNNING. */
static void run_arm_timeout(struct run *r)
{
	int64_t left;

	if (!r->pl->timeout_ms || r->timer || r->state != KPL__V1__RUN_STATE__RUN_STATE_RUNNING)
		return;
	left = r->started_ms + r->pl->timeout_ms - kpl_now_ms();
	r->timer = kpl_malloc(sizeof *r->timer);
	uv_timer_init(r->eng->loop, r->timer);
	r->timer->data = r;
	uv_timer_start(r->timer, run_timeout_fired, left > 0 ? (uint64_t)left : 0, 0);
}

/* The one way a run changes state. */
static void run_set_state(struct run *r, Kpl__V1__RunState to, const char *msg)
{
	if (!run_transition_ok(r->state, to))
		BUG("run %s: illegal transition %s -> %s", r->id,
		    run_state_name(r->state), run_state_name(to));
	kpl_debug(LOG, "run %s: %s -> %s", r->id, run_state_name(r->state),
		  run_state_name(to));
	metrics_run_state(r->state, to);
	r->state = to;
	if (to == KPL__V1__RUN_STATE__RUN_STATE_RUNNING)
		r->started_ms = kpl_now_ms();
	if (run_state_final(to))
		r->finished_ms = kpl_now_ms();
	if (msg)
		set_redacted(r->eng, &r->message, msg);
	run_event(r, KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE, NULL,
		  KPL__V1__LOG_STREAM__LOG_STREAM_UNSPECIFIED, msg, msg ? strlen(msg) : 0);
	run_stage_record(r);
	if (run_state_final(to)) {
		store_stage_active(r->eng->store, r->id, 0);
		kpl_info(LOG, "run %s (%s) %s%s%s", r->id, r->pl->name,
			 run_state_name(to), msg && *msg ? ": " : "", msg ? msg : "");
	}
	run_commit(r);
	/* run_committed calls come back in order: the final state is durable
	 * once this many of them have. */
	if (run_state_final(to))
		r->final_commit_no = r->commits_issued;
	if (to == KPL__V1__RUN_STATE__RUN_STATE_RUNNING)
		run_arm_timeout(r);
	else
		run_stop_timeout(r);
	if (run_state_final(to) && r->group)
		group_kick(r->eng, r);
	for (size_t i = 0; run_state_final(to) && i < r->n_stages; i++)
		if (r->stages[i].kind && r->stages[i].kind->run_ended)
			r->stages[i].kind->run_ended(&r->stages[i]);
}

/* The stage's `timeout`; a kind with with_timeout also takes `with.timeout`
 * (the script kind's first format), the stage-level key winning. */
static int64_t stage_timeout_ms(const struct stage *st)
{
	const struct pl_node *t;

	if (st->spec->timeout_ms || !st->kind->with_timeout || !st->spec->with)
		return st->spec->timeout_ms;
	t = pl_map_get(st->spec->with, "timeout");
	if (!t || t->type != PL_SCALAR)
		return 0;
	return pl_parse_duration(t->scalar) > 0 ? pl_parse_duration(t->scalar) : 0;
}

/* The one way a stage changes state. */
static void stage_set_state(struct stage *st, Kpl__V1__StageState to, const char *msg)
{
	struct run *r = st->run;
	Kpl__V1__StageState from = st->state;

	if (!stage_transition_ok(st->state, to))
		BUG("run %s stage %s: illegal transition %s -> %s", r->id,
		    st->spec->name, stage_state_name(st->state), stage_state_name(to));
	kpl_debug(LOG, "run %s stage %s: %s -> %s", r->id, st->spec->name,
		  stage_state_name(st->state), stage_state_name(to));
	st->state = to;
	if (to == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING &&
	    from != KPL__V1__STAGE_STATE__STAGE_STATE_WAITING) {
		st->attempt++;
		st->tries++;
		st->started_ms = kpl_now_ms();
		st->finished_ms = 0;
		st->deadline_ms = stage_timeout_ms(st) ? st->started_ms + stage_timeout_ms(st) : 0;
		st->pid = 0;
		st->pid_start = 0;
		st->retry_at_ms = 0;
		st->log_bytes = 0;
		st->log_cut = false;
		st->no_retry = false;
		set_str(&st->resume, NULL);
	}
	if (stage_state_final(to))
		st->finished_ms = kpl_now_ms();
	if (stage_state_final(to) && (from == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
				      from == KPL__V1__STAGE_STATE__STAGE_STATE_WAITING))
		metrics_stage_done(st->spec->kind, (double)(st->finished_ms - st->started_ms) / 1000);
	set_redacted(r->eng, &st->message, msg);
	run_event(r, KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE, st,
		  KPL__V1__LOG_STREAM__LOG_STREAM_UNSPECIFIED, msg, msg ? strlen(msg) : 0);
	stage_stage_record(st);
	/* next_seq moved: keep the run record's copy current. */
	run_stage_record(r);
	run_commit(r);
}

/* ---------------------------------------------------------------------- */
/* What kinds may call (stages/stage.h) */

uv_loop_t *stage_loop(struct stage *st) { return st->run->eng->loop; }
const char *stage_name(struct stage *st) { return st->spec->name; }
const char *stage_run_id(struct stage *st) { return st->run->id; }
uint32_t stage_attempt(struct stage *st) { return st->attempt; }
const struct pl_stage *stage_spec(struct stage *st) { return st->spec; }
const char *stage_workspace(struct stage *st)
{
	st->run->workspace_used = true;
	return st->run->workspace;
}
int64_t stage_deadline_ms(struct stage *st) { return st->deadline_ms; }
void *stage_impl(struct stage *st) { return st->impl; }
void stage_set_impl(struct stage *st, void *impl) { st->impl = impl; }

void stage_params(struct stage *st, const char *const **names,
		  const char *const **values, size_t *n)
{
	*names = (const char *const *)st->run->param_names;
	*values = (const char *const *)st->run->param_values;
	*n = st->run->n_params;
}

void stage_env(struct stage *st, const struct pl_env **penv, size_t *np,
	       const struct pl_env **senv, size_t *ns)
{
	*penv = st->run->pl->env;
	*np = st->run->pl->n_env;
	*senv = st->spec->env;
	*ns = st->spec->n_env;
}

void stage_env_expanded(struct stage *st, const char *const **names,
			const char *const **values, size_t *n)
{
	*names = (const char *const *)st->env_names;
	*values = (const char *const *)st->env_values;
	*n = st->n_env;
}

const struct pl_node *stage_with_get(struct stage *st, const char *key)
{
	return st->spec->with ? pl_map_get(st->spec->with, key) : NULL;
}

char *stage_expand(struct stage *st, const struct pl_node *scalar)
{
	if (!scalar)
		return NULL;
	for (size_t i = 0; i < st->n_tpl; i++)
		if (st->tpl_nodes[i] == scalar)
			return kpl_strdup(st->tpl_values[i]);
	return kpl_strdup(scalar->scalar ? scalar->scalar : "");
}

/* Stages one log event (msg clean), within the attempt's cap, the run's
 * budget and the store's room; false if nothing staged. Each counts the
 * event's bytes in the store (store_event_cost), so an empty line costs
 * its record. */
static bool stage_log_one(struct stage *st, Kpl__V1__LogStream stream, const char *line)
{
	struct run *r = st->run;
	struct engine *e = r->eng;
	Kpl__V1__RunEvent ev;
	Google__Protobuf__Timestamp t;
	char note[400], stop[400] = "";
	size_t cost;

	if (st->log_cut)
		return false;
	event_init(r, &ev, &t, KPL__V1__EVENT_KIND__EVENT_KIND_LOG, st, stream, line);
	cost = store_event_cost(&ev);
	if (r->store_bytes + cost > e->run_budget)
		snprintf(stop, sizeof stop, "the run's events reached its budget of %llu bytes "
			 "in the store", (unsigned long long)e->run_budget);
	else if (!store_has_room(e->store, cost))
		store_full_msg(e->store, stop, sizeof stop);
	if (stop[0]) {
		snprintf(note, sizeof note, "log cut here: %s; later lines were not kept", stop);
		st->log_cut = true;
		run_event_as_is(r, KPL__V1__EVENT_KIND__EVENT_KIND_LOG, st,
				KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, note);
		stage_stage_record(st);
		run_stop(r, stop);
		return true;
	}
	if (st->log_bytes + cost > e->log_cap) {
		snprintf(note, sizeof note,
			 "log cut here: this attempt's log reached the cap of %llu bytes; "
			 "later lines were not kept", (unsigned long long)e->log_cap);
		st->log_cut = true;
		run_event_as_is(r, KPL__V1__EVENT_KIND__EVENT_KIND_LOG, st,
				KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, note);
		stage_stage_record(st);
		return true;
	}
	st->log_bytes += run_event_as_is(r, KPL__V1__EVENT_KIND__EVENT_KIND_LOG, st, stream,
					 line);
	return true;
}

/* A line (or a piece the shim cut, cut: SECRETS_CUT_*) redacted whole,
 * then in events of at most KPL_MAX_LOG_LINE bytes: redaction comes first
 * so no secret is split between events. */
static bool stage_log_event(struct stage *st, Kpl__V1__LogStream stream,
			    const char *line, size_t len, unsigned cut)
{
	size_t clen, off = 0;
	char *text;
	bool any = false;

	if (st->run->eng->stopping || st->log_cut)
		return false;
	text = clean_text(st->run->eng, line, len, cut, &clen);
	do {
		size_t n = logline_split(text + off, clen - off, KPL_MAX_LOG_LINE);
		char save = text[off + n];

		text[off + n] = '\0';
		any |= stage_log_one(st, stream, text + off);
		text[off + n] = save;
		off += n;
	} while (off < clen && !st->log_cut);
	free(text);
	return any;
}

_Static_assert(STAGE_LOG_CUT_START == SECRETS_CUT_START && STAGE_LOG_CUT_END == SECRETS_CUT_END,
	       "stage.h and secrets.h name the same cuts");

void stage_log(struct stage *st, Kpl__V1__LogStream stream, const char *line, size_t len)
{
	if (stage_log_event(st, stream, line, len, 0))
		run_commit(st->run);
}

void stage_log_staged(struct stage *st, Kpl__V1__LogStream stream, const char *line,
		      size_t len)
{
	stage_log_event(st, stream, line, len, 0);
}

void stage_log_piece_staged(struct stage *st, Kpl__V1__LogStream stream, const char *line,
			    size_t len, unsigned cut)
{
	stage_log_event(st, stream, line, len, cut);
}

void stage_log_piece(struct stage *st, Kpl__V1__LogStream stream, const char *line,
		     size_t len, unsigned cut, bool commit)
{
	if (stage_log_event(st, stream, line, len, cut) && commit)
		run_commit(st->run);
}

void stage_save_resume(struct stage *st, const char *resume)
{
	if (st->run->eng->stopping)
		return;
	set_str(&st->resume, resume);
	stage_stage_record(st);
	run_commit(st->run);
}

void stage_logf(struct stage *st, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	stage_log(st, KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, buf,
		  (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

int stage_set_output(struct stage *st, const char *key, const char *value)
{
	size_t i, klen;
	char *k;

	if (strlen(key) > KPL_MAX_NAME_LEN || strlen(value) > KPL_MAX_VALUE_LEN)
		return KPL_ETOOBIG;
	/* Outputs are shown by GetRun and kept in the store: no secret in one,
	 * and valid UTF-8 (the key too: a map key is a protobuf string). */
	k = clean_text(st->run->eng, key, strlen(key), 0, &klen);
	for (i = 0; i < st->n_out; i++)
		if (strcmp(st->out_keys[i], k) == 0)
			break;
	if (i == st->n_out) {
		if (st->n_out >= KPL_MAX_PARAMS) {
			free(k);
			return KPL_ETOOBIG;
		}
		st->out_keys = kpl_realloc(st->out_keys, (i + 1) * sizeof *st->out_keys);
		st->out_values = kpl_realloc(st->out_values, (i + 1) * sizeof *st->out_values);
		st->out_keys[i] = k;
		st->out_values[i] = NULL;
		st->n_out++;
	} else {
		free(k);
	}
	set_redacted(st->run->eng, &st->out_values[i], value);
	return 0;
}

struct resume_wait {
	struct stage *st;
	void (*done)(struct stage *, int, void *);
	void *data;
};

static void resume_committed(void *data, int status)
{
	struct resume_wait *w = data;
	struct run *r = w->st->run;

	w->done(w->st, status, w->data);
	free(w);
	r->refs--;
	run_maybe_free(r);
}

void stage_record_resume(struct stage *st, int64_t pid, uint64_t pid_start,
			 const char *resume, void (*done)(struct stage *, int, void *),
			 void *data)
{
	struct resume_wait *w = kpl_malloc(sizeof *w);

	st->pid = pid;
	st->pid_start = pid_start;
	set_str(&st->resume, resume);
	stage_stage_record(st);
	w->st = st;
	w->done = done;
	w->data = data;
	st->run->refs++;
	store_commit(st->run->eng->store, resume_committed, w);
}

void stage_resume_info(struct stage *st, int64_t *pid, uint64_t *pid_start,
		       const char **resume)
{
	*pid = st->pid;
	*pid_start = st->pid_start;
	*resume = st->resume ? st->resume : "";
}

static void timer_closed(uv_handle_t *h)
{
	free(h);
}

static void stage_stop_timer(struct stage *st)
{
	if (st->timer) {
		uv_close((uv_handle_t *)st->timer, timer_closed);
		st->timer = NULL;
	}
}

static void format_duration(char *buf, size_t n, int64_t ms)
{
	if (ms % 1000)
		snprintf(buf, n, "%lldms", (long long)ms);
	else if (ms % 60000)
		snprintf(buf, n, "%llds", (long long)(ms / 1000));
	else
		snprintf(buf, n, "%lldm", (long long)(ms / 60000));
}

void stage_wait(struct stage *st, const char *msg)
{
	if (st->run->eng->stopping)
		return;
	stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_WAITING, msg);
}

void stage_done(struct stage *st, Kpl__V1__StageState state, const char *msg)
{
	struct run *r = st->run;
	char buf[256];

	if (r->eng->stopping)
		return; /* abandoned: the restart decides */
	if (!st->live)
		BUG("run %s stage %s: stage_done without a live attempt", r->id,
		    st->spec->name);
	st->live = false;
	st->impl = NULL;
	stage_stop_timer(st);
	if (r->stop_msg && !st->spec->is_finally &&
	    (state == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED ||
	     state == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED)) {
		/* Stopped by run_stop: it failed for the run's reason. */
		snprintf(buf, sizeof buf, "%s", r->stop_msg);
		state = KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
		msg = buf;
	} else if (st->timed_out && state == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED) {
		char d[32];
		format_duration(d, sizeof d, stage_timeout_ms(st));
		snprintf(buf, sizeof buf, "timed out after %s", d);
		state = KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
		msg = buf;
	}
	if (state == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED)
		stage_attempt_failed(st, msg);
	else
		stage_set_state(st, state, msg);
	run_advance(r);
}

static void retry_timer_fired(uv_timer_t *t)
{
	struct stage *st = t->data;

	uv_close((uv_handle_t *)t, timer_closed);
	st->retry_timer = NULL;
	st->retry_at_ms = 0;
	run_advance(st->run);
}

static void stage_arm_retry(struct stage *st)
{
	int64_t left = st->retry_at_ms - kpl_now_ms();

	if (st->retry_timer)
		return;
	st->retry_timer = kpl_malloc(sizeof *st->retry_timer);
	uv_timer_init(st->run->eng->loop, st->retry_timer);
	st->retry_timer->data = st;
	uv_timer_start(st->retry_timer, retry_timer_fired, left > 0 ? (uint64_t)left : 0, 0);
}

static void stage_stop_retry(struct stage *st)
{
	if (st->retry_timer) {
		uv_close((uv_handle_t *)st->retry_timer, timer_closed);
		st->retry_timer = NULL;
	}
}

/* Exponential backoff with equal jitter: half the delay fixed, half random. */
static int64_t retry_delay_ms(const struct pl_retries *p, uint32_t tries)
{
	int64_t base = p->backoff_ms > 0 ? p->backoff_ms : ENGINE_DEFAULT_BACKOFF_MS;
	int64_t cap = p->max_backoff_ms > 0 ? p->max_backoff_ms : ENGINE_DEFAULT_MAX_BACKOFF_MS;
	int64_t d = base;

	for (uint32_t i = 1; i < tries && d < cap; i++)
		d *= 2;
	if (d > cap)
		d = cap;
	return d / 2 + (int64_t)(random() % (d / 2 + 1));
}

/*
 * An attempt ended badly: back to PENDING for another attempt after the
 * backoff if the retry policy allows it, else FAILED. The retry's time is
 * stored, so a restart keeps it.
 */
static void stage_attempt_failed(struct stage *st, const char *msg)
{
	struct run *r = st->run;
	char buf[700], d[32];
	int64_t delay;

	if ((r->cancel_requested && !st->spec->is_finally) || st->no_retry ||
	    st->tries > st->spec->retries.count) {
		stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return;
	}
	delay = retry_delay_ms(&st->spec->retries, st->tries);
	format_duration(d, sizeof d, delay);
	snprintf(buf, sizeof buf, "attempt %u failed: %s; retrying in %s (%u of %u retries)",
		 st->attempt, msg ? msg : "", d, st->tries, st->spec->retries.count);
	/* Before the state change, so its commit holds the time: set after,
	 * it waited for the run's next commit, and a restart before that ran
	 * the retry at once. */
	st->retry_at_ms = kpl_now_ms() + delay;
	stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_PENDING, buf);
	/* The PENDING event's time may be later than the line above (a busy
	 * host deschedules us): the timer counts from now, so the retry never
	 * starts sooner after the event than it says. */
	st->retry_at_ms = kpl_now_ms() + delay;
	stage_arm_retry(st);
}

/* ---------------------------------------------------------------------- */
/* Expressions and templates */

static const char *stage_state_word(Kpl__V1__StageState s)
{
	switch (s) {
	case KPL__V1__STAGE_STATE__STAGE_STATE_PENDING: return "pending";
	case KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING: return "running";
	case KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED: return "succeeded";
	case KPL__V1__STAGE_STATE__STAGE_STATE_FAILED: return "failed";
	case KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED: return "skipped";
	case KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED: return "cancelled";
	case KPL__V1__STAGE_STATE__STAGE_STATE_WAITING: return "waiting";
	default: return "unknown";
	}
}

static struct stage *run_find_stage(struct run *r, const char *name, bool is_finally);

/*
 * What a reference means for stage st of run r: params.X, run.id, env.X
 * (the stage's env, then the pipeline's, as written), stages.N.state (a
 * lowercase word: succeeded, failed, skipped, ...), stages.N.outputs.K.
 */
struct lookup_ctx {
	struct run *r;
	struct stage *st;
	unsigned roots; /* beyond EXPR_ROOTS_TEMPLATE: the kind's with_roots */
	char as_written[160];
	size_t expanded; /* bytes the stage's templates expanded to so far */
};

static int engine_lookup(void *data, const struct expr *ref, const char **value)
{
	struct lookup_ctx *c = data;
	struct run *r = c->r;
	const char *root = ref->part[0];

	if (strcmp(root, "params") == 0 && ref->n_part == 2) {
		for (size_t i = 0; i < r->n_params; i++)
			if (strcmp(r->param_names[i], ref->part[1]) == 0) {
				*value = r->param_values[i];
				return 0;
			}
	} else if (strcmp(root, "run") == 0 && ref->n_part == 2 &&
		   strcmp(ref->part[1], "id") == 0) {
		*value = r->id;
		return 0;
	} else if (strcmp(root, "env") == 0 && ref->n_part == 2) {
		if (c->st)
			for (size_t i = c->st->spec->n_env; i-- > 0;)
				if (strcmp(c->st->spec->env[i].name, ref->part[1]) == 0) {
					*value = c->st->spec->env[i].value;
					return 0;
				}
		for (size_t i = r->pl->n_env; i-- > 0;)
			if (strcmp(r->pl->env[i].name, ref->part[1]) == 0) {
				*value = r->pl->env[i].value;
				return 0;
			}
	} else if (strcmp(root, "stages") == 0 && ref->n_part >= 3) {
		struct stage *d = run_find_stage(r, ref->part[1], false);
		if (!d)
			d = run_find_stage(r, ref->part[1], true);
		if (d && strcmp(ref->part[2], "state") == 0 && ref->n_part == 3) {
			*value = stage_state_word(d->state);
			return 0;
		}
		if (d && strcmp(ref->part[2], "outputs") == 0 && ref->n_part == 4) {
			for (size_t i = 0; i < d->n_out; i++)
				if (strcmp(d->out_keys[i], ref->part[3]) == 0) {
					*value = d->out_values[i];
					return 0;
				}
		}
	} else if (strcmp(root, "canary") == 0 && (c->roots & EXPR_ROOT_CANARY)) {
		/* The kind fills it in (stage.h with_roots); the validator made
		 * sure it is a whole ${{ }} of its own. */
		if ((size_t)snprintf(c->as_written, sizeof c->as_written, "${{ %s }}",
				     ref->str) >= sizeof c->as_written)
			return KPL_ETOOBIG;
		*value = c->as_written;
		return 0;
	} else if (strcmp(root, "secrets") == 0 && r->secrets_withheld) {
		return KPL_ESTATE; /* expr.h: withheld from this run */
	} else if (strcmp(root, "secrets") == 0 && ref->n_part == 2 && r->eng->secrets &&
		   /* Limited after the submit: still not this pipeline's. */
		   secrets_allowed(r->eng->secrets, ref->part[1], r->pl->name)) {
		const char *v = secrets_get(r->eng->secrets, ref->part[1]);
		if (v) {
			*value = v;
			return 0;
		}
	}
	return KPL_ENOTFOUND;
}

static void stage_release_prepared(struct stage *st)
{
	for (size_t i = 0; i < st->n_tpl; i++)
		free(st->tpl_values[i]);
	free(st->tpl_nodes);
	free(st->tpl_values);
	st->tpl_nodes = NULL;
	st->tpl_values = NULL;
	st->n_tpl = 0;
	for (size_t i = 0; i < st->n_env; i++) {
		free(st->env_names[i]);
		free(st->env_values[i]);
	}
	free(st->env_names);
	free(st->env_values);
	st->env_names = st->env_values = NULL;
	st->n_env = 0;
}

/* Counts what a stage's templates expand to against the stage's cap. */
static int expanded_add(struct lookup_ctx *c, size_t len, struct kpl_err *err)
{
	c->expanded += len;
	if (c->st && c->expanded > KPL_MAX_STAGE_EXPANDED)
		return kpl_errf(err, KPL_ETOOBIG, "stage %s: its templates expand to over "
				"%d bytes in all (the cap of one stage's expanded templates)",
				c->st->spec->name, KPL_MAX_STAGE_EXPANDED);
	return 0;
}

static int expand_one(struct lookup_ctx *c, const char *text, const char *path,
		      char **out, struct kpl_err *err)
{
	struct kpl_err e = { 0 };
	int rc;

	if (!tpl_has_template(text)) {
		*out = kpl_strdup(text);
		return 0;
	}
	if (tpl_expand_str(text, EXPR_ROOTS_TEMPLATE | c->roots, engine_lookup, c, out, &e))
		return kpl_errf(err, KPL_EINVAL, "%s: %s", path, e.msg);
	if ((rc = expanded_add(c, strlen(*out), err)) != 0) {
		free(*out);
		*out = NULL;
		return rc;
	}
	return 0;
}

int stage_expand_shell(struct stage *st, const struct pl_node *scalar, char **text,
		       char ***values, size_t *n, struct kpl_err *err)
{
	struct lookup_ctx c = { st->run, st, st->kind->with_roots, "", 0 };
	struct kpl_err e = { 0 };
	struct tpl *t;
	size_t off = 0;

	*text = NULL;
	*values = NULL;
	*n = 0;
	if (!scalar->scalar || !tpl_has_template(scalar->scalar)) {
		*text = kpl_strdup(scalar->scalar ? scalar->scalar : "");
		return 0;
	}
	if (tpl_parse(scalar->scalar, EXPR_ROOTS_TEMPLATE | c.roots, &t, &off, &e))
		return kpl_errf(err, KPL_EINVAL, "stages.%s.with.shell: column %zu: %s",
				st->spec->name, off + 1, e.msg);
	if (tpl_expand_shell(t, engine_lookup, &c, text, values, n, &e)) {
		tpl_free(t);
		return kpl_errf(err, KPL_EINVAL, "stages.%s.with.shell: %s", st->spec->name,
				e.msg);
	}
	tpl_free(t);
	return 0;
}

static int expand_with(struct stage *st, struct lookup_ctx *c, const struct pl_node *n,
		       const char *path, struct kpl_err *err)
{
	char sub[300];
	char *v;
	int rc;

	if (!n)
		return 0;
	switch (n->type) {
	case PL_SCALAR:
		if (!n->scalar || !tpl_has_template(n->scalar))
			return 0;
		if ((rc = expand_one(c, n->scalar, path, &v, err)) != 0)
			return rc;
		st->tpl_nodes = kpl_realloc(st->tpl_nodes, (st->n_tpl + 1) * sizeof *st->tpl_nodes);
		st->tpl_values = kpl_realloc(st->tpl_values, (st->n_tpl + 1) * sizeof *st->tpl_values);
		st->tpl_nodes[st->n_tpl] = n;
		st->tpl_values[st->n_tpl++] = v;
		return 0;
	case PL_SEQ:
		for (size_t i = 0; i < n->n; i++) {
			snprintf(sub, sizeof sub, "%s[%zu]", path, i);
			if ((rc = expand_with(st, c, n->items[i], sub, err)) != 0)
				return rc;
		}
		return 0;
	case PL_MAP:
		for (size_t i = 0; i < n->n; i++) {
			snprintf(sub, sizeof sub, "%s.%s", path, n->keys[i]->scalar);
			if ((rc = expand_with(st, c, n->items[i], sub, err)) != 0)
				return rc;
		}
		return 0;
	}
	return 0;
}

static void env_put(struct stage *st, const char *name, char *value)
{
	for (size_t i = 0; i < st->n_env; i++)
		if (strcmp(st->env_names[i], name) == 0) {
			free(st->env_values[i]);
			st->env_values[i] = value;
			return;
		}
	st->env_names = kpl_realloc(st->env_names, (st->n_env + 1) * sizeof *st->env_names);
	st->env_values = kpl_realloc(st->env_values, (st->n_env + 1) * sizeof *st->env_values);
	st->env_names[st->n_env] = kpl_strdup(name);
	st->env_values[st->n_env++] = value;
}

/* Expands every template the attempt will read, before it starts, so a
 * value that cannot be had fails the attempt with the key's name. */
static int stage_prepare(struct stage *st, struct kpl_err *err)
{
	struct lookup_ctx c = { st->run, st };
	char path[300], *v;
	int rc;

	stage_release_prepared(st);
	for (size_t i = 0; i < st->run->pl->n_env; i++) {
		snprintf(path, sizeof path, "env.%s", st->run->pl->env[i].name);
		if ((rc = expand_one(&c, st->run->pl->env[i].value, path, &v, err)) != 0)
			return rc;
		env_put(st, st->run->pl->env[i].name, v);
	}
	for (size_t i = 0; i < st->spec->n_env; i++) {
		snprintf(path, sizeof path, "stages.%s.env.%s", st->spec->name,
			 st->spec->env[i].name);
		if ((rc = expand_one(&c, st->spec->env[i].value, path, &v, err)) != 0)
			return rc;
		env_put(st, st->spec->env[i].name, v);
	}
	snprintf(path, sizeof path, "stages.%s.with", st->spec->name);
	c.roots = st->kind->with_roots;
	if ((rc = expand_with(st, &c, st->spec->with, path, err)) != 0)
		return rc;
	/* runs_on's templates (a pod stage's image, say) are read the same way. */
	c.roots = 0;
	snprintf(path, sizeof path, "stages.%s.runs_on", st->spec->name);
	if ((rc = expand_with(st, &c, st->spec->runs_on, path, err)) != 0)
		return rc;
	return expand_with(st, &c, st->spec->runs_on_defaults, "defaults.runs_on", err);
}

/* ---------------------------------------------------------------------- */
/* Scheduling */

static void stage_timer_fired(uv_timer_t *t)
{
	struct stage *st = t->data;

	if (st->live && !st->cancel_sent) {
		kpl_info(LOG, "run %s stage %s: timed out", st->run->id, st->spec->name);
		st->timed_out = true;
		st->cancel_sent = true;
		st->kind->cancel(st);
	}
}

static void stage_arm_timer(struct stage *st)
{
	int64_t left;

	if (!st->deadline_ms)
		return;
	left = st->deadline_ms - kpl_now_ms();
	st->timer = kpl_malloc(sizeof *st->timer);
	uv_timer_init(st->run->eng->loop, st->timer);
	st->timer->data = st;
	uv_timer_start(st->timer, stage_timer_fired, left > 0 ? (uint64_t)left : 0, 0);
}

/* The stage's RUNNING state is durable: now the kind may act. */
static void stage_start_committed(void *data, int status)
{
	struct stage *st = data;
	struct run *r = st->run;
	struct kpl_err err = { 0 };

	r->refs--;
	if (r->eng->stopping || st->state != KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
	    st->live) {
		run_maybe_free(r);
		return;
	}
	if (r->cancel_requested && !st->spec->is_finally) {
		st->live = true;
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "run cancelled");
		return;
	}
	if (status) {
		/* Its RUNNING state is not durable (run_commit_failed says why):
		 * the kind must not act on it. */
		st->no_retry = true;
		stage_attempt_failed(st, r->stop_msg ? r->stop_msg : kpl_strerror(status));
		run_advance(r);
		return;
	}
	st->cancel_sent = false;
	st->timed_out = false;
	if (stage_prepare(st, &err) != 0) {
		/* The same templates would fail again: no retry. */
		st->no_retry = true;
		stage_attempt_failed(st, err.msg);
		run_advance(r);
		return;
	}
	st->live = true;
	if (st->kind->start(st, &err) != 0) {
		st->live = false;
		stage_attempt_failed(st, err.msg[0] ? err.msg : kpl_strerror(err.code));
		run_advance(r);
		return;
	}
	if (st->live)
		stage_arm_timer(st);
}

static void stage_begin(struct stage *st)
{
	stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING, NULL);
	st->run->refs++;
	store_commit(st->run->eng->store, stage_start_committed, st);
}

static struct stage *run_find_stage(struct run *r, const char *name, bool is_finally)
{
	for (size_t i = 0; i < r->n_stages; i++)
		if (r->stages[i].spec->is_finally == is_finally &&
		    strcmp(r->stages[i].spec->name, name) == 0)
			return &r->stages[i];
	return NULL;
}

static bool stage_ok_for_dependents(const struct stage *d)
{
	return d->state == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED ||
	       d->state == KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED ||
	       (d->state == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED &&
		d->spec->continue_on_error);
}

static bool stage_failed_run(const struct stage *d)
{
	return d->state == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED &&
	       !d->spec->continue_on_error;
}

/*
 * Moves the run forward: starts every stage whose needs are met, skips what
 * can no longer run, starts `finally` when the graph is done, and ends the
 * run when nothing is left. Called after every change that could matter.
 */
/* Concurrency groups are per pipeline (docs/security.md): one group name in
 * two pipelines is two groups, so one pipeline's runs never hold up or
 * cancel another's. */
static bool same_group(const struct run *a, const struct run *b)
{
	return a->group && b->group && strcmp(a->group, b->group) == 0 &&
	       strcmp(a->pl->name, b->pl->name) == 0;
}

/* A QUEUED run of a concurrency group waits for every older unfinished
 * run of its group (runs in memory are exactly the unfinished ones). */
static bool run_admitted(struct run *r)
{
	if (!r->group)
		return true;
	for (struct run *o = r->eng->runs; o; o = o->next)
		if (o != r && same_group(o, r) && !run_state_final(o->state) &&
		    strcmp(o->id, r->id) < 0)
			return false;
	return true;
}

/* A run of the group ended (r): the next one in line may start. */
static void group_kick(struct engine *e, const struct run *r)
{
	struct run *first = NULL;

	for (struct run *o = e->runs; o; o = o->next)
		if (o->state == KPL__V1__RUN_STATE__RUN_STATE_QUEUED && same_group(o, r) &&
		    (!first || strcmp(o->id, first->id) < 0))
			first = o;
	if (first)
		run_advance(first);
}

/* Evaluates a stage's `when`; 1 true, 0 false, <0 error in err. */
static int stage_when(struct stage *st, struct kpl_err *err)
{
	struct lookup_ctx c = { st->run, st };
	struct kpl_err e = { 0 };
	bool b;

	if (!st->spec->when_expr)
		return 1;
	if (expr_eval_bool(st->spec->when_expr, engine_lookup, &c, &b, &e))
		return kpl_errf(err, KPL_EINVAL, "when: %s", e.msg);
	return b;
}

/* A matrix instance (pl_stage.matrix) waits while max_parallel of its
 * siblings run: RUNNING or WAITING, as the scheduler counts them. */
static bool matrix_full(const struct run *r, const struct stage *st)
{
	size_t busy = 0;

	if (!st->spec->matrix || !st->spec->max_parallel)
		return false;
	for (size_t i = 0; i < r->n_stages; i++) {
		const struct stage *o = &r->stages[i];
		if (o->spec->matrix && !strcmp(o->spec->matrix, st->spec->matrix) &&
		    o->spec->is_finally == st->spec->is_finally &&
		    (o->state == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
		     o->state == KPL__V1__STAGE_STATE__STAGE_STATE_WAITING))
			busy++;
	}
	return busy >= st->spec->max_parallel;
}

/*
 * Moves the run forward: starts every stage whose needs are met (and whose
 * `when` holds), skips what can no longer run, starts `finally` when the
 * graph is done, and ends the run when nothing is left. Called after every
 * change that could matter.
 */
/* A cancelled run ends CANCELLED, or FAILED if kpld stopped it (run_stop). */
static void run_end_cancelled(struct run *r)
{
	if (r->stop_msg)
		run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_FAILED, r->stop_msg);
	else
		run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_CANCELLED, "cancelled");
}

static void run_advance_once(struct run *r)
{
	struct stage *failed = NULL;
	size_t running = 0, open = 0;
	bool in_finally;

	if (r->eng->stopping || run_state_final(r->state))
		return;
	if (r->state == KPL__V1__RUN_STATE__RUN_STATE_QUEUED) {
		if (!r->cancel_requested && !run_admitted(r))
			return; /* group_kick brings it back */
		run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_RUNNING, NULL);
	}

	if (r->cancel_requested && !r->finally_started) {
		/* Cancel stops the graph; `finally` still runs afterwards. */
		for (size_t i = 0; i < r->n_stages; i++) {
			struct stage *st = &r->stages[i];
			if (st->spec->is_finally)
				continue;
			if (st->state == KPL__V1__STAGE_STATE__STAGE_STATE_PENDING) {
				stage_stop_retry(st);
				st->retry_at_ms = 0;
				stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED,
						r->stop_msg ? r->stop_msg : "run cancelled");
			} else if (st->live && !st->cancel_sent) {
				st->cancel_sent = true;
				st->kind->cancel(st);
			}
			if (st->state == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
			    st->state == KPL__V1__STAGE_STATE__STAGE_STATE_WAITING)
				running++;
		}
		if (running)
			return;
		if (!r->pl->n_finally) {
			run_end_cancelled(r);
			return;
		}
		r->finally_started = true;
	}

	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		if (!st->spec->is_finally && stage_failed_run(st) && !failed)
			failed = st;
	}
	in_finally = r->finally_started;
again:
	running = open = 0;
	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		bool ready = true, doomed = false;
		const char *blocker = NULL;
		struct kpl_err err = { 0 };
		int w;

		if (st->spec->is_finally != in_finally)
			continue;
		if (st->state == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING ||
		    st->state == KPL__V1__STAGE_STATE__STAGE_STATE_WAITING) {
			running++;
			continue;
		}
		if (st->state != KPL__V1__STAGE_STATE__STAGE_STATE_PENDING)
			continue;
		if (st->retry_at_ms) {
			/* Waiting out its backoff; its timer calls back. */
			stage_arm_retry(st);
			open++;
			continue;
		}
		if (failed && !in_finally) {
			char msg[300];
			snprintf(msg, sizeof msg, "not run: stage %s failed",
				 failed->spec->name);
			stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED, msg);
			continue;
		}
		for (size_t j = 0; j < st->spec->n_needs; j++) {
			struct stage *d = run_find_stage(r, st->spec->needs[j], in_finally);
			if (!d)
				BUG("run %s: stage %s needs unknown %s", r->id,
				    st->spec->name, st->spec->needs[j]);
			if (stage_ok_for_dependents(d))
				continue;
			ready = false;
			if (stage_state_final(d->state)) {
				doomed = true;
				blocker = d->spec->name;
			}
		}
		if (doomed) {
			char msg[300];
			snprintf(msg, sizeof msg, "not run: needs %s, which did not succeed",
				 blocker);
			stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED, msg);
			continue;
		}
		if (!ready) {
			open++;
			continue;
		}
		w = stage_when(st, &err);
		if (w == 0) {
			stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED,
					"skipped: `when` is false");
			continue;
		}
		if (w < 0) {
			stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
			if (!in_finally && !failed && !st->spec->continue_on_error) {
				failed = st;
				goto again; /* the rest of the graph is skipped now */
			}
			continue;
		}
		if (matrix_full(r, st)) {
			open++; /* an instance ending frees a slot and advances */
			continue;
		}
		stage_begin(st);
		running++;
	}
	if (running || open)
		return;
	if (!in_finally && r->pl->n_finally) {
		in_finally = true;
		if (!r->finally_started) {
			r->finally_started = true;
			goto again;
		}
	}
	/* Everything is final: the run ends. */
	if (r->cancel_requested) {
		run_end_cancelled(r);
		return;
	}
	if (failed) {
		char msg[600];
		snprintf(msg, sizeof msg, "stage %s failed: %s", failed->spec->name,
			 failed->message ? failed->message : "");
		run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_FAILED, msg);
		return;
	}
	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		if (st->spec->is_finally && stage_failed_run(st)) {
			char msg[600];
			snprintf(msg, sizeof msg, "finally stage %s failed: %s",
				 st->spec->name, st->message ? st->message : "");
			run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_FAILED, msg);
			return;
		}
	}
	run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED, "all stages succeeded");
}

/*
 * A kind may end an attempt inside a call the scheduler makes (cancel of
 * an approval, say), which calls back here: such a nested call only asks
 * the running pass to go round once more.
 */
static void run_advance(struct run *r)
{
	if (r->advancing) {
		r->advance_again = true;
		return;
	}
	r->advancing = true;
	do {
		r->advance_again = false;
		run_advance_once(r);
	} while (r->advance_again);
	r->advancing = false;
}

/* ---------------------------------------------------------------------- */
/* Run lifetime */

static void run_free(struct run *r)
{
	run_stop_timeout(r);
	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		stage_stop_retry(st);
		stage_release_prepared(st);
		free(st->message);
		free(st->resume);
		for (size_t j = 0; j < st->n_out; j++) {
			free(st->out_keys[j]);
			free(st->out_values[j]);
		}
		free(st->out_keys);
		free(st->out_values);
	}
	free(r->stages);
	for (size_t i = 0; i < r->n_params; i++) {
		free(r->param_names[i]);
		free(r->param_values[i]);
	}
	free(r->param_names);
	free(r->param_values);
	free(r->idem_key);
	free(r->message);
	free(r->stop_msg);
	free(r->workspace);
	free(r->group);
	free(r->src_repo);
	free(r->src_commit);
	free(r->src_path);
	free(r->src_ref);
	free(r->src_sha256);
	for (size_t i = 0; i < r->n_tpl; i++) {
		free(r->tpl[i].path);
		free(r->tpl[i].sha256);
		free(r->tpl[i].text);
	}
	free(r->tpl);
	pipeline_free(r->pl);
	free(r);
}

static size_t run_hash(const char *id, size_t cap)
{
	uint64_t h = 14695981039346656037ULL; /* FNV-1a */

	for (; *id; id++)
		h = (h ^ (unsigned char)*id) * 1099511628211ULL;
	return (size_t)h & (cap - 1);
}

static void run_index_grow(struct engine *e)
{
	size_t cap = e->by_id_cap ? e->by_id_cap * 2 : 256;
	struct run **b = kpl_calloc(cap, sizeof *b);

	for (struct run *r = e->runs; r; r = r->next) {
		size_t i = run_hash(r->id, cap);
		r->hnext = b[i];
		b[i] = r;
	}
	free(e->by_id);
	e->by_id = b;
	e->by_id_cap = cap;
}

/* Puts a new run (its id set) in the list and the index. */
static void run_link(struct engine *e, struct run *r)
{
	size_t i;

	r->prev = NULL;
	r->next = e->runs;
	if (e->runs)
		e->runs->prev = r;
	e->runs = r;
	r->linked = true;
	if (++e->n_runs > e->by_id_cap)
		run_index_grow(e); /* rehashes r too */
	else {
		i = run_hash(r->id, e->by_id_cap);
		r->hnext = e->by_id[i];
		e->by_id[i] = r;
	}
}

static void run_unlink(struct run *r)
{
	struct engine *e = r->eng;
	struct run **pp;

	if (!r->linked)
		return;
	r->linked = false;
	if (r->prev)
		r->prev->next = r->next;
	else
		e->runs = r->next;
	if (r->next)
		r->next->prev = r->prev;
	for (pp = &e->by_id[run_hash(r->id, e->by_id_cap)]; *pp; pp = &(*pp)->hnext)
		if (*pp == r) {
			*pp = r->hnext;
			break;
		}
	e->n_runs--;
}

/* Frees a run once it is final and durable and nothing refers to it. */
static void run_maybe_free(struct run *r)
{
	if (r->refs || !r->final_durable)
		return;
	for (size_t i = 0; i < r->n_stages; i++)
		if (r->stages[i].live || r->stages[i].timer || r->stages[i].retry_timer)
			return;
	run_unlink(r);
	run_free(r);
}

static struct run *engine_find(struct engine *e, const char *id)
{
	if (!e->by_id_cap)
		return NULL;
	for (struct run *r = e->by_id[run_hash(id, e->by_id_cap)]; r; r = r->hnext)
		if (strcmp(r->id, id) == 0)
			return r;
	return NULL;
}

/* Idempotency keys are per pipeline (docs/security.md): one key under two
 * pipelines is two runs. */
static struct run *engine_find_idem(struct engine *e, const char *pipeline, const char *key)
{
	for (struct run *r = e->runs; r; r = r->next)
		if (r->idem_key && strcmp(r->idem_key, key) == 0 &&
		    strcmp(r->pl->name, pipeline) == 0)
			return r;
	return NULL;
}

/*
 * The stored run of key under pipeline: its entry per pipeline, else an
 * entry from before keys were per pipeline (store.h), taken only if its run
 * is of this pipeline. Returns 0 with *run_id malloc'd, or KPL_ENOTFOUND.
 */
static int stored_idem(struct engine *e, const char *pipeline, const char *key,
		       char **run_id)
{
	Kpl__Store__V1__RunRecord *rec = NULL;
	int rc;

	if (store_find_idem_scoped(e->store, pipeline, key, run_id) == 0)
		return 0;
	if (store_find_idem(e->store, key, run_id) != 0)
		return KPL_ENOTFOUND;
	rc = store_get_run(e->store, *run_id, &rec);
	if (rc == 0 && rec->run && strcmp(rec->run->pipeline_name, pipeline) == 0) {
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
		return 0;
	}
	if (rec)
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
	free(*run_id);
	*run_id = NULL;
	return KPL_ENOTFOUND;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char *p = kpl_strdup(path);
	int rc = 0;

	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, mode) && errno != EEXIST)
			rc = -errno;
		*s = '/';
	}
	if (!rc && mkdir(p, mode) && errno != EEXIST)
		rc = -errno;
	free(p);
	return rc;
}

static struct run *run_new(struct engine *e, struct pipeline *pl, const char *id)
{
	struct run *r = kpl_calloc(1, sizeof *r);

	r->eng = e;
	r->pl = pl;
	snprintf(r->id, sizeof r->id, "%s", id);
	r->next_seq = 1;
	r->n_stages = pl->n_stages;
	r->stages = kpl_calloc(pl->n_stages, sizeof *r->stages);
	for (size_t i = 0; i < pl->n_stages; i++) {
		struct stage *st = &r->stages[i];
		st->run = r;
		st->index = (uint32_t)i;
		st->spec = &pl->stages[i];
		st->kind = stage_kind_find(st->spec->kind);
		if (!st->kind)
			BUG("stage kind %s passed validation but is unknown", st->spec->kind);
		st->state = KPL__V1__STAGE_STATE__STAGE_STATE_PENDING;
	}
	r->workspace = kpl_asprintf("%s/%s", e->work_dir, r->id);
	run_link(e, r);
	return r;
}

struct secret_check {
	struct engine *e;
	const struct pipeline *pl;
	struct kpl_err *err;
};

static int secret_check_one(void *data, const char *name, struct pl_pos pos)
{
	struct secret_check *c = data;
	const char *only = secrets_pipelines(c->e->secrets, name);
	char list[400];
	size_t n = 0;

	/* A secret that does not exist fails the stage that needs it, as
	 * always; one that exists must allow this pipeline. */
	if (!only || secrets_allowed(c->e->secrets, name, c->pl->name))
		return 0;
	for (const char *p = only; *p && n + 4 < sizeof list;) {
		size_t l = strcspn(p, "\n");
		n += (size_t)snprintf(list + n, sizeof list - n, "%s%.*s", n ? ", " : "", (int)l, p);
		p += l + (p[l] ? 1 : 0);
	}
	return kpl_errf(c->err, KPL_EINVAL,
			"pipeline:%d:%d: secrets.%s: secret %s is limited to pipeline%s %s; "
			"pipeline %s may not use it (kplctl secret set %s --pipeline ... "
			"names the pipelines that may)",
			pos.line, pos.col, name, name, strchr(only, '\n') ? "s" : "", list,
			c->pl->name, name);
}

/* Every ${{ secrets.X }} of pl must be a secret pl may use (secrets.h). */
static int secrets_check_refs(struct engine *e, const struct pipeline *pl,
			      struct kpl_err *err)
{
	struct secret_check c = { e, pl, err };

	if (!e->secrets)
		return 0;
	return pipeline_secret_refs(pl, secret_check_one, &c);
}

int engine_submit(struct engine *e, const char *text, size_t len,
		  const char *const *param_names, const char *const *param_values,
		  size_t n_params, const char *idem_key, engine_submit_cb cb,
		  void *data, struct kpl_err *err)
{
	return engine_submit_from(e, text, len, param_names, param_values, n_params, idem_key,
				  NULL, cb, data, err);
}

/* out: 64 hex digits and a NUL. */
static void sha256_hex_to(const char *text, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";
	unsigned char md[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *)text, len, md);
	for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
		out[2 * i] = digits[md[i] >> 4];
		out[2 * i + 1] = digits[md[i] & 15];
	}
	out[2 * SHA256_DIGEST_LENGTH] = '\0';
}

static char *sha256_hex(const char *text, size_t len)
{
	char *hex = kpl_malloc(2 * SHA256_DIGEST_LENGTH + 1);

	sha256_hex_to(text, len, hex);
	return hex;
}

/* The cached parse of the pipeline whose text hashes to sha, with a new
 * reference for the caller; NULL if none. */
static struct pipeline *pl_cache_get(struct engine *e, const char *sha)
{
	for (size_t i = 0; i < ENGINE_PL_CACHE; i++) {
		struct pl_cached *c = &e->pl_cache[i];
		if (c->pl && strcmp(c->sha256, sha) == 0) {
			c->used = ++e->pl_cache_tick;
			return pipeline_ref(c->pl);
		}
	}
	return NULL;
}

/* Keeps pl (a reference of its own) in place of the least recently used. */
static void pl_cache_put(struct engine *e, const char *sha, struct pipeline *pl)
{
	struct pl_cached *victim = &e->pl_cache[0];

	for (size_t i = 0; i < ENGINE_PL_CACHE && victim->pl; i++)
		if (!e->pl_cache[i].pl || e->pl_cache[i].used < victim->used)
			victim = &e->pl_cache[i];
	pipeline_free(victim->pl);
	snprintf(victim->sha256, sizeof victim->sha256, "%s", sha);
	victim->pl = pipeline_ref(pl);
	victim->used = ++e->pl_cache_tick;
}

static void pl_cache_clear(struct engine *e)
{
	for (size_t i = 0; i < ENGINE_PL_CACHE; i++) {
		pipeline_free(e->pl_cache[i].pl);
		e->pl_cache[i].pl = NULL;
	}
}

static char *dup_or_null(const char *s)
{
	return s && *s ? kpl_strdup(s) : NULL;
}

/* Copies into r the files of files its pipeline's stages use (uses:),
 * each once, in stage order. */
static void run_keep_templates(struct run *r, const struct pl_files *files)
{
	for (size_t i = 0; files && i < r->pl->n_stages; i++) {
		const char *u = r->pl->stages[i].uses;
		bool have = false;
		if (!u)
			continue;
		for (size_t k = 0; k < r->n_tpl; k++)
			have |= !strcmp(r->tpl[k].path, u);
		for (size_t k = 0; k < files->n && !have; k++) {
			if (strcmp(files->v[k].path, u))
				continue;
			r->tpl = kpl_realloc(r->tpl, (r->n_tpl + 1) * sizeof *r->tpl);
			struct run_file *f = &r->tpl[r->n_tpl++];
			f->path = kpl_strdup(u);
			f->text = kpl_strndup(files->v[k].text, files->v[k].len);
			f->len = files->v[k].len;
			f->sha256 = sha256_hex(files->v[k].text, files->v[k].len);
			have = true;
		}
	}
}

int engine_submit_from(struct engine *e, const char *text, size_t len,
		       const char *const *param_names, const char *const *param_values,
		       size_t n_params, const char *idem_key,
		       const struct engine_source *src, engine_submit_cb cb, void *data,
		       struct kpl_err *err)
{
	const struct pl_kind *kinds;
	size_t n_kinds;
	struct pipeline *pl = NULL;
	struct run *r;
	char id[KPL_RUN_ID_LEN + 1];
	char *found = NULL, sha[2 * SHA256_DIGEST_LENGTH + 1];
	bool has_files;
	int rc;

	if (e->stopping)
		return kpl_errf(err, KPL_EUNAVAILABLE, "kpld is shutting down");
	if (idem_key && *idem_key && strlen(idem_key) > KPL_MAX_NAME_LEN)
		return kpl_errf(err, KPL_EINVAL, "idempotency_key: longer than %d bytes",
				KPL_MAX_NAME_LEN);
	if (len > KPL_MAX_PIPELINE_BYTES)
		return kpl_errf(err, KPL_ETOOBIG, "pipeline: %zu bytes, over the limit of %d",
				len, KPL_MAX_PIPELINE_BYTES);
	kinds = stage_kinds_for_parser(&n_kinds);
	if (src && (rc = reuse_check_files(src->files, err)) != 0)
		return rc;
	sha256_hex_to(text, len, sha);
	has_files = src && src->files && src->files->n;
	if (has_files || !(pl = pl_cache_get(e, sha))) {
		rc = pipeline_parse_files(text, len, "pipeline", src ? src->files : NULL, kinds,
					  n_kinds, &pl, err);
		if (rc)
			return rc;
		if (!has_files)
			pl_cache_put(e, sha, pl);
	}
	/* The key is the pipeline's: parsed first, to know whose. */
	if (idem_key && *idem_key) {
		r = engine_find_idem(e, pl->name, idem_key);
		if (r && r->stored) {
			pipeline_free(pl);
			cb(data, 0, r->id);
			return 0;
		}
		if (r) {
			/* The first submit of this key is still committing: this
			 * one is answered with the same run when that lands. */
			struct waiter *w = kpl_calloc(1, sizeof *w);
			w->cb = cb;
			w->data = data;
			w->next = r->submit_waiters;
			r->submit_waiters = w;
			pipeline_free(pl);
			return 0;
		}
		if (stored_idem(e, pl->name, idem_key, &found) == 0) {
			pipeline_free(pl);
			cb(data, 0, found);
			free(found);
			return 0;
		}
	}
	if (!store_has_room(e->store, 2 * len + ENGINE_SUBMIT_ROOM)) {
		char why[400];
		store_full_msg(e->store, why, sizeof why);
		pipeline_free(pl);
		return kpl_errf(err, KPL_EFULL, "%s", why);
	}
	/* The parser has no config: notifier names are checked here, and
	 * which secrets this pipeline may use. */
	if ((rc = notify_check(e->cfg, pl, err)) != 0 ||
	    (rc = secrets_check_refs(e, pl, err)) != 0) {
		pipeline_free(pl);
		return rc;
	}
	engine_new_run_id(id);
	r = run_new(e, pl, id);
	rc = pipeline_resolve_params(pl, param_names, param_values, n_params,
				     &r->param_names, &r->param_values, &r->n_params, err);
	if (rc) {
		run_unlink(r);
		run_free(r);
		return rc;
	}
	if (idem_key && *idem_key)
		r->idem_key = kpl_strdup(idem_key);
	r->attempt = 1;
	if (pl->concurrency.group) {
		struct lookup_ctx c = { r, NULL };
		rc = expand_one(&c, pl->concurrency.group, "concurrency.group", &r->group, err);
		if (rc) {
			run_unlink(r);
			run_free(r);
			return rc;
		}
	}
	r->created_ms = kpl_now_ms();
	r->src_sha256 = kpl_strdup(sha);
	if (src) {
		r->src_repo = dup_or_null(src->repo);
		r->src_commit = dup_or_null(src->commit);
		r->src_path = dup_or_null(src->path);
		r->src_ref = dup_or_null(src->ref);
		r->secrets_withheld = src->secrets_withheld;
		run_keep_templates(r, src->files);
	}
	r->submit_cb = cb;
	r->submit_data = data;

	if (src && src->stage_with)
		src->stage_with(src->stage_with_data, r->id);
	store_stage_pipeline(e->store, r->id, text, len);
	if (r->idem_key)
		store_stage_idem_scoped(e->store, pl->name, r->idem_key, r->id);
	store_stage_active(e->store, r->id, 1);
	for (size_t i = 0; i < r->n_stages; i++)
		stage_stage_record(&r->stages[i]);
	run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_QUEUED, NULL);
	kpl_info(LOG, "run %s (%s) submitted with %zu stages%s%s", r->id, pl->name,
		 r->n_stages, r->group ? " in concurrency group " : "", r->group ? r->group : "");
	if (r->group && pl->concurrency.cancel_in_progress) {
		for (struct run *o = e->runs; o; o = o->next) {
			if (o == r || !same_group(o, r) ||
			    run_state_final(o->state) || o->cancel_requested)
				continue;
			kpl_info(LOG, "run %s: cancelled by newer run %s of group %s", o->id,
				 r->id, r->group);
			o->cancel_requested = true;
			run_stage_record(o);
			run_commit(o);
			run_advance(o);
		}
	}
	/* The workspace is made by the first stage kind that needs it (a
	 * mkdir per submit on the loop thread was a quarter of its time). */
	run_advance(r);
	return 0;
}

int engine_cancel(struct engine *e, const char *run_id, engine_submit_cb cb,
		  void *data, struct kpl_err *err)
{
	struct run *r = engine_find(e, run_id);
	struct waiter *w;

	if (!r || r->final_durable) {
		Kpl__Store__V1__RunRecord *rec = NULL;
		int rc = store_get_run(e->store, run_id, &rec);
		if (rc == KPL_ENOTFOUND)
			return kpl_errf(err, KPL_ENOTFOUND, "run %s not found", run_id);
		if (rc)
			return kpl_errf(err, rc, "run %s: %s", run_id, kpl_strerror(rc));
		rc = kpl_errf(err, KPL_ESTATE, "run %s already ended %s", run_id,
			      run_state_name(rec->run ? rec->run->state : 0));
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
		return rc;
	}
	w = kpl_calloc(1, sizeof *w);
	w->cb = cb;
	w->data = data;
	w->next = r->waiters;
	r->waiters = w;
	if (run_state_final(r->state))
		return 0; /* ends when its final commit lands */
	if (!r->cancel_requested) {
		kpl_info(LOG, "run %s: cancel requested", r->id);
		r->cancel_requested = true;
		run_stage_record(r);
		run_commit(r);
		run_advance(r);
	}
	return 0;
}

void engine_subscribe(struct engine *e, struct engine_sub *sub)
{
	struct engine_sub **head = sub_bucket(e, sub->run_id);

	sub->prev = NULL;
	sub->next = *head;
	if (*head)
		(*head)->prev = sub;
	*head = sub;
}

void engine_unsubscribe(struct engine *e, struct engine_sub *sub)
{
	struct engine_sub **head = sub_bucket(e, sub->run_id);

	if (sub->prev)
		sub->prev->next = sub->next;
	else if (*head == sub)
		*head = sub->next;
	if (sub->next)
		sub->next->prev = sub->prev;
	sub->prev = sub->next = NULL;
}

bool engine_run_active(struct engine *e, const char *run_id)
{
	struct run *r = engine_find(e, run_id);
	return r && !r->final_durable;
}

size_t engine_active_runs(struct engine *e)
{
	return e->n_runs;
}

uv_loop_t *engine_loop(struct engine *e)
{
	return e->loop;
}

struct store *engine_store(struct engine *e)
{
	return e->store;
}

struct secrets *engine_secrets(struct engine *e)
{
	return e->secrets;
}

const struct cfg *engine_config(const struct engine *e)
{
	return e->cfg;
}

struct http_client *stage_http(struct stage *st)
{
	return st->run->eng->http;
}

void stage_record_release(struct stage *st, Kpl__Store__V1__ReleaseRecord *rec)
{
	struct engine *e = st->run->eng;
	Kpl__Store__V1__ReleaseRecord **old = NULL;
	size_t n = 0;

	/* seq: one past the newest stored (a target's deploys are one at a
	 * time: the same stage cannot record twice before its commit). */
	rec->seq = 1;
	if (store_list_releases(e->store, rec->target, &old, &n) == 0 && n)
		rec->seq = old[0]->seq + 1;
	store_free_releases(old, n);
	rec->run_id = st->run->id;
	rec->stage = st->spec->name;
	rec->time_ms = kpl_now_ms();
	store_stage_release(e->store, rec);
	run_commit(st->run);
}

int stage_releases(struct stage *st, const char *target,
		   Kpl__Store__V1__ReleaseRecord ***out, size_t *n)
{
	return store_list_releases(st->run->eng->store, target, out, n);
}

char *stage_redact(struct stage *st, const char *text)
{
	size_t n;
	char *r = secrets_redact(st->run->eng->secrets, text, strlen(text), &n);
	return r ? r : kpl_strdup(text);
}

/* Only secrets: what a credential in the config may refer to. */
static int secret_lookup(void *data, const struct expr *ref, const char **value)
{
	struct engine *e = data;

	if (strcmp(ref->part[0], "secrets") == 0 && ref->n_part == 2 && e->secrets &&
	    (*value = secrets_get(e->secrets, ref->part[1])) != NULL)
		return 0;
	return KPL_ENOTFOUND;
}

static int resolve_cred(struct engine *e, const char *what, const char *text, char **out,
			struct kpl_err *err)
{
	struct kpl_err e2 = { 0 };

	*out = NULL;
	if (!text)
		return 0;
	if (!tpl_has_template(text)) {
		*out = kpl_strdup(text);
		return 0;
	}
	if (tpl_expand_str(text, EXPR_ROOT_SECRETS, secret_lookup, e, out, &e2))
		return kpl_errf(err, KPL_EINVAL, "%s: %s (set it with: kplctl secret set NAME)",
				what, e2.msg);
	return 0;
}

int stage_endpoint(struct stage *st, enum cfg_kind kind, const char *with_key,
		   struct stage_endpoint *out, struct kpl_err *err)
{
	char *name = stage_expand(st, stage_with_get(st, with_key));
	char key[200];
	int rc;

	snprintf(key, sizeof key, "with.%s", with_key);
	rc = stage_endpoint_named(st, kind, name, key, out, err);
	free(name);
	return rc;
}

int stage_endpoint_named(struct stage *st, enum cfg_kind kind, const char *name,
			 const char *key, struct stage_endpoint *out, struct kpl_err *err)
{
	struct engine *e = st->run->eng;
	const struct cfg_endpoint *ep;
	char names[300], what[400];
	int rc = 0;

	memset(out, 0, sizeof *out);
	if (!name || !*name) {
		rc = kpl_errf(err, KPL_EINVAL, "stages.%s.%s: required (the name of a %s "
			      "endpoint in the daemon config; declared: %s)", st->spec->name,
			      key, cfg_kind_key(kind),
			      cfg_names(e->cfg, kind, names, sizeof names));
		goto out;
	}
	ep = cfg_find(e->cfg, kind, name);
	if (!ep) {
		rc = kpl_errf(err, KPL_EINVAL, "stages.%s.%s: no %s endpoint named \"%s\" in "
			      "the daemon config %s (declared: %s)", st->spec->name, key,
			      cfg_kind_key(kind), name, e->cfg ? e->cfg->path : "(none)",
			      cfg_names(e->cfg, kind, names, sizeof names));
		goto out;
	}
	if (st->run->secrets_withheld) {
		/* The config's endpoints carry kpld's credentials (tokens,
		 * kubeconfigs, keys): withheld like secrets. */
		rc = kpl_errf(err, KPL_EINVAL, "stages.%s.%s: withheld from this run: a pull "
			      "request from a fork may not use the daemon config's endpoints "
			      "(unless its pipeline's registration says fork_secrets: true)",
			      st->spec->name, key);
		goto out;
	}
	out->ep = ep;
	snprintf(what, sizeof what, "config %s.%s", cfg_kind_key(kind), name);
	if ((rc = resolve_cred(e, what, ep->url, &out->url, err)) ||
	    (rc = resolve_cred(e, what, ep->username, &out->username, err)) ||
	    (rc = resolve_cred(e, what, ep->password, &out->password, err)) ||
	    (rc = resolve_cred(e, what, ep->token, &out->token, err)))
		stage_endpoint_release(out);
out:
	return rc;
}

void stage_endpoint_release(struct stage_endpoint *ep)
{
	free(ep->url);
	free(ep->username);
	if (ep->password)
		memset(ep->password, 0, strlen(ep->password));
	free(ep->password);
	if (ep->token)
		memset(ep->token, 0, strlen(ep->token));
	free(ep->token);
	memset(ep, 0, sizeof *ep);
}

/* ---------------------------------------------------------------------- */
/* Recovery */

struct active_list {
	char **ids;
	size_t n;
};

static int collect_active(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct active_list *l = data;

	if (!rec->run || !rec->run->id)
		return 0;
	l->ids = kpl_realloc(l->ids, (l->n + 1) * sizeof *l->ids);
	l->ids[l->n++] = kpl_strdup(rec->run->id);
	return 0;
}

static int64_t ts_ms(const Google__Protobuf__Timestamp *t)
{
	return t ? t->seconds * 1000 + t->nanos / 1000000 : 0;
}

/*
 * Rebuilds a run in memory from the store (records, stages, pipeline text).
 * On success *out is linked into the engine, marked stored.
 */
static int run_load(struct engine *e, const char *id, struct run **out, struct kpl_err *err)
{
	Kpl__Store__V1__RunRecord *rec = NULL;
	Kpl__Store__V1__StageRecord **srecs = NULL;
	size_t n_srecs = 0, text_len = 0;
	char *text = NULL;
	struct pipeline *pl = NULL;
	struct kpl_err perr = { 0 };
	const struct pl_kind *kinds;
	size_t n_kinds;
	struct run *r;
	int rc;

	*out = NULL;
	if ((rc = store_get_run(e->store, id, &rec)) != 0) {
		kpl_errf(err, rc, rc == KPL_ENOTFOUND ? "run %s not found"
			 : "run %s: cannot read it: %s", id, kpl_strerror(rc));
		goto out;
	}
	if (!rec->run || store_get_pipeline(e->store, id, &text, &text_len) ||
	    store_get_stages(e->store, id, &srecs, &n_srecs)) {
		rc = kpl_errf(err, KPL_ECORRUPT, "run %s: its records cannot be read back", id);
		goto out;
	}
	kinds = stage_kinds_for_parser(&n_kinds);
	struct pl_file *tf = kpl_calloc(rec->n_templates + 1, sizeof *tf);
	for (size_t i = 0; i < rec->n_templates; i++) {
		tf[i].path = rec->templates[i]->path;
		tf[i].text = rec->templates[i]->text;
		tf[i].len = strlen(rec->templates[i]->text);
	}
	struct pl_files files = { tf, rec->n_templates };
	rc = pipeline_parse_files(text, text_len, "pipeline", &files, kinds, n_kinds, &pl, &perr);
	free(tf);
	if (rc) {
		/* recover_run ends such a run FAILED (run_fail_unloadable). */
		rc = kpl_errf(err, KPL_ECORRUPT, "run %s: its pipeline no longer parses: %s",
			      id, perr.msg);
		goto out;
	}
	if (pl->n_stages != n_srecs) {
		rc = kpl_errf(err, KPL_ECORRUPT, "run %s: %zu stage records for %zu stages",
			      id, n_srecs, pl->n_stages);
		pipeline_free(pl);
		goto out;
	}
	r = run_new(e, pl, id);
	r->stored = true;
	r->state = rec->run->state;
	r->attempt = rec->run->attempt ? rec->run->attempt : 1;
	r->created_ms = ts_ms(rec->run->created_at);
	r->started_ms = ts_ms(rec->run->started_at);
	r->finished_ms = ts_ms(rec->run->finished_at);
	if (rec->run->message && *rec->run->message)
		r->message = kpl_strdup(rec->run->message);
	if (rec->run->idempotency_key && *rec->run->idempotency_key)
		r->idem_key = kpl_strdup(rec->run->idempotency_key);
	if (rec->run->concurrency_group && *rec->run->concurrency_group)
		r->group = kpl_strdup(rec->run->concurrency_group);
	if (rec->run->source) {
		const Kpl__V1__PipelineSource *so = rec->run->source;
		r->src_repo = kpl_strdup(so->repo ? so->repo : "");
		r->src_commit = kpl_strdup(so->commit ? so->commit : "");
		r->src_path = kpl_strdup(so->path ? so->path : "");
		r->src_ref = kpl_strdup(so->ref ? so->ref : "");
		r->src_sha256 = kpl_strdup(so->sha256 ? so->sha256 : "");
		r->secrets_withheld = so->secrets_withheld;
	}
	/* Kept, so the record's next write still holds them. */
	r->tpl = kpl_calloc(rec->n_templates + 1, sizeof *r->tpl);
	for (size_t i = 0; i < rec->n_templates; i++) {
		r->tpl[i].path = kpl_strdup(rec->templates[i]->path);
		r->tpl[i].sha256 = kpl_strdup(rec->templates[i]->sha256);
		r->tpl[i].text = kpl_strdup(rec->templates[i]->text);
		r->tpl[i].len = strlen(rec->templates[i]->text);
	}
	r->n_tpl = rec->n_templates;
	r->cancel_requested = rec->cancel_requested;
	r->store_bytes = rec->store_bytes;
	if (rec->stop_message && *rec->stop_message)
		r->stop_msg = kpl_strdup(rec->stop_message);
	r->n_params = rec->run->n_params;
	r->param_names = kpl_calloc(r->n_params, sizeof(char *));
	r->param_values = kpl_calloc(r->n_params, sizeof(char *));
	for (size_t i = 0; i < r->n_params; i++) {
		r->param_names[i] = kpl_strdup(rec->run->params[i]->key);
		r->param_values[i] = kpl_strdup(rec->run->params[i]->value);
	}
	/* Log events do not rewrite the run record: ask the event log. */
	r->next_seq = store_last_event_seq(e->store, id) + 1;
	for (size_t i = 0; i < n_srecs; i++) {
		struct stage *st = &r->stages[srecs[i]->index < r->n_stages ? srecs[i]->index : i];
		Kpl__V1__StageStatus *ss = srecs[i]->status;
		if (!ss)
			continue;
		st->state = ss->state;
		st->attempt = ss->attempt;
		st->started_ms = ts_ms(ss->started_at);
		st->finished_ms = ts_ms(ss->finished_at);
		if (ss->message && *ss->message)
			st->message = kpl_strdup(ss->message);
		for (size_t j = 0; j < ss->n_outputs; j++)
			stage_set_output(st, ss->outputs[j]->key, ss->outputs[j]->value);
		st->pid = srecs[i]->pid;
		st->pid_start = srecs[i]->pid_start_time;
		st->deadline_ms = srecs[i]->deadline_ms;
		st->retry_at_ms = srecs[i]->retry_at_ms;
		st->log_bytes = srecs[i]->log_bytes;
		st->log_cut = srecs[i]->log_cut;
		st->tries = srecs[i]->tries;
		if (srecs[i]->resume && *srecs[i]->resume)
			st->resume = kpl_strdup(srecs[i]->resume);
		if (st->spec->is_finally && st->state != KPL__V1__STAGE_STATE__STAGE_STATE_PENDING)
			r->finally_started = true;
	}
	*out = r;
	rc = 0;
out:
	if (rec)
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
	store_free_stages(srecs, n_srecs);
	free(text);
	return rc;
}

static void unloadable_committed(void *data, int status)
{
	(void)data;
	if (status)
		kpl_error(LOG, "could not record an unrecoverable run: %s", kpl_strerror(status));
}

/*
 * An unfinished run that cannot be rebuilt (its pipeline no longer parses
 * after an upgrade, a record is damaged) must not stay RUNNING forever: it
 * ends FAILED, straight in the store, with the reason, and its unfinished
 * stages with it; a command it had started is stopped (SIGTERM to its shim).
 */
static void run_fail_unloadable(struct engine *e, const char *id, const struct kpl_err *why)
{
	Kpl__Store__V1__RunRecord *rec = NULL;
	Kpl__Store__V1__StageRecord **srecs = NULL;
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;
	Google__Protobuf__Timestamp t;
	Google__Protobuf__Timestamp *orig_fin;
	char msg[700], *orig_msg;
	size_t n = 0;
	int64_t now = kpl_now_ms();

	kpl_error(LOG, "cannot recover: %s; the run ends FAILED", why->msg);
	store_stage_active(e->store, id, 0);
	if (store_get_run(e->store, id, &rec) || !rec->run) {
		if (rec)
			kpl__store__v1__run_record__free_unpacked(rec, NULL);
		store_commit(e->store, unloadable_committed, NULL);
		return;
	}
	snprintf(msg, sizeof msg, "cannot be resumed after a restart: %s (a command it had "
		 "started was stopped)", why->msg);
	if (store_get_stages(e->store, id, &srecs, &n) == 0) {
		for (size_t i = 0; i < n; i++) {
			Kpl__V1__StageStatus *ss = srecs[i]->status;
			if (!ss || stage_state_final(ss->state))
				continue;
			ss->state = ss->state == KPL__V1__STAGE_STATE__STAGE_STATE_PENDING
					    ? KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED
					    : KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
			char *orig = ss->message;
			/* Stop the attempt's shim (it passes SIGTERM to the command's
			 * group), if it is the same process that was recorded. */
			if (srecs[i]->pid > 0 && srecs[i]->pid_start_time &&
			    kpl_pid_start_time(srecs[i]->pid) == srecs[i]->pid_start_time)
				kill((pid_t)srecs[i]->pid, SIGTERM);
			ss->message = msg;
			store_stage_stage(e->store, id, srecs[i]);
			ss->message = orig; /* msg is ours, not the record's */
		}
	}
	orig_msg = rec->run->message;
	orig_fin = rec->run->finished_at;
	rec->run->state = KPL__V1__RUN_STATE__RUN_STATE_FAILED;
	rec->run->message = msg;
	rec->run->finished_at = ts_set(&t, now);
	ev.run_id = (char *)id;
	ev.seq = store_last_event_seq(e->store, id) + 1;
	ev.global_seq = e->next_gseq++;
	ev.pipeline_name = rec->run->pipeline_name;
	ev.time = &t;
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE;
	ev.run_state = KPL__V1__RUN_STATE__RUN_STATE_FAILED;
	ev.stage = "";
	ev.message = msg;
	store_stage_event(e->store, &ev);
	rec->next_seq = ev.seq + 1;
	store_stage_run(e->store, rec);
	rec->run->message = orig_msg;  /* give back what the record owns */
	rec->run->finished_at = orig_fin;
	kpl__store__v1__run_record__free_unpacked(rec, NULL);
	store_free_stages(srecs, n);
	store_commit(e->store, unloadable_committed, NULL);
}

/* Carries on one unfinished run after a restart. */
static void recover_run(struct engine *e, const char *id)
{
	struct kpl_err err = { 0 };
	struct run *r;

	if (run_load(e, id, &r, &err)) {
		run_fail_unloadable(e, id, &err);
		return;
	}
	r->workspace_used = true; /* a previous kpld's stages may have made it */
	kpl_debug(LOG, "run %s (%s): recovered in state %s", r->id, r->pl->name,
		  run_state_name(r->state));
	if (run_state_final(r->state)) {
		/* The final state was durable, the active mark was not cleared. */
		store_stage_active(e->store, r->id, 0);
		run_commit(r);
		r->final_commit_no = r->commits_issued;
		return;
	}
	run_arm_timeout(r);
	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		struct kpl_err perr = { 0 };
		if (st->state != KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING &&
		    st->state != KPL__V1__STAGE_STATE__STAGE_STATE_WAITING)
			continue;
		kpl_err_clear(&err);
		/* The kind may read expanded templates and env while re-attaching. */
		stage_prepare(st, &perr);
		st->live = true;
		if (st->kind->resume && st->kind->resume(st, &err) == 0) {
			kpl_debug(LOG, "run %s stage %s: re-attached", r->id, st->spec->name);
			if (st->live)
				stage_arm_timer(st);
			continue;
		}
		st->live = false;
		if (err.code == KPL_ENOTFOUND) {
			/* Nothing of the attempt ran that starting it again
			 * would repeat outside kpld (proc_steps_resume), and it
			 * does not count as a retry. */
			char msg[700];
			st->tries--;
			snprintf(msg, sizeof msg, "restarting: kpld stopped before the attempt "
				 "began%s%s%s", err.msg[0] ? " (" : "", err.msg,
				 err.msg[0] ? ")" : "");
			stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_PENDING, msg);
			continue;
		}
		{
			char msg[700];
			snprintf(msg, sizeof msg, "interrupted by restart%s%s",
				 err.msg[0] ? ": " : "", err.msg);
			stage_attempt_failed(st, msg);
		}
	}
	run_advance(r);
}

struct approve_wait {
	engine_submit_cb cb;
	void *data;
	struct run *r;
};

static void approve_committed(void *data, int status)
{
	struct approve_wait *w = data;
	struct run *r = w->r;

	w->cb(w->data, status, r->id);
	free(w);
	r->refs--;
	run_maybe_free(r);
}

int engine_approve(struct engine *e, const char *run_id, const char *stage,
		   bool approve, const char *comment, const char *by,
		   engine_submit_cb cb, void *data, struct kpl_err *err)
{
	struct run *r = engine_find(e, run_id);
	struct stage *st;
	struct approve_wait *w;
	char msg[700];

	if (!r || r->final_durable) {
		Kpl__Store__V1__RunRecord *rec = NULL;
		int rc = store_get_run(e->store, run_id, &rec);
		if (rc == KPL_ENOTFOUND)
			return kpl_errf(err, KPL_ENOTFOUND, "run %s not found", run_id);
		if (rec)
			kpl__store__v1__run_record__free_unpacked(rec, NULL);
		return kpl_errf(err, KPL_ESTATE, "run %s has ended; nothing waits for approval",
				run_id);
	}
	st = run_find_stage(r, stage, false);
	if (!st)
		st = run_find_stage(r, stage, true);
	if (!st)
		return kpl_errf(err, KPL_ENOTFOUND, "run %s has no stage %s", run_id, stage);
	if (st->state != KPL__V1__STAGE_STATE__STAGE_STATE_WAITING || !st->live ||
	    (strcmp(st->kind->name, "approval") != 0 && !st->kind->approve))
		return kpl_errf(err, KPL_ESTATE, "stage %s is %s, not waiting for approval",
				stage, stage_state_name(st->state));
	snprintf(msg, sizeof msg, "%s by %s%s%s", approve ? "approved" : "rejected",
		 by && *by ? by : "an unnamed user", comment && *comment ? ": " : "",
		 comment && *comment ? comment : "");
	kpl_info(LOG, "run %s stage %s: %s", r->id, st->spec->name, msg);
	if (!approve)
		st->no_retry = true;
	if (st->kind->approve) {
		/* A kind waiting for an answer (a frozen canary) goes on with it
		 * and ends the attempt itself (stage.h). */
		stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING, msg);
		st->kind->approve(st, approve, msg);
	} else {
		stage_done(st, approve ? KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED
				       : KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
	}
	w = kpl_malloc(sizeof *w);
	w->cb = cb;
	w->data = data;
	w->r = r;
	r->refs++;
	store_commit(e->store, approve_committed, w);
	return 0;
}

int engine_retry(struct engine *e, const char *run_id, engine_submit_cb cb,
		 void *data, struct kpl_err *err)
{
	struct run *r = engine_find(e, run_id);
	char msg[100];
	int rc;

	if (e->stopping)
		return kpl_errf(err, KPL_EUNAVAILABLE, "kpld is shutting down");
	if (r && !r->final_durable)
		return kpl_errf(err, KPL_ESTATE, "run %s is %s; only a FAILED or CANCELLED run "
				"can be retried", run_id, run_state_name(r->state));
	if (!store_has_room(e->store, ENGINE_SUBMIT_ROOM)) {
		char why[400];
		store_full_msg(e->store, why, sizeof why);
		return kpl_errf(err, KPL_EFULL, "%s", why);
	}
	if (r) {
		/* Final and durable but not yet freed: start from the store. */
		run_unlink(r);
		if (r->refs == 0)
			run_free(r);
		/* else its last commit callback frees it (run_maybe_free). */
	}
	if ((rc = run_load(e, run_id, &r, err)) != 0)
		return rc;
	if (r->state != KPL__V1__RUN_STATE__RUN_STATE_FAILED &&
	    r->state != KPL__V1__RUN_STATE__RUN_STATE_CANCELLED) {
		rc = kpl_errf(err, KPL_ESTATE, "run %s %s; only a FAILED or CANCELLED run can "
			      "be retried", run_id, run_state_name(r->state));
		run_unlink(r);
		run_free(r);
		return rc;
	}
	r->attempt++;
	r->cancel_requested = false;
	free(r->stop_msg);
	r->stop_msg = NULL;
	r->commit_failed = false;
	r->finally_started = false;
	r->finished_ms = 0;
	r->submit_cb = cb;
	r->submit_data = data;
	r->stored = false; /* answers cb at the next commit */
	snprintf(msg, sizeof msg, "retry: attempt %u", r->attempt);
	store_stage_active(e->store, r->id, 1);
	run_set_state(r, KPL__V1__RUN_STATE__RUN_STATE_QUEUED, msg);
	for (size_t i = 0; i < r->n_stages; i++) {
		struct stage *st = &r->stages[i];
		if (st->state == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED &&
		    !st->spec->is_finally)
			continue;
		if (st->state == KPL__V1__STAGE_STATE__STAGE_STATE_PENDING)
			continue;
		for (size_t j = 0; j < st->n_out; j++) {
			free(st->out_keys[j]);
			free(st->out_values[j]);
		}
		st->n_out = 0;
		st->tries = 0;
		st->retry_at_ms = 0;
		stage_set_state(st, KPL__V1__STAGE_STATE__STAGE_STATE_PENDING, msg);
	}
	kpl_info(LOG, "run %s (%s): %s", r->id, r->pl->name, msg);
	run_advance(r);
	return 0;
}

int engine_start(const struct engine_options *opt, struct engine **out,
		 struct kpl_err *err)
{
	struct engine *e = kpl_calloc(1, sizeof *e);
	struct active_list active = { 0 };
	int rc;

	e->loop = opt->loop;
	e->store = opt->store;
	e->cfg = opt->cfg;
	e->secrets = opt->secrets;
	e->log_cap = opt->log_cap_bytes ? opt->log_cap_bytes : ENGINE_DEFAULT_LOG_CAP;
	e->run_budget = opt->run_budget_bytes ? opt->run_budget_bytes : ENGINE_DEFAULT_RUN_BUDGET;
	e->next_gseq = store_last_global_seq(opt->store) + 1;
	e->work_dir = kpl_asprintf("%s/work", opt->data_dir);
	/* Files there are read with kpl_open_ws: a stage's command writes them. */
	kpl_set_workspaces_dir(e->work_dir);
	if ((rc = mkdir_p(e->work_dir, 0700)) != 0) {
		kpl_errf(err, KPL_EIO, "cannot create %s: %s", e->work_dir, strerror(-rc));
		free(e->work_dir);
		free(e);
		return KPL_EIO;
	}
	srandom((unsigned)kpl_now_ms() ^ (unsigned)getpid());
	if ((rc = http_client_new(e->loop, NULL, &e->http, err)) != 0) {
		free(e->work_dir);
		free(e);
		return rc;
	}
	{
		/* Before recovery, which may make events to notify of. */
		struct notify_options no = { e->loop, e->store, e->http, e->cfg, e->secrets };
		if ((rc = notify_new(&no, &e->notify, err)) != 0) {
			free(e->work_dir);
			free(e);
			return rc;
		}
	}
	rc = store_list_active(e->store, collect_active, &active);
	if (rc) {
		kpl_errf(err, rc, "cannot list unfinished runs: %s", kpl_strerror(rc));
		free(e->work_dir);
		free(e);
		return rc;
	}
	if (active.n) {
		int64_t t0 = kpl_now_ms();

		/* One line per run only at debug level: 10,000 runs in
		 * flight wrote 30,000 lines before kpld could serve. */
		kpl_info(LOG, "recovering %zu unfinished run%s", active.n,
			 active.n == 1 ? "" : "s");
		for (size_t i = 0; i < active.n; i++) {
			recover_run(e, active.ids[i]);
			free(active.ids[i]);
		}
		kpl_info(LOG, "recovered %zu unfinished run%s in %lld ms (%zu now in memory)",
			 active.n, active.n == 1 ? "" : "s", (long long)(kpl_now_ms() - t0),
			 e->n_runs);
	}
	free(active.ids);
	*out = e;
	return 0;
}

static void engine_freed(void *data)
{
	struct engine *e = data;

	if (e->stop_done)
		e->stop_done(e->stop_data);
	free(e->work_dir);
	free(e);
}

static void notify_closed(void *data)
{
	struct engine *e = data;

	e->notify = NULL;
	/* The HTTP client closes its handles asynchronously: finish there. */
	http_client_close(e->http, engine_freed, e);
}

static void stop_committed(void *data, int status)
{
	struct engine *e = data;
	struct run *r, *next;

	/* Every commit ahead of this one has landed: nothing refers to the
	 * runs any more except their (closing) timers and attempts. */
	for (r = e->runs; r; r = next) {
		next = r->next;
		run_free(r);
	}
	e->runs = NULL;
	pl_cache_clear(e);
	free(e->by_id);
	e->by_id = NULL;
	e->by_id_cap = e->n_runs = 0;
	/* Notifications in flight use the HTTP client: stop them first. */
	notify_close(e->notify, notify_closed, e);
}

void engine_stop(struct engine *e, void (*done)(void *data), void *data)
{
	e->stopping = true;
	e->stop_done = done;
	e->stop_data = data;
	for (struct run *r = e->runs; r; r = r->next) {
		run_stop_timeout(r);
		for (size_t i = 0; i < r->n_stages; i++) {
			struct stage *st = &r->stages[i];
			stage_stop_timer(st);
			stage_stop_retry(st);
			if (!st->live)
				continue;
			if (st->kind->abandon)
				st->kind->abandon(st);
			else
				st->kind->cancel(st);
			st->live = false;
		}
		for (struct waiter *w = r->waiters, *n; w; w = n) {
			n = w->next;
			w->cb(w->data, KPL_EUNAVAILABLE, r->id);
			free(w);
		}
		r->waiters = NULL;
		/* A pending submit_cb is answered by the commit in flight, which
		 * lands before stop_committed. */
	}
	store_commit(e->store, stop_committed, e);
}

static void audit_committed(void *data, int status)
{
	(void)data;
	if (status)
		kpl_error(LOG, "an audit entry could not be stored: %s", kpl_strerror(status));
}

int engine_audit(struct engine *e, const char *run_id, const char *stage,
		 const char *msg, struct kpl_err *err)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;
	Google__Protobuf__Timestamp t;
	struct run *r = NULL;
	struct stage *st = NULL;
	char *copy;
	size_t rlen;

	if (run_id) {
		r = engine_find(e, run_id);
		if (!r || r->final_durable || run_state_final(r->state))
			return kpl_errf(err, r ? KPL_ESTATE : KPL_ENOTFOUND,
					"run %s is not active", run_id);
		if (stage) {
			st = run_find_stage(r, stage, false);
			if (!st)
				st = run_find_stage(r, stage, true);
			if (!st)
				return kpl_errf(err, KPL_ENOTFOUND, "run %s has no stage %s",
						run_id, stage);
			if (st->state != KPL__V1__STAGE_STATE__STAGE_STATE_WAITING || !st->live ||
			    (strcmp(st->kind->name, "approval") != 0 && !st->kind->approve))
				return kpl_errf(err, KPL_ESTATE, "stage %s is not waiting for approval",
						stage);
		}
	}
	copy = clean_text(e, msg, strlen(msg), 0, &rlen);
	ev.message = copy;
	ev.time = ts_set(&t, kpl_now_ms());
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_AUDIT;
	ev.stream = KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM;
	ev.run_id = "";
	ev.stage = "";
	ev.pipeline_name = "";
	if (r) {
		ev.run_id = r->id;
		ev.seq = r->next_seq++;
		ev.global_seq = e->next_gseq++;
		ev.pipeline_name = r->pl->name;
		ev.run_state = r->state;
		if (st) {
			ev.stage = st->spec->name;
			ev.stage_state = st->state;
			ev.attempt = st->attempt;
		}
		store_stage_event(e->store, &ev);
	}
	store_stage_audit(e->store, &ev);
	kpl_info(LOG, "audit: %s%s%s", r ? r->id : "", r ? ": " : "", ev.message);
	if (r)
		run_commit(r);
	else
		store_commit(e->store, audit_committed, NULL);
	free(copy);
	return 0;
}

size_t engine_check_config_names(const struct engine *e, const struct pipeline *pl,
				 void (*fn)(void *data, struct pl_pos pos, const char *path,
					    const char *msg),
				 void *data)
{
	/* The with keys that name an endpoint, as the kinds' stage_endpoint
	 * calls do. */
	static const struct {
		const char *key;
		enum cfg_kind kind;
	} refs[] = {
		{ "cluster", CFG_KUBERNETES },
		{ "registry", CFG_REGISTRY },
		{ "jenkins", CFG_JENKINS },
		{ "prometheus", CFG_PROMETHEUS },
	};
	const char *cfg_path = e->cfg && e->cfg->path ? e->cfg->path : "(none)";
	char names[300], path[160], msg[600];
	size_t n = 0, n_main = pl->n_stages - pl->n_finally;

	for (size_t i = 0; i < pl->n_notify; i++) {
		const struct pl_notify *pn = &pl->notify[i];
		if (cfg_find(e->cfg, CFG_NOTIFIER, pn->notifier))
			continue;
		snprintf(path, sizeof path, "notify[%zu].notifier", i);
		snprintf(msg, sizeof msg, "no notifier named \"%s\" in the daemon config %s "
			 "(declared: %s)", pn->notifier, cfg_path,
			 cfg_names(e->cfg, CFG_NOTIFIER, names, sizeof names));
		fn(data, pn->pos, path, msg);
		n++;
	}
	for (size_t i = 0; i < pl->n_stages; i++) {
		const struct pl_node *with = pl->stages[i].with;
		for (size_t j = 0; with && with->type == PL_MAP && j < KPL_ARRAY_SIZE(refs); j++) {
			const struct pl_node *v = pl_map_get(with, refs[j].key);
			if (!v || v->type != PL_SCALAR || strstr(v->scalar, "${{") ||
			    cfg_find(e->cfg, refs[j].kind, v->scalar))
				continue;
			snprintf(path, sizeof path, "%s[%zu].with.%s", i < n_main ? "stages" : "finally",
				 i < n_main ? i : i - n_main, refs[j].key);
			snprintf(msg, sizeof msg, "no %s.%.128s in the daemon config %s (declared: %s)",
				 cfg_kind_key(refs[j].kind), v->scalar, cfg_path,
				 cfg_names(e->cfg, refs[j].kind, names, sizeof names));
			fn(data, v->pos, path, msg);
			n++;
		}
	}
	/* runs_on.cluster, the stage's or the defaults' (reported once). */
	for (size_t i = 0, defaults_said = 0; i < pl->n_stages; i++) {
		const struct pl_stage *st = &pl->stages[i];
		const struct pl_node *v = pl_runs_on_get(st->runs_on, st->runs_on_defaults, "cluster");
		bool own = st->runs_on && st->runs_on->type == PL_MAP &&
			   pl_map_get(st->runs_on, "cluster");
		if (!pl_runs_on_pod(st->runs_on, st->runs_on_defaults) || !v ||
		    v->type != PL_SCALAR || strstr(v->scalar, "${{") ||
		    cfg_find(e->cfg, CFG_KUBERNETES, v->scalar) || (!own && defaults_said++))
			continue;
		if (own)
			snprintf(path, sizeof path, "%s[%zu].runs_on.cluster",
				 i < n_main ? "stages" : "finally", i < n_main ? i : i - n_main);
		else
			snprintf(path, sizeof path, "defaults.runs_on.cluster");
		snprintf(msg, sizeof msg, "no kubernetes.%.128s in the daemon config %s (declared: %s)",
			 v->scalar, cfg_path, cfg_names(e->cfg, CFG_KUBERNETES, names, sizeof names));
		fn(data, v->pos, path, msg);
		n++;
	}
	return n;
}
