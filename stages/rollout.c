/*
 * rollout.c - change a Deployment durably once, then follow its rollout
 * (see rollout.h).
 */
#include <stdlib.h>
#include <string.h>

#include "stages/rollout.h"
#include "store/store.h"

#define LOG "rollout"

enum rollout_step {
	STEP_GET,
	STEP_LIST_RS,
	STEP_RECORDING,
	STEP_SEND,
	STEP_AFTER,
	STEP_FOLLOW,
	STEP_LAST_
};

struct rollout {
	struct stage *st;       /* NULL once ended or abandoned */
	const struct rollout_ops *ops;
	void *impl;
	struct kube_config cfg;
	char *cluster, *ns, *name, *target;
	enum rollout_step step;
	struct http_request *req; /* in flight */
	struct kube_watch *watch;
	int waiting_commit;
	int in_after;
	struct kube_status not_found; /* the GET's 404 */             /* ops->after_change has not called back */
	int conflicts;
	json_t *deployment;       /* the last GET */
	struct rollout_plan plan;
	int have_plan;
	char *intent_prev;        /* previous_template of the intent recorded */
	char *last_msg;           /* last rollout status logged */
	int sent;                 /* this attempt sent its change */
};

static void rollout_free(struct rollout *r)
{
	if (r->st || r->req || r->waiting_commit || r->in_after)
		return;
	if (r->ops->free_impl && r->impl)
		r->ops->free_impl(r->impl);
	kube_config_release(&r->cfg);
	free(r->cluster);
	free(r->ns);
	free(r->name);
	free(r->target);
	json_decref(r->deployment);
	free(r->plan.body);
	free(r->plan.image);
	free(r->plan.previous_revision);
	free(r->plan.previous_image);
	free(r->plan.previous_template);
	free(r->intent_prev);
	free(r->last_msg);
	free(r);
}

/* Ends the attempt (once): stops what runs and reports. */
static void finish(struct rollout *r, Kpl__V1__StageState state, const char *msg)
{
	struct stage *st = r->st;
	char *red1, *red2;

	if (!st)
		return;
	r->st = NULL;
	if (r->watch) {
		kube_watch_stop(r->watch);
		r->watch = NULL;
	}
	if (r->req)
		http_request_cancel(r->req);
	red1 = kube_redact(&r->cfg, msg ? msg : "");
	red2 = stage_redact(st, red1);
	stage_done(st, state, msg ? red2 : NULL);
	free(red1);
	free(red2);
	rollout_free(r);
}

static void fail_status(struct rollout *r, const char *what, int status,
			const struct kube_status *ks)
{
	char text[600], *msg;

	if (ks)
		kube_status_text(ks, text, sizeof text);
	else
		snprintf(text, sizeof text, "%s", kpl_strerror(status));
	msg = kpl_asprintf("%s: %s", what, text);
	finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
	free(msg);
}

/* A callback of a request that outlived its attempt: only free. */
static int gone(struct rollout *r)
{
	if (r->st)
		return 0;
	rollout_free(r);
	return 1;
}

