/*
 * rpc_pipelines.c - kpl.v1.Pipelines. Handlers check the request, call the
 * engine, and answer from the store, so a client only ever sees durable
 * state.
 */
#include "api/rpc_pipelines.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/fanout.h"
#include "api/kpl.pb-c.h"
#include "engine/config.h"
#include "engine/hooks.h"
#include "engine/metrics.h"
#include "engine/ops.h"
#include "google/protobuf/timestamp.pb-c.h"
#include "pipelines/pipeline.h"
#include "pipelines/reuse.h"
#include "stages/stage.h"

#define LOG "rpc"
#define LIST_DEFAULT_PAGE 50
#define LIST_MAX_PAGE 500
/* Runs a filtered ListRuns may look at for one page before it answers with
 * what it has (and a token to go on), so one call stays cheap. */
#define LIST_MAX_SCAN 20000

/* grpc_status_code values used here. */
enum {
	ST_OK = 0,
	ST_CANCELLED = 1,
	ST_INVALID_ARGUMENT = 3,
	ST_NOT_FOUND = 5,
	ST_INTERNAL = 13,
	ST_UNAVAILABLE = 14,
};

struct watch;
struct watch_group;

struct rpc {
	struct engine *eng;
	struct store *store;
	struct watch *watches; /* open WatchRun streams */
	struct watch_group *groups; /* the WatchRun streams by run */
	/* Runs watch_pump again for WatchRuns streams with more of the global
	 * log to read (watch->more), one batch each per loop turn. Started
	 * on demand; freed in its close callback (rpc_free). */
	uv_idle_t *idle;
	struct hooks *hooks; /* RunPipeline's git; NULL: unavailable */
	struct api_method methods[16];
};

/* ---------------------------------------------------------------------- */
/* Building responses from the store */

/*
 * A whole Run from the store. On success *rec and *stages are the caller's
 * to release with run_release; (*rec)->run is the response.
 */
static int run_load(struct store *s, const char *id, Kpl__Store__V1__RunRecord **rec,
		    Kpl__Store__V1__StageRecord ***stages, size_t *n_stages,
		    Kpl__V1__StageStatus ***statuses)
{
	Kpl__V1__Run *run;
	uint64_t last;
	int rc;

	*stages = NULL;
	*n_stages = 0;
	*statuses = NULL;
	if ((rc = store_get_run(s, id, rec)) != 0)
		return rc;
	if (!(*rec)->run) {
		kpl__store__v1__run_record__free_unpacked(*rec, NULL);
		return KPL_ECORRUPT;
	}
	if ((rc = store_get_stages(s, id, stages, n_stages)) != 0) {
		kpl__store__v1__run_record__free_unpacked(*rec, NULL);
		return rc;
	}
	run = (*rec)->run;
	*statuses = kpl_calloc(*n_stages, sizeof **statuses);
	for (size_t i = 0; i < *n_stages; i++)
		(*statuses)[i] = (*stages)[i]->status;
	run->n_stages = *n_stages;
	run->stages = *statuses;
	/* Log events do not rewrite the run record: one seek to the run's
	 * last event, never a decode of each since the record was written. */
	last = store_last_event_seq(s, id);
	if ((*rec)->next_seq && (*rec)->next_seq - 1 > last)
		last = (*rec)->next_seq - 1;
	run->last_seq = last;
	return 0;
}

static void run_release(Kpl__Store__V1__RunRecord *rec, Kpl__Store__V1__StageRecord **stages,
			size_t n_stages, Kpl__V1__StageStatus **statuses)
{
	if (rec) {
		/* The stage statuses belong to their records, not to rec. */
		rec->run->n_stages = 0;
		rec->run->stages = NULL;
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
	}
	store_free_stages(stages, n_stages);
	free(statuses);
}

