/*
 * rpc_hooks.c - registered pipelines: thin handlers over the store's
 * pipelines_registered db; engine/hooks.c checks a registration and acts on
 * deliveries. Changes are audited and answered once durable.
 */
#include "api/rpc_hooks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/kpl.pb-c.h"
#include "engine/hooks.h"
#include "engine/sched.h"
#include "google/protobuf/timestamp.pb-c.h"

#define LOG "rpc"

/* grpc_status_code values used here. */
enum {
	ST_CANCELLED = 1,
	ST_INVALID_ARGUMENT = 3,
	ST_NOT_FOUND = 5,
	ST_INTERNAL = 13,
};

struct rpc_hooks {
	struct engine *eng;
	void (*on_change)(void *data); /* rpc_hooks_on_change */
	void *on_change_data;
	struct api_method methods[3];
};

/* A change waiting for its commit; resp is packed at once (the request it
 * points into ends with the call). */
struct change {
	struct rpc_hooks *rh;
	struct api_call *call;
	uint8_t *resp;
	size_t resp_len;
};

static void change_cancelled(struct api_call *call, void *data)
{
	struct change *c = data;

	c->call = NULL;
	api_call_fail(call, ST_CANCELLED, "the call was cancelled; the change may still be made");
}

static void change_committed(void *data, int status)
{
	struct change *c = data;
	Kpl__V1__RegisteredPipeline *resp;

	if (!status && c->rh->on_change)
		c->rh->on_change(c->rh->on_change_data);
	if (c->call) {
		resp = kpl__v1__registered_pipeline__unpack(NULL, c->resp_len, c->resp);
		if (status || !resp)
			api_call_fail(c->call, ST_INTERNAL, "the change could not be stored");
		else
			api_call_reply(c->call, &resp->base);
		if (resp)
			kpl__v1__registered_pipeline__free_unpacked(resp, NULL);
	}
	free(c->resp);
	free(c);
}

static void change_commit(struct rpc_hooks *rh, struct api_call *call,
			  const Kpl__V1__RegisteredPipeline *rec, const char *what)
{
	struct change *c = kpl_calloc(1, sizeof *c);
	struct kpl_err err = { 0 };
	char msg[600];

	c->rh = rh;
	c->call = call;
	c->resp_len = kpl__v1__registered_pipeline__get_packed_size(rec);
	c->resp = kpl_malloc(c->resp_len ? c->resp_len : 1);
	kpl__v1__registered_pipeline__pack(rec, c->resp);
	snprintf(msg, sizeof msg, "%s %s", api_call_who(call), what);
	engine_audit(rh->eng, NULL, NULL, msg, &err);
	api_call_on_cancel(call, change_cancelled, c);
	store_commit(engine_store(rh->eng), change_committed, c);
}

static void h_register(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__RegisterPipelineRequest *req = (const void *)m;
	struct rpc_hooks *rh = data;
	Kpl__V1__RegisteredPipeline rec;
	Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	char *branches[HOOKS_MAX_BRANCHES];
	Kpl__V1__Schedule sched_buf[SCHED_MAX], *sched_ptrs[SCHED_MAX];
	struct kpl_err err = { 0 };
	int64_t now = kpl_now_ms();
	char what[400];

	if (hooks_check_registration(req, engine_secrets(rh->eng), &rec, branches, &err) ||
	    sched_check_registration(req, &rec, sched_buf, sched_ptrs, NULL, &err) ||
	    store_room_err(engine_store(rh->eng), 16 * 1024, &err)) {
		api_call_fail_err(call, &err);
		return;
	}
	ts.seconds = now / 1000;
	ts.nanos = (int32_t)(now % 1000) * 1000000;
	rec.created_at = &ts;
	rec.created_by = (char *)api_call_who(call);
	store_stage_registered(engine_store(rh->eng), rec.name, &rec);
	kpl_info(LOG, "pipeline %s registered (%s, %zu branch patterns, %zu schedules, %s)",
		 rec.name, rec.path, rec.n_branches, rec.n_schedules, rec.secret);
	/* The repo URL may hold a user:password: the audit names it not. */
	snprintf(what, sizeof what, "registered pipeline %s (file %s, secret %s)", rec.name,
		 rec.path, rec.secret);
	change_commit(rh, call, &rec, what);
}