char *rollout_template_text(const json_t *tmpl)
{
	json_t *t = json_deep_copy(tmpl);
	json_t *labels = json_object_get(json_object_get(t, "metadata"), "labels");
	char *s;

	if (labels)
		json_object_del(labels, "pod-template-hash");
	s = json_dumps(t, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(t);
	return s ? s : kpl_strdup("");
}

int rollout_restore_patch(const json_t *d, const char *tmpl_text, const char *what,
			  char **body, struct kpl_err *err)
{
	char *cur = rollout_template_text(json_object_get(json_object_get(d, "spec"), "template"));
	json_t *tmpl, *patch;
	const char *rv;
	int same = strcmp(cur, tmpl_text) == 0;

	free(cur);
	*body = NULL;
	if (same)
		return 1;
	if (!(tmpl = json_loads(tmpl_text, 0, NULL)))
		return kpl_errf(err, KPL_ECORRUPT, "the recorded template of %s is not JSON", what);
	rv = json_string_value(json_object_get(json_object_get(d, "metadata"), "resourceVersion"));
	patch = json_pack("[{s:s, s:s, s:s}, {s:s, s:s, s:o}]",
			  "op", "replace", "path", "/metadata/resourceVersion", "value", rv ? rv : "",
			  "op", "replace", "path", "/spec/template", "value", tmpl);
	if (!rv)
		json_array_remove(patch, 0);
	*body = json_dumps(patch, JSON_COMPACT);
	json_decref(patch);
	return 0;
}

static const char *container_of(struct rollout *r, const json_t *tmpl)
{
	const char *c = r->ops->container ? r->ops->container(r) : NULL;

	if (c)
		return c;
	return json_string_value(json_object_get(
		json_array_get(json_object_get(json_object_get(tmpl, "spec"), "containers"), 0),
		"name"));
}

static void step_get(struct rollout *r);
static void step_follow(struct rollout *r);

/* ---------------------------------------------------------------------- */
/* Following */

static int on_event(struct kube_watch *w, const char *type, json_t *obj, void *data)
{
	struct rollout *r = data;
	char msg[512];
	enum kube_rollout ro;

	(void)w;
	if (!r->st)
		return 1;
	if (strcmp(type, "DELETED") == 0) {
		snprintf(msg, sizeof msg, "deployment \"%s\": object has been deleted", r->name);
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return 1;
	}
	ro = kube_rollout_status(obj, msg, sizeof msg);
	if (!r->last_msg || strcmp(r->last_msg, msg) != 0) {
		free(r->last_msg);
		r->last_msg = kpl_strdup(msg);
		stage_logf(r->st, "%s", msg);
	}
	if (ro == KUBE_ROLLOUT_FAILED) {
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return 1;
	}
	if (ro == KUBE_ROLLOUT_DONE) {
		Kpl__Store__V1__ReleaseRecord rec = KPL__STORE__V1__RELEASE_RECORD__INIT;
		const json_t *tmpl = json_object_get(json_object_get(obj, "spec"), "template");
		const char *cont = container_of(r, tmpl);
		const char *img = cont ? kube_template_image(tmpl, cont) : NULL;
		char *t = rollout_template_text(tmpl);

		rec.target = r->target;
		rec.kind = (char *)r->ops->kind;
		rec.revision = (char *)kube_revision(obj);
		rec.image = (char *)(img ? img : "");
		rec.template_ = t;
		rec.previous_revision = r->plan.previous_revision ? r->plan.previous_revision : "";
		rec.previous_image = r->plan.previous_image ? r->plan.previous_image : "";
		rec.previous_template = r->plan.previous_template ? r->plan.previous_template : "";
		stage_record_release(r->st, &rec);
		stage_set_output(r->st, "revision", rec.revision);
		stage_set_output(r->st, "image", rec.image);
		free(t);
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, msg);
		return 1;
	}
	return 0;
}

static void on_watch_error(struct kube_watch *w, int status, const struct kube_status *st,
			   void *data)
{
	struct rollout *r = data;
	char what[300];

	(void)w;
	snprintf(what, sizeof what, "watch deployment %s/%s", r->ns, r->name);
	fail_status(r, what, status, st);
}

static void step_follow(struct rollout *r)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(r->ns, NULL);
	char *sel = kpl_asprintf("metadata.name=%s", r->name);

	r->step = STEP_FOLLOW;
	if (kube_watch_start(stage_loop(r->st), stage_http(r->st), &r->cfg, path, sel, on_event,
			     on_watch_error, r, &r->watch, &err))
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
	free(path);
	free(sel);
}

void rollout_step_done(struct rollout *r, int status, const char *msg)
{
	r->in_after = 0;
	if (gone(r))
		return;
	if (status) {
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg ? msg : kpl_strerror(status));
		return;
	}
	step_follow(r);
}

/* ---------------------------------------------------------------------- */
/* Changing */

static void after_send(struct rollout *r)
{
	r->sent = 1;
	if (r->ops->after_change) {
		r->step = STEP_AFTER;
		r->in_after = 1;
		r->ops->after_change(r);
	} else {
		step_follow(r);
	}
}

static void send_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct rollout *r = data;
	char what[300];

	(void)obj;
	r->req = NULL;
	if (gone(r))
		return;
	snprintf(what, sizeof what, "%s deployment %s/%s",
		 r->plan.action == ROLLOUT_CREATE ? "create" : "patch", r->ns, r->name);
	if (status) {
		fail_status(r, what, status, st);
		return;
	}
	if (st && st->code == 409 && r->conflicts < ROLLOUT_MAX_CONFLICTS) {
		r->conflicts++;
		stage_logf(r->st, "%s: %s: %s; reading it again (%d of %d)", what, st->reason,
			   st->message, r->conflicts, ROLLOUT_MAX_CONFLICTS);
		step_get(r);
		return;
	}
	if (st) {
		fail_status(r, what, 0, st);
		return;
	}
	stage_logf(r->st, "%s: %s %s", what,
		   r->plan.action == ROLLOUT_CREATE ? "created with" : "patched to",
		   r->plan.image ? r->plan.image : "the recorded template");
	after_send(r);
}