static void reply_run(struct api_call *call, struct store *s, const char *id)
{
	Kpl__Store__V1__RunRecord *rec;
	Kpl__Store__V1__StageRecord **stages;
	Kpl__V1__StageStatus **statuses;
	size_t n;
	int rc = run_load(s, id, &rec, &stages, &n, &statuses);
	char msg[200];

	if (rc == KPL_ENOTFOUND) {
		snprintf(msg, sizeof msg, "run %s not found", id);
		api_call_fail(call, ST_NOT_FOUND, msg);
		return;
	}
	if (rc) {
		snprintf(msg, sizeof msg, "run %s: cannot read it: %s", id, kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
		return;
	}
	api_call_reply(call, &rec->run->base);
	run_release(rec, stages, n, statuses);
}

static int check_run_id(const char *field, const char *id, struct kpl_err *err)
{
	return ops_check_run_id(field, id, err);
}

/* ---------------------------------------------------------------------- */
/* Calls that wait for the engine */

/* One call waiting for an engine callback. call is NULL once the client
 * went away (the op lives on until the engine answers). */
struct op {
	struct rpc *rpc;
	struct api_call *call;
};

static void op_cancelled(struct api_call *call, void *data)
{
	struct op *op = data;

	op->call = NULL;
	api_call_fail(call, ST_CANCELLED, "the call was cancelled; the request may still take effect");
}

static struct op *op_new(struct rpc *rpc, struct api_call *call)
{
	struct op *op = kpl_calloc(1, sizeof *op);

	op->rpc = rpc;
	op->call = call;
	api_call_on_cancel(call, op_cancelled, op);
	return op;
}

static void op_answer(void *data, int status, const char *run_id)
{
	struct op *op = data;

	if (op->call) {
		if (status) {
			char msg[200];
			snprintf(msg, sizeof msg, "run %s: %s", run_id, kpl_strerror(status));
			api_call_fail(op->call, kpl_err_grpc_status(status), msg);
		} else {
			reply_run(op->call, op->rpc->store, run_id);
		}
	}
	free(op);
}

/* A request's `files` map (SubmitRun, ValidatePipeline) as struct
 * pl_file, borrowing its strings; NULL when empty (free the array). */
static struct pl_file *req_files(const ProtobufCMessage *m, size_t *n)
{
	struct pl_file *f = NULL;

	*n = 0;
	if (m->descriptor == &kpl__v1__submit_run_request__descriptor) {
		const Kpl__V1__SubmitRunRequest *r = (const void *)m;
		f = kpl_calloc(r->n_files + 1, sizeof *f);
		for (size_t i = 0; i < r->n_files; i++)
			f[i] = (struct pl_file){ r->files[i]->key, r->files[i]->value,
						 strlen(r->files[i]->value) };
		*n = r->n_files;
	} else if (m->descriptor == &kpl__v1__validate_pipeline_request__descriptor) {
		const Kpl__V1__ValidatePipelineRequest *r = (const void *)m;
		f = kpl_calloc(r->n_files + 1, sizeof *f);
		for (size_t i = 0; i < r->n_files; i++)
			f[i] = (struct pl_file){ r->files[i]->key, r->files[i]->value,
						 strlen(r->files[i]->value) };
		*n = r->n_files;
	}
	return f;
}

static void h_submit(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__SubmitRunRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	const char **names = NULL, **values = NULL;
	struct op *op;
	int rc;

	if (!req->pipeline || !*req->pipeline) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "pipeline: required (the text of a pipeline file)");
		return;
	}
	if (req->n_params > KPL_MAX_PARAMS) {
		char msg[100];
		snprintf(msg, sizeof msg, "params: %zu given, at most %d", req->n_params,
			 KPL_MAX_PARAMS);
		api_call_fail(call, ST_INVALID_ARGUMENT, msg);
		return;
	}
	/* Webhook deliveries' keys: an API client that could take one would
	 * keep the delivery's run from ever starting. */
	if (req->idempotency_key && strncmp(req->idempotency_key, "hook:", 5) == 0) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "idempotency_key: keys starting with \"hook:\" are kpld's own "
			      "(webhook deliveries)");
		return;
	}
	if (req->idempotency_key && strncmp(req->idempotency_key, "sched:", 6) == 0) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "idempotency_key: keys starting with \"sched:\" are kpld's own "
			      "(schedules)");
		return;
	}
	names = kpl_calloc(req->n_params, sizeof *names);
	values = kpl_calloc(req->n_params, sizeof *values);
	for (size_t i = 0; i < req->n_params; i++) {
		names[i] = req->params[i]->key;
		values[i] = req->params[i]->value;
	}
	size_t n_files;
	struct pl_file *fv = req_files(m, &n_files);
	struct pl_files files = { fv, n_files };
	struct engine_source src = { .files = &files };
	op = op_new(rpc, call);
	rc = engine_submit_from(rpc->eng, req->pipeline, strlen(req->pipeline), names, values,
				req->n_params, req->idempotency_key, &src, op_answer, op, &err);
	free(names);
	free(values);
	free(fv);
	if (rc) {
		if (op->call)
			api_call_fail_err(call, &err);
		free(op);
	}
}

static void audit(struct api_call *call, struct rpc *rpc, const char *run_id,
		  const char *stage, const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* RunPipeline: the hooks fetch the file and submit it as a push does. */
static void run_pipeline_done(void *data, int code, const char *run_id, const char *msg)
{
	struct op *op = data;

	if (op->call) {
		if (code)
			api_call_fail(op->call, kpl_err_grpc_status(code), msg);
		else
			reply_run(op->call, op->rpc->store, run_id);
	}
	free(op);
}

static void h_run_pipeline(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__RunPipelineRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	const char **names, **values;
	struct hooks_run rq = { 0 };
	struct op *op;
	int rc;

	if (!rpc->hooks) {
		api_call_fail(call, ST_UNAVAILABLE, "kpld is stopping");
		return;
	}
	/* The schedules' keys (engine/sched.h): a client holding one could
	 * keep a fire from starting its run. */
	if (req->idempotency_key && strncmp(req->idempotency_key, "sched:", 6) == 0) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "idempotency_key: keys starting with \"sched:\" are kpld's own "
			      "(schedules)");
		return;
	}
	if (req->n_params > KPL_MAX_PARAMS) {
		char msg[100];
		snprintf(msg, sizeof msg, "params: %zu given, at most %d", req->n_params,
			 KPL_MAX_PARAMS);
		api_call_fail(call, ST_INVALID_ARGUMENT, msg);
		return;
	}
	names = kpl_calloc(req->n_params + 1, sizeof *names);
	values = kpl_calloc(req->n_params + 1, sizeof *values);
	for (size_t i = 0; i < req->n_params; i++) {
		names[i] = req->params[i]->key;
		values[i] = req->params[i]->value;
	}
	rq.name = req->name;
	rq.ref = req->ref;
	rq.sha = req->sha;
	rq.param_names = names;
	rq.param_values = values;
	rq.n_params = req->n_params;
	rq.idem_key = req->idempotency_key;
	op = op_new(rpc, call);
	rc = hooks_run_pipeline(rpc->hooks, &rq, run_pipeline_done, op, &err);
	free(names);
	free(values);
	if (rc) {
		if (op->call)
			api_call_fail_err(call, &err);
		free(op);
		return;
	}
	audit(call, rpc, NULL, NULL, "ran registered pipeline %s at %s", req->name,
	      req->sha && *req->sha ? req->sha : req->ref && *req->ref ? req->ref :
	      "its first branch");
}