static void h_delete(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__DeletePipelineRequest *req = (const void *)m;
	struct rpc_hooks *rh = data;
	Kpl__V1__RegisteredPipeline *rec = NULL;
	char what[300], msg[300];
	int rc;

	if (!req->name || !*req->name || strlen(req->name) > KPL_MAX_NAME_LEN) {
		api_call_fail(call, ST_INVALID_ARGUMENT, "name: required, at most 128 characters");
		return;
	}
	rc = store_get_registered(engine_store(rh->eng), req->name, &rec);
	if (rc == KPL_ENOTFOUND) {
		snprintf(msg, sizeof msg, "no registered pipeline %s", req->name);
		api_call_fail(call, ST_NOT_FOUND, msg);
		return;
	}
	if (rc) {
		snprintf(msg, sizeof msg, "cannot read pipeline %s: %s", req->name,
			 kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
		return;
	}
	store_stage_registered(engine_store(rh->eng), req->name, NULL);
	kpl_info(LOG, "pipeline %s unregistered", req->name);
	snprintf(what, sizeof what, "deleted registered pipeline %s", req->name);
	change_commit(rh, call, rec, what);
	kpl__v1__registered_pipeline__free_unpacked(rec, NULL);
}

struct list {
	Kpl__V1__RegisteredPipeline **v;
	size_t n, cap;
};

static int list_one(void *data, const Kpl__V1__RegisteredPipeline *rec)
{
	struct list *l = data;
	size_t len = kpl__v1__registered_pipeline__get_packed_size(rec);
	uint8_t *buf = kpl_malloc(len ? len : 1);

	kpl__v1__registered_pipeline__pack(rec, buf);
	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 16;
		l->v = kpl_realloc(l->v, l->cap * sizeof *l->v);
	}
	l->v[l->n] = kpl__v1__registered_pipeline__unpack(NULL, len, buf);
	free(buf);
	if (!l->v[l->n])
		return KPL_ECORRUPT;
	l->n++;
	return 0;
}

static void h_list(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	struct rpc_hooks *rh = data;
	Kpl__V1__ListPipelinesResponse resp = KPL__V1__LIST_PIPELINES_RESPONSE__INIT;
	struct list l = { 0 };
	char msg[200];
	int rc;

	(void)m;
	rc = store_list_registered(engine_store(rh->eng), list_one, &l);
	if (rc) {
		snprintf(msg, sizeof msg, "cannot read the registered pipelines: %s",
			 kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
	} else {
		/* A registration stored before tokens in URLs were refused
		 * shows without one. */
		for (size_t i = 0; i < l.n; i++) {
			char shown[HOOKS_MAX_URL + 8];

			sched_annotate(engine_store(rh->eng), l.v[i], NULL);
			if (!l.v[i]->repo || !hooks_repo_url_problem(l.v[i]->repo))
				continue;
			hooks_url_for_display(l.v[i]->repo, shown, sizeof shown);
			free(l.v[i]->repo);
			l.v[i]->repo = kpl_strdup(shown);
		}
		resp.n_pipelines = l.n;
		resp.pipelines = l.v;
		api_call_reply(call, &resp.base);
	}
	for (size_t i = 0; i < l.n; i++)
		kpl__v1__registered_pipeline__free_unpacked(l.v[i], NULL);
	free(l.v);
}

struct rpc_hooks *rpc_hooks_new(struct engine *e)
{
	struct rpc_hooks *rh = kpl_calloc(1, sizeof *rh);
	const struct api_method methods[] = {
		{ "/kpl.v1.Pipelines/RegisterPipeline", API_UNARY,
		  &kpl__v1__register_pipeline_request__descriptor, h_register, rh,
		  API_SCOPE_ADMIN },
		{ "/kpl.v1.Pipelines/ListPipelines", API_UNARY,
		  &kpl__v1__list_pipelines_request__descriptor, h_list, rh, API_SCOPE_READ },
		{ "/kpl.v1.Pipelines/DeletePipeline", API_UNARY,
		  &kpl__v1__delete_pipeline_request__descriptor, h_delete, rh,
		  API_SCOPE_ADMIN },
	};

	rh->eng = e;
	memcpy(rh->methods, methods, sizeof methods);
	return rh;
}

const struct api_method *rpc_hooks_methods(struct rpc_hooks *rh, size_t *n)
{
	*n = KPL_ARRAY_SIZE(rh->methods);
	return rh->methods;
}

void rpc_hooks_free(struct rpc_hooks *rh)
{
	free(rh);
}

void rpc_hooks_on_change(struct rpc_hooks *rh, void (*fn)(void *data), void *data)
{
	rh->on_change = fn;
	rh->on_change_data = data;
}