static void step_send(struct rollout *r)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(r->ns, r->plan.action == ROLLOUT_CREATE ? NULL : r->name);
	int rc;

	r->step = STEP_SEND;
	if (r->plan.action == ROLLOUT_CREATE)
		rc = kube_request(stage_http(r->st), &r->cfg, "POST", path, NULL, r->plan.body,
				  send_done, r, &r->req, &err);
	else
		rc = kube_request(stage_http(r->st), &r->cfg, "PATCH", path,
				  kube_patch_content_type(r->plan.patch), r->plan.body, send_done,
				  r, &r->req, &err);
	free(path);
	if (rc)
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
}

static void recorded(struct stage *st, int status, void *data)
{
	struct rollout *r = data;

	(void)st;
	r->waiting_commit = 0;
	if (gone(r))
		return;
	if (status) {
		char *m = kpl_asprintf("cannot record the release before changing deployment "
				       "%s/%s: %s", r->ns, r->name, kpl_strerror(status));
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
		free(m);
		return;
	}
	step_send(r);
}

/* The intent record, then the resume data, and the send once both are
 * durable. */
static void step_record(struct rollout *r)
{
	const char *prev = r->plan.previous_template ? r->plan.previous_template : "";

	r->step = STEP_RECORDING;
	if (!r->intent_prev || strcmp(r->intent_prev, prev) != 0) {
		Kpl__Store__V1__ReleaseRecord rec = KPL__STORE__V1__RELEASE_RECORD__INIT;

		rec.target = r->target;
		rec.kind = (char *)r->ops->kind;
		rec.revision = "";
		rec.image = r->plan.image ? r->plan.image : "";
		rec.previous_revision = r->plan.previous_revision ? r->plan.previous_revision : "";
		rec.previous_image = r->plan.previous_image ? r->plan.previous_image : "";
		rec.previous_template = (char *)prev;
		rec.template_ = "";
		stage_record_release(r->st, &rec);
		free(r->intent_prev);
		r->intent_prev = kpl_strdup(prev);
	}
	r->waiting_commit = 1;
	stage_record_resume(r->st, 0, 0, "{\"v\":1,\"changing\":true}", recorded, r);
}

/* This stage's own intent record, when an earlier attempt (or the kpld
 * before a restart) made the change plan now finds in place. */
static void adopt_own_intent(struct rollout *r)
{
	Kpl__Store__V1__ReleaseRecord **recs = NULL;
	size_t n = 0;

	if (stage_releases(r->st, r->target, &recs, &n) != 0)
		return;
	for (size_t i = 0; i < n; i++) {
		Kpl__Store__V1__ReleaseRecord *rec = recs[i];
		if (strcmp(rec->kind, r->ops->kind) != 0)
			continue;
		if (strcmp(rec->run_id, stage_run_id(r->st)) == 0 &&
		    strcmp(rec->stage, stage_name(r->st)) == 0 && !*rec->revision) {
			free(r->plan.previous_revision);
			free(r->plan.previous_image);
			free(r->plan.previous_template);
			r->plan.previous_revision = kpl_strdup(rec->previous_revision);
			r->plan.previous_image = kpl_strdup(rec->previous_image);
			r->plan.previous_template = kpl_strdup(rec->previous_template);
		}
		break; /* only the newest record of the kind can be ours */
	}
	store_free_releases(recs, n);
}

static void decide(struct rollout *r, const json_t *rs)
{
	const json_t *d = r->deployment;
	const json_t *tmpl = json_object_get(json_object_get(d, "spec"), "template");
	struct kpl_err err = { 0 };
	const char *cont, *img;

	free(r->plan.body);
	free(r->plan.image);
	free(r->plan.previous_revision);
	free(r->plan.previous_image);
	free(r->plan.previous_template);
	memset(&r->plan, 0, sizeof r->plan);
	if (d) {
		const char *rev = rs ? kube_revision(rs) : "";
		r->plan.previous_revision = kpl_strdup(*rev ? rev : kube_revision(d));
		cont = container_of(r, tmpl);
		img = cont ? kube_template_image(tmpl, cont) : NULL;
		r->plan.previous_image = kpl_strdup(img ? img : "");
		r->plan.previous_template = rollout_template_text(tmpl);
	}
	if (r->ops->plan(r, d, rs, &r->plan, &err)) {
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
		return;
	}
	if (r->plan.action == ROLLOUT_FOLLOW) {
		if (!r->sent)
			adopt_own_intent(r);
		if (r->sent || r->ops->after_change == NULL)
			step_follow(r);
		else
			after_send(r);
		return;
	}
	step_record(r);
}

static void rs_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct rollout *r = data;
	char what[300];

	r->req = NULL;
	if (gone(r))
		return;
	if (status || st) {
		snprintf(what, sizeof what, "list replicasets of deployment %s/%s", r->ns, r->name);
		fail_status(r, what, status, st);
		return;
	}
	decide(r, kube_current_replicaset(r->deployment, obj));
}