static void h_run_text(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__GetRunPipelineRequest *req = (const void *)m;
	struct rpc *rpc = data;
	Kpl__V1__GetRunPipelineResponse resp = KPL__V1__GET_RUN_PIPELINE_RESPONSE__INIT;
	Kpl__Store__V1__RunRecord *rec = NULL;
	struct kpl_err err = { 0 };
	char *text = NULL, msg[200];
	size_t len = 0;
	int rc;

	if (check_run_id("id", req->id, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	rc = store_get_run(rpc->store, req->id, &rec);
	if (rc == 0)
		rc = store_get_pipeline(rpc->store, req->id, &text, &len);
	if (rc == KPL_ENOTFOUND) {
		snprintf(msg, sizeof msg, "run %s not found", req->id);
		api_call_fail(call, ST_NOT_FOUND, msg);
	} else if (rc) {
		snprintf(msg, sizeof msg, "run %s: cannot read it: %s", req->id, kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
	} else if (strlen(text) != len) {
		/* proto3 strings hold no NUL: say so rather than cut it. */
		snprintf(msg, sizeof msg, "run %s: its pipeline text holds a NUL byte", req->id);
		api_call_fail(call, ST_INTERNAL, msg);
	} else {
		resp.run_id = req->id;
		resp.pipeline = text;
		resp.source = rec->run ? rec->run->source : NULL;
		resp.n_templates = rec->n_templates;
		resp.templates = rec->templates;
		api_call_reply(call, &resp.base);
	}
	free(text);
	if (rec)
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
}

/* CancelRun, RetryRun and ApproveStage: an ops.h call, answered with the
 * run once the engine says the change is durable. */
static void op_start(struct api_call *call, struct op *op, int rc, struct kpl_err *err)
{
	if (rc) {
		api_call_fail_err(call, err);
		free(op);
	}
}

/*
 * An audit entry naming the caller (docs/security.md), made before the
 * change so that in the run's log it comes before the events the change
 * causes. A run that is not active (or a stage not waiting) records nothing:
 * the change is refused then too.
 */
static void audit(struct api_call *call, struct rpc *rpc, const char *run_id,
		  const char *stage, const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void audit(struct api_call *call, struct rpc *rpc, const char *run_id,
		  const char *stage, const char *fmt, ...)
{
	char what[400], msg[800];
	struct kpl_err err = { 0 };
	va_list ap;

	if (run_id && check_run_id("id", run_id, &err))
		return;
	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	snprintf(msg, sizeof msg, "%s %s", api_call_who(call), what);
	engine_audit(rpc->eng, run_id, stage, msg, &err);
}

static void h_cancel(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__CancelRunRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct op *op = op_new(rpc, call);

	op_start(call, op, ops_cancel(rpc->eng, api_call_who(call), req->id, op_answer, op, &err),
		 &err);
}

static void h_get(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__GetRunRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };

	uint64_t before = store_events_decoded(rpc->store);

	if (check_run_id("id", req->id, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	reply_run(call, rpc->store, req->id);
	metrics_events_read("GetRun", store_events_decoded(rpc->store) - before);
}

/* ---------------------------------------------------------------------- */
/* ListRuns */

struct list_ctx {
	const Kpl__V1__ListRunsRequest *req;
	size_t page;
	size_t scanned;
	Kpl__V1__Run **runs; /* packed-and-unpacked copies we own */
	size_t n;
	char last_id[65];    /* last run looked at */
	bool more;
};

static int list_one(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	struct list_ctx *c = data;
	const Kpl__V1__Run *run = rec->run;
	uint8_t *buf;
	size_t len;

	if (!run)
		return 0;
	if (c->n == c->page || c->scanned == LIST_MAX_SCAN) {
		c->more = true;
		return 1;
	}
	c->scanned++;
	snprintf(c->last_id, sizeof c->last_id, "%s", run->id);
	if (c->req->pipeline_name && *c->req->pipeline_name &&
	    strcmp(c->req->pipeline_name, run->pipeline_name))
		return 0;
	if (c->req->state && c->req->state != run->state)
		return 0;
	/* rec is borrowed for this call only: keep a copy. */
	len = protobuf_c_message_get_packed_size(&run->base);
	buf = kpl_malloc(len);
	protobuf_c_message_pack(&run->base, buf);
	c->runs = kpl_realloc(c->runs, (c->n + 1) * sizeof *c->runs);
	c->runs[c->n] = kpl__v1__run__unpack(NULL, len, buf);
	free(buf);
	/* A NULL in the response would crash its packing: stop the walk. */
	if (!c->runs[c->n])
		return KPL_ENOMEM;
	c->n++;
	return 0;
}

static void h_list(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__ListRunsRequest *req = (const void *)m;
	struct rpc *rpc = data;
	Kpl__V1__ListRunsResponse resp = KPL__V1__LIST_RUNS_RESPONSE__INIT;
	struct list_ctx c = { .req = req };
	struct kpl_err err = { 0 };
	int rc;

	if (req->page_size < 0) {
		api_call_fail(call, ST_INVALID_ARGUMENT, "page_size: must not be negative");
		return;
	}
	c.page = req->page_size ? (size_t)req->page_size : LIST_DEFAULT_PAGE;
	if (c.page > LIST_MAX_PAGE)
		c.page = LIST_MAX_PAGE;
	if (req->page_token && *req->page_token &&
	    check_run_id("page_token", req->page_token, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	rc = store_list_runs(rpc->store, req->page_token, list_one, &c);
	if (rc < 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot list runs: %s", kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
		goto out;
	}
	resp.runs = c.runs;
	resp.n_runs = c.n;
	resp.next_page_token = c.more ? c.last_id : "";
	api_call_reply(call, &resp.base);
out:
	for (size_t i = 0; i < c.n; i++)
		if (c.runs[i])
			kpl__v1__run__free_unpacked(c.runs[i], NULL);
	free(c.runs);
}

/* ---------------------------------------------------------------------- */
/* WatchRun: stored events from from_seq, then live ones, read back from the
 * store a batch at a time (at most WATCH_BATCH_EVENTS events or about
 * WATCH_BATCH_BYTES bytes, in one read transaction) and sent as one flush:
 * a slow client costs one batch of memory, and the loop is woken once per
 * batch, not per event.
 *
 * The streams of one run form a group with one engine subscription and one
 * fan tail (api/fanout.h): the newest events are read and encoded once and
 * the same bytes go to every stream that is caught up; a stream behind the
 * tail's window (a replay, a slow client) reads the store itself until it
 * reaches it. */

/* A batch: enough to fill a few TCP segments per wake-up, and bounded so a
 * slow client holds little and one loop turn does bounded work. */
#define WATCH_BATCH_EVENTS 256
#define WATCH_BATCH_BYTES (32 * 1024)

struct watch {
	struct rpc *rpc;
	struct api_call *call;      /* NULL once ended */
	/* The run's id (WatchRun); a WatchRuns stream's own subscription
	 * (a WatchRun stream hears of commits through its group). */
	struct engine_sub sub;
	struct watch_group *group;  /* WatchRun; NULL once ended */
	struct watch *gprev, *gnext; /* group->members */
	uint64_t next_seq;
	bool global;                /* WatchRuns: next_seq is a global seq */
	const Kpl__V1__WatchRunsRequest *filter; /* WatchRuns: owned by the call */
	bool sending;               /* a flush is in flight */
	size_t queued;              /* events pushed by the read in progress */
	bool ended;
	bool more;                  /* WatchRuns: read on at the next turn */
	struct watch *prev, *next;  /* rpc->watches */
};

/* The WatchRun streams of one run. Freed when its last stream leaves (not
 * while group_notified walks it: busy). */
struct watch_group {
	struct rpc *rpc;
	struct engine_sub sub;
	struct fan_tail *tail;
	struct watch *members;
	int busy;
	struct watch_group *prev, *next; /* rpc->groups */
};

static void watch_pump(struct watch *w);

static void group_free(struct watch_group *g)
{
	struct rpc *rpc = g->rpc;

	engine_unsubscribe(rpc->eng, &g->sub);
	if (g->prev)
		g->prev->next = g->next;
	else
		rpc->groups = g->next;
	if (g->next)
		g->next->prev = g->prev;
	fan_tail_free(g->tail);
	free(g);
}

/* A commit added events to the run: every stream of it reads on. */
static void group_notified(struct engine_sub *sub)
{
	struct watch_group *g = sub->data;
	struct watch *w, *next;

	fan_tail_committed(g->tail);
	g->busy++;
	for (w = g->members; w; w = next) {
		next = w->gnext; /* watch_pump may end (and free) w only */
		watch_pump(w);
	}
	if (--g->busy == 0 && !g->members)
		group_free(g);
}

static void group_join(struct watch *w)
{
	struct rpc *rpc = w->rpc;
	struct watch_group *g;

	for (g = rpc->groups; g; g = g->next)
		if (strcmp(g->sub.run_id, w->sub.run_id) == 0)
			break;
	if (!g) {
		g = kpl_calloc(1, sizeof *g);
		g->rpc = rpc;
		snprintf(g->sub.run_id, sizeof g->sub.run_id, "%s", w->sub.run_id);
		g->sub.notify = group_notified;
		g->sub.data = g;
		g->tail = fan_tail_new(rpc->store, w->sub.run_id, WATCH_BATCH_EVENTS,
				       WATCH_BATCH_BYTES);
		engine_subscribe(rpc->eng, &g->sub);
		g->next = rpc->groups;
		if (rpc->groups)
			rpc->groups->prev = g;
		rpc->groups = g;
	}
	w->group = g;
	w->gprev = NULL;
	w->gnext = g->members;
	if (g->members)
		g->members->gprev = w;
	g->members = w;
}

static void group_leave(struct watch *w)
{
	struct watch_group *g = w->group;

	if (!g)
		return;
	if (w->gprev)
		w->gprev->gnext = w->gnext;
	else
		g->members = w->gnext;
	if (w->gnext)
		w->gnext->gprev = w->gprev;
	w->gprev = w->gnext = NULL;
	w->group = NULL;
	if (!g->members && !g->busy)
		group_free(g);
}

static void watch_unlink(struct watch *w)
{
	if (w->prev)
		w->prev->next = w->next;
	else if (w->rpc->watches == w)
		w->rpc->watches = w->next;
	if (w->next)
		w->next->prev = w->prev;
	w->prev = w->next = NULL;
}

/* Ends the stream (once) and frees w when no send is in flight. */
static void watch_end(struct watch *w, int code, const char *msg)
{
	if (!w->ended) {
		w->ended = true;
		if (w->global)
			engine_unsubscribe(w->rpc->eng, &w->sub);
		else
			group_leave(w);
		watch_unlink(w);
		if (w->call)
			api_call_finish(w->call, code, msg);
		w->call = NULL;
	}
	if (!w->sending)
		free(w);
}

static void watch_sent(struct api_call *call, bool ok, void *data)
{
	struct watch *w = data;

	w->sending = false;
	if (w->ended) {
		free(w);
		return;
	}
	if (!ok) {
		watch_end(w, ST_CANCELLED, "client went away");
		return;
	}
	watch_pump(w);
}

static bool watch_wants(const struct watch *w, const Kpl__V1__RunEvent *ev)
{
	const Kpl__V1__WatchRunsRequest *f = w->filter;
	bool kind_ok = f->n_kinds == 0;

	if (f->pipeline_name && *f->pipeline_name &&
	    (!ev->pipeline_name || strcmp(f->pipeline_name, ev->pipeline_name)))
		return false;
	for (size_t i = 0; i < f->n_kinds; i++)
		if (f->kinds[i] == ev->kind)
			kind_ok = true;
	return kind_ok;
}

static int watch_got(void *data, const Kpl__V1__RunEvent *ev)
{
	struct watch *w = data;

	w->next_seq = (w->global ? ev->global_seq : ev->seq) + 1;
	if (w->global && !watch_wants(w, ev))
		return 0; /* skipped: read on */
	w->queued++;
	if (api_call_push(w->call, &ev->base) >= WATCH_BATCH_BYTES)
		return 1; /* the batch is full */
	return 0;
}

/* Sends what the last read queued; false if it queued nothing. */
static bool watch_flush(struct watch *w)
{
	if (!w->queued)
		return false;
	w->queued = 0;
	w->sending = true;
	api_call_flush(w->call, watch_sent, w);
	return true;
}

/* Global-log records a WatchRuns stream reads per loop turn at most: a
 * filter that matches nothing must not hold the loop for the whole log. */
#define WATCH_SCAN_BATCH 512

static void rpc_idle(uv_idle_t *h);

/* The stream has more to read: go on at the next loop turn. */
static void watch_more(struct watch *w)
{
	struct rpc *rpc = w->rpc;

	w->more = true;
	if (!rpc->idle) {
		rpc->idle = kpl_malloc(sizeof *rpc->idle);
		uv_idle_init(engine_loop(rpc->eng), rpc->idle);
		rpc->idle->data = rpc;
	}
	uv_idle_start(rpc->idle, rpc_idle);
}

static void rpc_idle(uv_idle_t *h)
{
	struct rpc *rpc = h->data;
	struct watch *w, *next;
	bool any = false;

	for (w = rpc->watches; w; w = next) {
		next = w->next; /* watch_pump may end (and free) w only */
		if (w->more) {
			w->more = false;
			watch_pump(w);
		}
	}
	for (w = rpc->watches; w; w = w->next)
		any = any || w->more;
	if (!any)
		uv_idle_stop(h);
}

/* Queues the chunk's events from index i on, up to a batch; -1 if one does
 * not decode (a transport that needs the message). */
static int watch_push_chunk(struct watch *w, struct fan_chunk *c, size_t i)
{
	bool grpc = api_call_is_grpc(w->call);

	for (; i < c->n; i++) {
		const Kpl__V1__RunEvent *ev = NULL;

		if (!grpc && !(ev = fan_chunk_event(c, i)))
			return -1;
		w->next_seq = c->first_seq + i + 1;
		w->queued++;
		if (api_call_push_encoded(w->call, c->wire[i], ev ? &ev->base : NULL) >=
		    WATCH_BATCH_BYTES)
			break;
	}
	return 0;
}

static void watch_pump(struct watch *w)
{
	uint64_t before = store_events_decoded(w->rpc->store), read;
	struct fan_chunk *chunk;
	size_t i;
	int rc;

	if (w->sending || w->ended)
		return;
	if (w->global) {
		/* A filtered stream may skip many events per send: one batch
		 * per loop turn until one is sent or the log is read to its
		 * end. */
		w->more = false;
		rc = store_read_global(w->rpc->store, w->next_seq, WATCH_SCAN_BATCH, watch_got, w);
		if (rc > 0)
			rc = 0; /* the batch filled up */
		read = store_events_decoded(w->rpc->store) - before;
		metrics_events_read("WatchRuns", read);
		metrics_watch_scan(read);
		if (rc < 0) {
			char msg[200];
			snprintf(msg, sizeof msg, "cannot read events: %s", kpl_strerror(rc));
			watch_end(w, ST_INTERNAL, msg);
			return;
		}
		if (watch_flush(w))
			return;
		if (w->next_seq <= store_last_global_seq(w->rpc->store))
			watch_more(w);
		return; /* WatchRuns never ends by itself */
	}
	rc = fan_tail_at(w->group->tail, w->next_seq, &chunk, &i);
	if (rc == FAN_HIT) {
		metrics_events_read("WatchRun", store_events_decoded(w->rpc->store) - before);
		if (watch_push_chunk(w, chunk, i) < 0) {
			watch_end(w, ST_INTERNAL, "cannot decode a stored event");
			return;
		}
		watch_flush(w);
		return; /* sent: read on when it is back */
	}
	if (rc == FAN_MISS) /* behind the tail: from the store, as it is */
		rc = store_read_events(w->rpc->store, w->sub.run_id, w->next_seq,
				       WATCH_BATCH_EVENTS, watch_got, w);
	metrics_events_read("WatchRun", store_events_decoded(w->rpc->store) - before);
	if (rc < 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot read events of run %s: %s", w->sub.run_id,
			 kpl_strerror(rc));
		watch_end(w, ST_INTERNAL, msg);
		return;
	}
	if (watch_flush(w))
		return; /* sent: read on when it is back */
	/* Caught up. A run that is no longer active has no more events. */
	if (!engine_run_active(w->rpc->eng, w->sub.run_id))
		watch_end(w, ST_OK, NULL);
}

static void watch_notified(struct engine_sub *sub)
{
	watch_pump(sub->data);
}

static void watch_cancelled(struct api_call *call, void *data)
{
	struct watch *w = data;
	watch_end(w, ST_CANCELLED, "cancelled");
}

static struct watch *watch_new(struct rpc *rpc, struct api_call *call, const char *run_id);

static void h_watch(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__WatchRunRequest *req = (const void *)m;
	struct rpc *rpc = data;
	Kpl__Store__V1__RunRecord *rec = NULL;
	struct kpl_err err = { 0 };
	struct watch *w;
	int rc;

	if (check_run_id("id", req->id, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	rc = store_get_run(rpc->store, req->id, &rec);
	if (rc) {
		char msg[200];
		snprintf(msg, sizeof msg, "run %s %s", req->id,
			 rc == KPL_ENOTFOUND ? "not found" : kpl_strerror(rc));
		api_call_finish(call, rc == KPL_ENOTFOUND ? ST_NOT_FOUND : ST_INTERNAL, msg);
		return;
	}
	kpl__store__v1__run_record__free_unpacked(rec, NULL);
	w = watch_new(rpc, call, req->id);
	w->next_seq = req->from_seq ? req->from_seq : 1;
	watch_pump(w);
}

static struct watch *watch_new(struct rpc *rpc, struct api_call *call, const char *run_id)
{
	struct watch *w = kpl_calloc(1, sizeof *w);

	w->rpc = rpc;
	w->global = !*run_id;
	w->call = call;
	snprintf(w->sub.run_id, sizeof w->sub.run_id, "%s", run_id);
	w->sub.notify = watch_notified;
	w->sub.data = w;
	if (*run_id)
		group_join(w);
	else
		engine_subscribe(rpc->eng, &w->sub);
	w->next = rpc->watches;
	if (rpc->watches)
		rpc->watches->prev = w;
	rpc->watches = w;
	api_call_on_cancel(call, watch_cancelled, w);
	return w;
}

static void h_watch_all(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__WatchRunsRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct watch *w;

	if (req->n_kinds > 8) {
		api_call_finish(call, ST_INVALID_ARGUMENT, "kinds: at most 8");
		return;
	}
	w = watch_new(rpc, call, "");
	w->filter = req;
	w->next_seq = req->from_global_seq ? req->from_global_seq
					   : store_last_global_seq(rpc->store) + 1;
	watch_pump(w);
}

/* Diagnostics from engine_check_config_names, for h_validate. */
struct config_diags {
	struct pl_diag *d;
	size_t n;
	const struct pl_files *files; /* what pos.file indexes */
};

static void add_config_diag(void *data, struct pl_pos pos, const char *path, const char *msg)
{
	struct config_diags *cd = data;
	struct pl_diag *d;

	cd->d = kpl_realloc(cd->d, (cd->n + 1) * sizeof *cd->d);
	d = &cd->d[cd->n++];
	d->line = pos.line;
	d->col = pos.col;
	d->path = kpl_strdup(path);
	d->message = kpl_strdup(msg);
	d->code = KPL_EINVAL;
	d->file = NULL;
	d->use_line = d->use_col = 0;
	/* A name written in a stage template is the template's line. */
	if (pos.file > 0 && cd->files && (size_t)pos.file <= cd->files->n) {
		d->file = kpl_strdup(cd->files->v[pos.file - 1].path);
		d->use_line = pos.use_line;
		d->use_col = pos.use_col;
	}
}

/* ValidatePipelineResponse.stages: pl's stages when a matrix or a
 * template made any (0 otherwise). Borrows pl's strings; free *ps and
 * *psp. */
static size_t pl_planned_stages(const struct pipeline *pl, Kpl__V1__PlannedStage **ps,
				Kpl__V1__PlannedStage ***psp)
{
	bool any = false;

	*ps = NULL;
	*psp = NULL;
	for (size_t i = 0; i < pl->n_stages; i++)
		any |= pl->stages[i].matrix || pl->stages[i].uses;
	if (!any)
		return 0;
	*ps = kpl_calloc(pl->n_stages, sizeof **ps);
	*psp = kpl_calloc(pl->n_stages, sizeof **psp);
	for (size_t i = 0; i < pl->n_stages; i++) {
		const struct pl_stage *st = &pl->stages[i];
		Kpl__V1__PlannedStage *p = &(*ps)[i];
		kpl__v1__planned_stage__init(p);
		p->name = st->name;
		p->kind = st->kind;
		p->needs = st->needs;
		p->n_needs = st->n_needs;
		p->matrix = st->matrix ? st->matrix : "";
		p->max_parallel = st->max_parallel;
		p->uses = st->uses ? st->uses : "";
		p->finally = st->is_finally;
		(*psp)[i] = p;
	}
	return pl->n_stages;
}

static void h_validate(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__ValidatePipelineRequest *req = (const void *)m;
	struct rpc *rpc = data;
	Kpl__V1__ValidatePipelineResponse resp = KPL__V1__VALIDATE_PIPELINE_RESPONSE__INIT;
	Kpl__V1__Diagnostic *diags = NULL, **dptrs = NULL;
	struct pl_diag *pd = NULL;
	struct pipeline *pl = NULL;
	struct kpl_err err = { 0 };
	const struct pl_kind *kinds;
	size_t n = 0, n_kinds, n_files;
	size_t len = req->pipeline ? strlen(req->pipeline) : 0;
	struct pl_file *fv = req_files(m, &n_files);
	struct pl_files files = { fv, n_files };
	Kpl__V1__PlannedStage *ps = NULL, **psp = NULL;

	if (reuse_check_files(&files, &err)) {
		free(fv);
		api_call_fail_err(call, &err);
		return;
	}
	kinds = stage_kinds_for_parser(&n_kinds);
	pipeline_validate_files(req->pipeline ? req->pipeline : "", len, "pipeline", &files, kinds,
				n_kinds, &pd, &n);
	/* What the parser cannot know: the names only this daemon's config
	 * resolves (kplctl lint offline says it did not check them). */
	if (!n && pipeline_parse_files(req->pipeline, len, "pipeline", &files, kinds, n_kinds, &pl,
				       &err) == 0 && rpc->eng) {
		struct config_diags cd = { NULL, 0, &files };
		engine_check_config_names(rpc->eng, pl, add_config_diag, &cd);
		pd = cd.d;
		n = cd.n;
	}
	if (n) {
		diags = kpl_calloc(n, sizeof *diags);
		dptrs = kpl_calloc(n, sizeof *dptrs);
		for (size_t i = 0; i < n; i++) {
			kpl__v1__diagnostic__init(&diags[i]);
			diags[i].line = pd[i].line;
			diags[i].column = pd[i].col;
			diags[i].path = pd[i].path ? pd[i].path : "";
			diags[i].message = pd[i].message ? pd[i].message : "";
			diags[i].severity = KPL__V1__SEVERITY__SEVERITY_ERROR;
			diags[i].file = pd[i].file ? pd[i].file : "";
			diags[i].used_line = pd[i].use_line;
			diags[i].used_column = pd[i].use_col;
			dptrs[i] = &diags[i];
		}
	} else if (pl) {
		resp.pipeline_name = pl->name;
		resp.n_stages = pl_planned_stages(pl, &ps, &psp);
		resp.stages = psp;
	}
	resp.valid = n == 0;
	resp.n_diagnostics = n;
	resp.diagnostics = dptrs;
	api_call_reply(call, &resp.base);
	if (pl)
		pipeline_free(pl);
	pl_diags_free(pd, n);
	free(diags);
	free(dptrs);
	free(ps);
	free(psp);
	free(fv);
}

static void h_approve(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__ApproveStageRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct op *op = op_new(rpc, call);

	op_start(call, op, ops_approve(rpc->eng, api_call_who(call), req->run_id, req->stage,
				       req->approve, req->comment, req->by, op_answer, op, &err),
		 &err);
}

static void h_retry(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__RetryRunRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct op *op = op_new(rpc, call);

	op_start(call, op, ops_retry(rpc->eng, api_call_who(call), req->id, op_answer, op, &err),
		 &err);
}

/* A secret change: made visible (secrets_change_end) and answered once it is
 * durable, not before: a run submitted meanwhile sees the secret as it was. */
struct secret_op {
	struct rpc *rpc;
	struct api_call *call;
	struct secrets_change *change;
	char name[65];
};

static void secret_cancelled(struct api_call *call, void *data)
{
	struct secret_op *op = data;
	op->call = NULL;
	api_call_fail(call, ST_CANCELLED, "the call was cancelled; the change may still be made");
}

/* Splits a secrets_pipelines text into v (n entries pointing into a copy,
 * *buf, the caller's to free). */
static size_t split_pipelines(const char *text, char **buf, char ***v)
{
	size_t n = 0;
	char *p;

	*buf = kpl_strdup(text ? text : "");
	*v = kpl_calloc(SECRETS_MAX_PIPELINES + 1, sizeof **v);
	for (p = *buf; *p && n < SECRETS_MAX_PIPELINES;) {
		char *nl = strchr(p, '\n');
		(*v)[n++] = p;
		if (!nl)
			break;
		*nl = '\0';
		p = nl + 1;
	}
	return n;
}

static void secret_committed(void *data, int status)
{
	struct secret_op *op = data;
	struct secrets *sec = engine_secrets(op->rpc->eng);
	Kpl__V1__Secret resp = KPL__V1__SECRET__INIT;
	char *buf = NULL, **v = NULL;

	secrets_change_end(sec, op->change, status);
	if (op->call) {
		if (status) {
			api_call_fail(op->call, ST_INTERNAL, "the change could not be stored");
		} else {
			resp.name = op->name;
			resp.n_pipelines = split_pipelines(secrets_pipelines(sec, op->name), &buf, &v);
			resp.pipelines = v;
			api_call_reply(op->call, &resp.base);
		}
	}
	free(buf);
	free(v);
	free(op);
}

static void secret_commit(struct rpc *rpc, struct api_call *call, const char *name,
			  struct secrets_change *change)
{
	struct secret_op *op = kpl_calloc(1, sizeof *op);

	op->rpc = rpc;
	op->call = call;
	op->change = change;
	snprintf(op->name, sizeof op->name, "%s", name);
	api_call_on_cancel(call, secret_cancelled, op);
	store_commit(rpc->store, secret_committed, op);
}

static void h_secret_set(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__SetSecretRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct secrets_change *change;
	char limited[200] = "";

	/* Values are up to 64 KiB: ordinary growth, kept out of the reserve. */
	if (store_room_err(rpc->store, (req->value ? strlen(req->value) : 0) + 4096, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	if (secrets_stage_set(engine_secrets(rpc->eng), req->name, req->value ? req->value : "",
			      req->value ? strlen(req->value) : 0,
			      (const char *const *)req->pipelines, req->n_pipelines, &change,
			      &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	if (req->n_pipelines)
		snprintf(limited, sizeof limited, " for pipeline%s %s%s",
			 req->n_pipelines > 1 ? "s" : "", req->pipelines[0],
			 req->n_pipelines > 1 ? ", ..." : "");
	kpl_info(LOG, "secret %s set%s", req->name, limited);
	audit(call, rpc, NULL, NULL, "set secret %s%s", req->name, limited);
	secret_commit(rpc, call, req->name, change);
}

static void h_secret_delete(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__DeleteSecretRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct secrets_change *change;

	if (secrets_check_name(req->name, &err) ||
	    secrets_stage_delete(engine_secrets(rpc->eng), req->name, &change, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	kpl_info(LOG, "secret %s deleted", req->name);
	audit(call, rpc, NULL, NULL, "deleted secret %s", req->name);
	secret_commit(rpc, call, req->name, change);
}

static void h_secret_list(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	struct rpc *rpc = data;
	struct secrets *sec = engine_secrets(rpc->eng);
	Kpl__V1__ListSecretsResponse resp = KPL__V1__LIST_SECRETS_RESPONSE__INIT;
	const char *const *names;
	size_t n = secrets_names(sec, &names);
	Kpl__V1__Secret *items = kpl_calloc(n, sizeof *items);
	Kpl__V1__Secret **ptrs = kpl_calloc(n, sizeof *ptrs);
	char **bufs = kpl_calloc(n, sizeof *bufs);

	(void)m;
	for (size_t i = 0; i < n; i++) {
		kpl__v1__secret__init(&items[i]);
		items[i].name = (char *)names[i];
		items[i].n_pipelines = split_pipelines(secrets_pipelines(sec, names[i]), &bufs[i],
						       &items[i].pipelines);
		ptrs[i] = &items[i];
	}
	resp.n_secrets = n;
	resp.secrets = ptrs;
	api_call_reply(call, &resp.base);
	for (size_t i = 0; i < n; i++) {
		free(bufs[i]);
		free(items[i].pipelines);
	}
	free(bufs);
	free(items);
	free(ptrs);
}

/* ---------------------------------------------------------------------- */
/* Releases */

static void h_releases(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__ListReleasesRequest *req = (const void *)m;
	struct rpc *rpc = data;
	Kpl__V1__ListReleasesResponse resp = KPL__V1__LIST_RELEASES_RESPONSE__INIT;
	Kpl__Store__V1__ReleaseRecord **recs = NULL;
	Kpl__V1__Release *rel = NULL, **ptrs = NULL;
	Google__Protobuf__Timestamp *ts = NULL;
	struct kpl_err err = { 0 };
	char parts[3][128];
	size_t n = 0, limit;
	int rc;

	if (ops_split_target(req->deployment, parts, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	limit = req->limit > 0 ? (size_t)req->limit : 50;
	if (limit > 500)
		limit = 500;
	rc = store_list_releases(rpc->store, req->deployment, &recs, &n);
	if (rc) {
		api_call_fail(call, ST_INTERNAL, "cannot read the release history");
		return;
	}
	if (n > limit)
		limit = limit; /* only the first `limit` go out */
	else
		limit = n;
	rel = kpl_calloc(limit, sizeof *rel);
	ptrs = kpl_calloc(limit, sizeof *ptrs);
	ts = kpl_calloc(limit, sizeof *ts);
	for (size_t i = 0; i < limit; i++) {
		Kpl__Store__V1__ReleaseRecord *r = recs[i];
		kpl__v1__release__init(&rel[i]);
		google__protobuf__timestamp__init(&ts[i]);
		ts[i].seconds = r->time_ms / 1000;
		ts[i].nanos = (int32_t)(r->time_ms % 1000) * 1000000;
		rel[i].deployment = r->target;
		rel[i].seq = r->seq;
		rel[i].run_id = r->run_id;
		rel[i].stage = r->stage;
		rel[i].kind = r->kind;
		rel[i].revision = r->revision;
		rel[i].image = r->image;
		rel[i].previous_revision = r->previous_revision;
		rel[i].previous_image = r->previous_image;
		rel[i].time = &ts[i];
		ptrs[i] = &rel[i];
	}
	resp.n_releases = limit;
	resp.releases = ptrs;
	api_call_reply(call, &resp.base);
	free(rel);
	free(ptrs);
	free(ts);
	store_free_releases(recs, n);
}

/*
 * A rollback on demand is a run like any other (so it is watched, retried,
 * audited and kept like one) of a pipeline with one `rollback` stage.
 */
static void h_rollback(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__RollbackReleaseRequest *req = (const void *)m;
	struct rpc *rpc = data;
	struct kpl_err err = { 0 };
	struct op *op = op_new(rpc, call);

	op_start(call, op, ops_rollback(rpc->eng, api_call_who(call), req->deployment,
					req->to_revision, op_answer, op, &err),
		 &err);
}

void rpc_close_streams(struct rpc *rpc)
{
	while (rpc->watches) {
		struct watch *w = rpc->watches;
		char msg[200];
		/* A WatchRuns stream resumes by its own field. */
		snprintf(msg, sizeof msg,
			 "kpld is shutting down; watch again with %s=%llu",
			 w->global ? "from_global_seq" : "from_seq",
			 (unsigned long long)w->next_seq);
		watch_end(w, ST_UNAVAILABLE, msg);
	}
}

/* ---------------------------------------------------------------------- */

struct rpc *rpc_new(struct engine *e)
{
	struct rpc *rpc = kpl_calloc(1, sizeof *rpc);
	const struct api_method methods[] = {
		{ "/kpl.v1.Pipelines/SubmitRun", API_UNARY,
		  &kpl__v1__submit_run_request__descriptor, h_submit, rpc,
		  API_SCOPE_SUBMIT, API_BIND_TEXT },
		{ "/kpl.v1.Pipelines/GetRun", API_UNARY,
		  &kpl__v1__get_run_request__descriptor, h_get, rpc,
		  API_SCOPE_READ, API_BIND_RUN },
		{ "/kpl.v1.Pipelines/ListRuns", API_UNARY,
		  &kpl__v1__list_runs_request__descriptor, h_list, rpc,
		  API_SCOPE_READ, API_BIND_FILTER },
		{ "/kpl.v1.Pipelines/WatchRun", API_SERVER_STREAM,
		  &kpl__v1__watch_run_request__descriptor, h_watch, rpc,
		  API_SCOPE_READ, API_BIND_RUN },
		{ "/kpl.v1.Pipelines/CancelRun", API_UNARY,
		  &kpl__v1__cancel_run_request__descriptor, h_cancel, rpc,
		  API_SCOPE_SUBMIT, API_BIND_RUN },
		{ "/kpl.v1.Pipelines/ValidatePipeline", API_UNARY,
		  &kpl__v1__validate_pipeline_request__descriptor, h_validate, rpc,
		  API_SCOPE_READ, API_BIND_TEXT },
		{ "/kpl.v1.Pipelines/ApproveStage", API_UNARY,
		  &kpl__v1__approve_stage_request__descriptor, h_approve, rpc,
		  API_SCOPE_APPROVE, API_BIND_RUN },
		{ "/kpl.v1.Pipelines/RetryRun", API_UNARY,
		  &kpl__v1__retry_run_request__descriptor, h_retry, rpc,
		  API_SCOPE_SUBMIT, API_BIND_RUN },
		{ "/kpl.v1.Pipelines/WatchRuns", API_SERVER_STREAM,
		  &kpl__v1__watch_runs_request__descriptor, h_watch_all, rpc,
		  API_SCOPE_READ, API_BIND_FILTER },
		{ "/kpl.v1.Pipelines/SetSecret", API_UNARY,
		  &kpl__v1__set_secret_request__descriptor, h_secret_set, rpc,
		  API_SCOPE_ADMIN },
		{ "/kpl.v1.Pipelines/ListSecrets", API_UNARY,
		  &kpl__v1__list_secrets_request__descriptor, h_secret_list, rpc,
		  API_SCOPE_ADMIN },
		{ "/kpl.v1.Pipelines/DeleteSecret", API_UNARY,
		  &kpl__v1__delete_secret_request__descriptor, h_secret_delete, rpc,
		  API_SCOPE_ADMIN },
		{ "/kpl.v1.Pipelines/ListReleases", API_UNARY,
		  &kpl__v1__list_releases_request__descriptor, h_releases, rpc,
		  API_SCOPE_READ },
		{ "/kpl.v1.Pipelines/RollbackRelease", API_UNARY,
		  &kpl__v1__rollback_release_request__descriptor, h_rollback, rpc,
		  API_SCOPE_APPROVE },
		{ "/kpl.v1.Pipelines/RunPipeline", API_UNARY,
		  &kpl__v1__run_pipeline_request__descriptor, h_run_pipeline, rpc,
		  API_SCOPE_SUBMIT, API_BIND_NAME },
		{ "/kpl.v1.Pipelines/GetRunPipeline", API_UNARY,
		  &kpl__v1__get_run_pipeline_request__descriptor, h_run_text, rpc,
		  API_SCOPE_READ, API_BIND_RUN },
	};

	rpc->eng = e;
	rpc->store = engine_store(e);
	memcpy(rpc->methods, methods, sizeof methods);
	return rpc;
}

void rpc_set_hooks(struct rpc *rpc, struct hooks *h)
{
	rpc->hooks = h;
}

const struct api_method *rpc_methods(struct rpc *rpc, size_t *n)
{
	*n = KPL_ARRAY_SIZE(rpc->methods);
	return rpc->methods;
}

static void idle_closed(uv_handle_t *h)
{
	free(h);
}

void rpc_free(struct rpc *rpc)
{
	if (rpc->watches || rpc->groups)
		BUG("rpc_free with open watches");
	if (rpc->idle)
		uv_close((uv_handle_t *)rpc->idle, idle_closed);
	free(rpc);
}