static void get_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct rollout *r = data;
	struct kpl_err err = { 0 };
	char what[300], *sel, *path, *esel;

	r->req = NULL;
	if (gone(r))
		return;
	snprintf(what, sizeof what, "get deployment %s/%s", r->ns, r->name);
	json_decref(r->deployment);
	r->deployment = NULL;
	if (st && st->code == 404 && strcmp(st->reason, "NotFound") == 0) {
		r->not_found = *st;
		decide(r, NULL); /* plan says whether it may create it */
		return;
	}
	if (status || st) {
		fail_status(r, what, status, st);
		return;
	}
	r->deployment = json_incref(obj);
	r->step = STEP_LIST_RS;
	if (!(sel = kube_label_selector(obj))) {
		decide(r, NULL);
		return;
	}
	esel = kube_escape(sel);
	{
		char *rsp = kube_replicasets_path(r->ns);
		path = kpl_asprintf("%s?labelSelector=%s", rsp, esel);
		free(rsp);
	}
	if (kube_request(stage_http(r->st), &r->cfg, "GET", path, NULL, NULL, rs_done, r,
			 &r->req, &err))
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
	free(sel);
	free(esel);
	free(path);
}

static void step_get(struct rollout *r)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(r->ns, r->name);

	r->step = STEP_GET;
	if (kube_request(stage_http(r->st), &r->cfg, "GET", path, NULL, NULL, get_done, r,
			 &r->req, &err))
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, err.msg);
	free(path);
}

/* ---------------------------------------------------------------------- */
/* The attempt */

int rollout_start(struct stage *st, const struct rollout_ops *ops, const char *ns,
		  const char *deployment, void *impl, int resumed, struct kpl_err *err)
{
	struct stage_endpoint ep;
	struct rollout *r;
	int rc;

	if ((rc = stage_endpoint(st, CFG_KUBERNETES, "cluster", &ep, err)) != 0)
		return rc;
	r = kpl_calloc(1, sizeof *r);
	r->ops = ops;
	rc = kube_config_from_endpoint(ep.ep, ep.token, &r->cfg, err);
	r->cluster = kpl_strdup(ep.ep->name);
	stage_endpoint_release(&ep);
	if (rc) {
		rollout_free(r); /* impl is not ours yet: the caller frees it */
		return rc;
	}
	r->impl = impl;
	r->ns = kpl_strdup(ns && *ns ? ns : r->cfg.namespace ? r->cfg.namespace : "default");
	r->name = kpl_strdup(deployment);
	r->target = kpl_asprintf("%s/%s/%s", r->cluster, r->ns, r->name);
	if (strlen(r->target) > STORE_MAX_RELEASE_TARGET) {
		/* Its release records could not be keyed (Kubernetes names are
		 * shorter: a template made this). */
		rc = kpl_errf(err, KPL_EINVAL, "%.80s...: cluster/namespace/deployment is %zu "
			      "bytes, over %d", r->target, strlen(r->target),
			      STORE_MAX_RELEASE_TARGET);
		r->impl = NULL; /* the caller frees it on an error */
		rollout_free(r);
		return rc;
	}
	r->st = st;
	stage_set_impl(st, r);
	if (resumed)
		kpl_info(LOG, "run %s stage %s: following deployment %s again after a restart",
			 stage_run_id(st), stage_name(st), r->target);
	step_get(r);
	return 0;
}

void rollout_cancel(struct stage *st)
{
	struct rollout *r = stage_impl(st);

	if (r)
		finish(r, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED,
		       "cancelled (a rollout already started goes on in the cluster)");
}

void rollout_abandon(struct stage *st)
{
	struct rollout *r = stage_impl(st);

	if (!r || !r->st)
		return;
	r->st = NULL;
	if (r->watch) {
		kube_watch_stop(r->watch);
		r->watch = NULL;
	}
	if (r->req)
		http_request_cancel(r->req);
	rollout_free(r);
}

void *rollout_impl(struct rollout *r) { return r->impl; }
struct stage *rollout_stage(struct rollout *r) { return r->st; }
const char *rollout_target(struct rollout *r) { return r->target; }
const char *rollout_namespace(struct rollout *r) { return r->ns; }
const char *rollout_deployment(struct rollout *r) { return r->name; }
struct kube_config *rollout_config(struct rollout *r) { return &r->cfg; }

const char *rollout_not_found(struct rollout *r, char *buf, size_t n)
{
	char t[600];

	snprintf(buf, n, "get deployment %s/%s: %s", r->ns, r->name,
		 kube_status_text(&r->not_found, t, sizeof t));
	return buf;
}
