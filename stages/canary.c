/*
 * canary.c - the `canary` stage kind: a canary Deployment beside the stable
 * one, Istio VirtualService weights moved step by step, analyses between
 * the steps, then promotion, or an automatic abort.
 *
 *   with:
 *     cluster: prod            # a `kubernetes:` endpoint of the daemon config
 *     namespace: shop          # default: the context's namespace, else "default"
 *     deployment: web          # the stable Deployment
 *     container: web           # default: the only container
 *     image: reg/web:2.0       # the new version
 *     replicas: 1              # of the canary Deployment (default 1)
 *     service: web             # the VirtualService and DestinationRule names
 *                              # (the mesh kind's; default: deployment)
 *     version_label: version   # the pod label subsets select by (default version)
 *     version: canary          # its value on canary pods, and ${{ canary.version }}
 *                              # in verify steps (default canary)
 *     prometheus: main         # for verify steps with queries
 *     header_route: { header: x-canary, value: "true" }   # optional, for testers
 *     on_failure: abort        # abort (default) | freeze
 *     steps:
 *       - weight: 10           # percent of the primary route to the canary
 *       - pause: 2m
 *       - verify: { interval: 30s, count: 5, failure_limit: 1, queries: [...] }
 *       - weight: 100
 *
 * What it does (istio.h has the objects' shapes):
 *   1. prepare: read the stable Deployment (its version label, which must
 *      differ from the canary's: the mesh kind sets it); add the canary subset
 *      to the DestinationRule; set the VirtualService's primary route to
 *      100/0 (and the header route, if any); create (or replace) the
 *      Deployment NAME-canary cloned from the stable one with the new image
 *      and version label; follow its rollout with kubectl's rules;
 *   2. the steps, in order: weight (a PUT of the VirtualService, skipped if
 *      it already says so), pause (a timer), verify (verify.h's analysis,
 *      with ${{ canary.version }} = version);
 *   3. promote: the stable Deployment takes the image (strategic merge patch
 *      with the resourceVersion read; 409 reads again), its rollout is
 *      followed; then weights back to 100/0 (header route removed) and the
 *      canary Deployment deleted. A promotion that fails before its rollout
 *      is done (the patch refused, the progress deadline passed, an API
 *      error) is undone: stable's replaced template put back with
 *      rollback's patch (rollout.h) and its rollout followed, then weights
 *      to 100/0 and the canary deleted; the stage FAILS ("promotion failed:
 *      deployment "web" exceeded its progress deadline; stable restored to
 *      revision 3, canary removed"). Under on_failure: freeze nothing is
 *      undone.
 * A failure in 1 or 2 (a verify that fails, a canary that never becomes
 * ready, an API error) aborts: weights back to 100/0, header route removed,
 * canary deleted, and the stage FAILS with the reason ("canary aborted:
 * verify failed: request-success-rate = 69.8, below min 99 ..."). With
 * on_failure: freeze (for releases that cannot be undone) a failure during
 * the steps holds the weights where they are and the stage WAITS: approve
 * (ApproveStage) promotes, reject aborts. Cancel aborts too and ends
 * CANCELLED. An aborted or promoted canary leaves no analysis running: a
 * verify step is cancelled before anything else happens.
 *
 * Durability: the phase, the step index and what the step needs to carry
 * on (a pause's deadline, an analysis's progress) are recorded with
 * stage_record_resume BEFORE the step acts, and an analysis's progress after
 * each round. After a restart the stage continues at the recorded step: a
 * weight step reads the VirtualService and writes only if it differs, a
 * pause waits what is left of it, a verify carries on from its last round,
 * earlier steps are not applied again. A frozen canary waits again. An
 * abort, or the undo of a promotion, is done again (each of its writes is
 * made only if still needed).
 *
 * Release history: before the stable Deployment is patched, an intent
 * record of kind "canary" (revision "", the replaced template, recorded
 * with the phase), and once its rollout is done the result record
 * (rollout.h's scheme); rollback uses them like deploy's. Outputs: revision
 * and image (of the stable Deployment once promoted), weight (the canary's
 * share the last weight step set).
 *
 * Threads: loop thread only.
 */
#include <stdlib.h>
#include <string.h>

#include "stages/istio.h"
#include "stages/kinds.h"
#include "stages/rollout.h"
#include "stages/verify.h"
#include "store/store.h"

#define LOG "canary"

enum step_kind { CSTEP_WEIGHT, CSTEP_PAUSE, CSTEP_VERIFY };

struct cstep {
	enum step_kind kind;
	int weight;
	int64_t pause_ms;
	const struct pl_node *verify; /* borrowed from the spec */
};

enum phase { PH_PREPARE, PH_STEPS, PH_FROZEN, PH_PROMOTE, PH_ABORT, PH_UNDO, PH_LAST_ };
static const char *const phase_names[PH_LAST_] = { "prepare", "steps", "frozen", "promote",
						   "abort", "undo" };

struct canary {
	struct stage *st; /* NULL once ended or abandoned */
	uv_timer_t timer;
	struct kube_config cfg;
	char *cluster, *ns, *name, *canary_name, *service, *label, *version, *container;
	char *image, *target, *header, *header_value;
	long replicas;
	int freeze;
	struct cstep *steps;
	size_t n_steps;

	/* What is recorded (resume data). */
	enum phase phase;
	size_t step;
	int weight;
	int64_t pause_until;
	char *reason;     /* why it aborts or froze */
	int cancelled;    /* the abort ends CANCELLED */
	char *vprogress;  /* the running analysis's progress (verify.h text) */
	char *prev_revision, *prev_image, *prev_template; /* the promote's intent */
	int restored;     /* the undo patched stable's template back (or was about to) */

	/* In flight. */
	struct http_request *req;
	struct kube_watch *watch;
	struct verify_run *verify;
	int timer_on;
	int waiting_commit;
	void (*then)(struct canary *c); /* after the record commits */
	int conflicts;
	char *stable_version;
	char *last_msg;
	json_t *stable;   /* the stable Deployment as last read (promote) */
	int closing;
};

static void canary_closed(uv_handle_t *h)
{
	struct canary *c = h->data;

	kube_config_release(&c->cfg);
	free(c->cluster);
	free(c->ns);
	free(c->name);
	free(c->canary_name);
	free(c->service);
	free(c->label);
	free(c->version);
	free(c->container);
	free(c->image);
	free(c->target);
	free(c->header);
	free(c->header_value);
	free(c->steps);
	free(c->reason);
	free(c->vprogress);
	free(c->prev_revision);
	free(c->prev_image);
	free(c->prev_template);
	free(c->stable_version);
	free(c->last_msg);
	json_decref(c->stable);
	free(c);
}

/* Frees c once nothing can call back into it. */
static void maybe_free(struct canary *c)
{
	if (c->st || c->req || c->waiting_commit || c->verify || c->closing)
		return;
	c->closing = 1;
	if (c->timer_on)
		uv_timer_stop(&c->timer);
	uv_close((uv_handle_t *)&c->timer, canary_closed);
}

/* A callback that outlived its attempt: only free. */
static int gone(struct canary *c)
{
	if (c->st)
		return 0;
	maybe_free(c);
	return 1;
}

static void stop_watch(struct canary *c)
{
	if (c->watch) {
		kube_watch_stop(c->watch);
		c->watch = NULL;
	}
}

static void stop_timer(struct canary *c)
{
	if (c->timer_on) {
		uv_timer_stop(&c->timer);
		c->timer_on = 0;
	}
}

/* Ends the attempt (once). */
static void finish(struct canary *c, Kpl__V1__StageState state, const char *msg)
{
	struct stage *st = c->st;
	char *red1, *red2;

	if (!st)
		return;
	c->st = NULL;
	stop_watch(c);
	stop_timer(c);
	if (c->req)
		http_request_cancel(c->req);
	if (c->verify)
		BUG("canary %s: ending with an analysis running", c->target);
	red1 = kube_redact(&c->cfg, msg ? msg : "");
	red2 = stage_redact(st, red1);
	stage_set_impl(st, NULL);
	stage_done(st, state, red2);
	free(red1);
	free(red2);
	maybe_free(c);
}

static void set_weight_output(struct canary *c)
{
	char w[16];

	snprintf(w, sizeof w, "%d", c->weight);
	stage_set_output(c->st, "weight", w);
}

/* ---------------------------------------------------------------------- */
/* Resume data */

static char *resume_text(struct canary *c)
{
	json_t *j = json_pack("{s:i, s:s, s:I, s:i, s:I, s:b}", "v", 1, "phase",
			      phase_names[c->phase], "step", (json_int_t)c->step, "weight",
			      c->weight, "pause_until", (json_int_t)c->pause_until, "cancelled",
			      c->cancelled);
	char *s;

	if (c->reason)
		json_object_set_new(j, "reason", json_string(c->reason));
	if (c->vprogress)
		json_object_set_new(j, "verify", json_string(c->vprogress));
	if (c->restored)
		json_object_set_new(j, "restored", json_true());
	if (c->prev_template)
		json_object_set_new(j, "prev", json_pack("{s:s, s:s, s:s}", "revision",
							 c->prev_revision ? c->prev_revision : "",
							 "image", c->prev_image ? c->prev_image : "",
							 "template", c->prev_template));
	s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	return s;
}

static int resume_parse(struct canary *c, const char *text)
{
	json_t *j = text ? json_loads(text, 0, NULL) : NULL, *prev;
	const char *ph = json_string_value(json_object_get(j, "phase"));
	int p;

	for (p = 0; ph && p < PH_LAST_; p++)
		if (strcmp(ph, phase_names[p]) == 0)
			break;
	if (!ph || p == PH_LAST_) {
		json_decref(j);
		return KPL_EINVAL;
	}
	c->phase = (enum phase)p;
	c->step = (size_t)json_integer_value(json_object_get(j, "step"));
	c->weight = (int)json_integer_value(json_object_get(j, "weight"));
	c->pause_until = json_integer_value(json_object_get(j, "pause_until"));
	c->cancelled = json_is_true(json_object_get(j, "cancelled"));
	c->restored = json_is_true(json_object_get(j, "restored"));
	if (json_string_value(json_object_get(j, "reason")))
		c->reason = kpl_strdup(json_string_value(json_object_get(j, "reason")));
	if (json_string_value(json_object_get(j, "verify")))
		c->vprogress = kpl_strdup(json_string_value(json_object_get(j, "verify")));
	if ((prev = json_object_get(j, "prev"))) {
		c->prev_revision = kpl_strdup(json_string_value(json_object_get(prev, "revision")) ?: "");
		c->prev_image = kpl_strdup(json_string_value(json_object_get(prev, "image")) ?: "");
		c->prev_template = kpl_strdup(json_string_value(json_object_get(prev, "template")) ?: "");
	}
	json_decref(j);
	if (c->step > c->n_steps)
		return KPL_EINVAL;
	return 0;
}

static void recorded(struct stage *st, int status, void *data)
{
	struct canary *c = data;
	void (*then)(struct canary *) = c->then;

	(void)st;
	c->waiting_commit = 0;
	c->then = NULL;
	if (gone(c))
		return;
	if (status) {
		char *m = kpl_asprintf("cannot record the canary's %s before acting: %s",
				       phase_names[c->phase], kpl_strerror(status));
		finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
		free(m);
		return;
	}
	then(c);
}

/* Records where the canary is, durably, then calls then. */
static void record(struct canary *c, void (*then)(struct canary *))
{
	char *text = resume_text(c);

	c->then = then;
	c->waiting_commit = 1;
	stage_record_resume(c->st, 0, 0, text, recorded, c);
	free(text);
}

/* ---------------------------------------------------------------------- */
/* Failure: abort, or freeze */

static void remove_canary(struct canary *c);

/* The abort's end, the canary deleted (remove_canary). */
static void aborted(struct canary *c)
{
	char *m;

	if (c->cancelled)
		m = kpl_asprintf("cancelled: canary aborted (traffic back to 100%% stable, "
				 "deployment %s removed)", c->canary_name);
	else
		m = kpl_asprintf("canary aborted: %s (traffic back to 100%% stable, deployment %s "
				 "removed)", c->reason ? c->reason : "", c->canary_name);
	finish(c, c->cancelled ? KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED
			       : KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
	free(m);
}

static void abort_start(struct canary *c)
{
	stop_watch(c);
	stop_timer(c);
	c->phase = PH_ABORT;
	free(c->vprogress);
	c->vprogress = NULL;
	stage_logf(c->st, "aborting the canary: %s", c->reason ? c->reason : "cancelled");
	record(c, remove_canary);
}

static void frozen(struct canary *c)
{
	char *m;

	if (c->cancelled) { /* cancelled while the freeze was being recorded */
		abort_start(c);
		return;
	}
	m = kpl_asprintf("canary frozen at %d%% to %s: %s; approve to promote, reject to "
			       "abort", c->weight, c->canary_name, c->reason);

	stage_wait(c->st, m);
	free(m);
}

static void promote_failure(struct canary *c, const char *why);
static void undo_failed(struct canary *c, const char *msg);

/* Something went wrong: abort, or freeze during the steps if asked to; a
 * failed promotion is undone (promote_failure), and a failing undo stops. */
static void failure(struct canary *c, const char *why)
{
	if (c->phase == PH_PROMOTE) {
		promote_failure(c, why);
		return;
	}
	if (c->phase == PH_UNDO) {
		undo_failed(c, why);
		return;
	}
	stop_watch(c);
	stop_timer(c);
	free(c->reason);
	c->reason = kpl_strdup(why);
	if (c->freeze && c->phase == PH_STEPS && !c->cancelled) {
		c->phase = PH_FROZEN;
		free(c->vprogress);
		c->vprogress = NULL;
		stage_logf(c->st, "freezing the canary: %s", why);
		record(c, frozen);
		return;
	}
	abort_start(c);
}

/* At each step boundary: a cancel asked for aborts now. */
static int cancel_point(struct canary *c)
{
	if (!c->cancelled)
		return 0;
	abort_start(c);
	return 1;
}

/* ---------------------------------------------------------------------- */
/* Following a Deployment's rollout */

/* What a failed request or watch says: the API's Status, else the error. */
static void reply_text(int status, const struct kube_status *ks, char *text, size_t n)
{
	if (ks)
		kube_status_text(ks, text, n);
	else
		snprintf(text, n, "%s", kpl_strerror(status));
}

static int follow(struct canary *c, const char *name,
		  int (*on_event)(struct kube_watch *, const char *, json_t *, void *),
		  struct kpl_err *err);

static void on_watch_error(struct kube_watch *w, int status, const struct kube_status *ks,
			   void *data)
{
	struct canary *c = data;
	char text[600], *m;

	(void)w;
	c->watch = NULL; /* released below */
	kube_watch_stop(w);
	if (!c->st)
		return;
	reply_text(status, ks, text, sizeof text);
	m = kpl_asprintf("watch deployment: %s", text);
	failure(c, m);
	free(m);
}

/* kubectl's verdict on a followed Deployment: 0 waiting, 1 done, -1 failed
 * (msg says why). Logs each new "Waiting for ..." line. */
static int rollout_verdict(struct canary *c, const char *type, const json_t *obj, char *msg,
			   size_t n)
{
	enum kube_rollout ro;

	if (strcmp(type, "DELETED") == 0) {
		snprintf(msg, n, "deployment \"%s\": object has been deleted",
			 json_string_value(json_object_get(json_object_get(obj, "metadata"),
							   "name")) ?: "?");
		return -1;
	}
	ro = kube_rollout_status(obj, msg, n);
	if (!c->last_msg || strcmp(c->last_msg, msg) != 0) {
		free(c->last_msg);
		c->last_msg = kpl_strdup(msg);
		stage_logf(c->st, "%s", msg);
	}
	return ro == KUBE_ROLLOUT_DONE ? 1 : ro == KUBE_ROLLOUT_FAILED ? -1 : 0;
}

static int follow(struct canary *c, const char *name,
		  int (*on_event)(struct kube_watch *, const char *, json_t *, void *),
		  struct kpl_err *err)
{
	char *path = kube_deployment_path(c->ns, NULL);
	char *sel = kpl_asprintf("metadata.name=%s", name);
	int rc;

	free(c->last_msg);
	c->last_msg = NULL;
	rc = kube_watch_start(stage_loop(c->st), stage_http(c->st), &c->cfg, path, sel, on_event,
			      on_watch_error, c, &c->watch, err);
	free(path);
	free(sel);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Removing the canary: how an abort, a promotion and its undo all end */

static void promoted(struct canary *c);
static void undone(struct canary *c);

/* The removal stopped (msg); what it ends (c->phase) says how. */
static void remove_failed(struct canary *c, const char *msg)
{
	char *m;

	if (c->phase == PH_UNDO) {
		undo_failed(c, msg);
		return;
	}
	if (c->phase == PH_PROMOTE) /* stable runs the new image: nothing to undo */
		m = kpl_asprintf("promotion: %s", msg);
	else
		m = kpl_asprintf("canary abort failed: %s (after: %s)", msg,
				 c->reason ? c->reason : "cancelled");
	finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
	free(m);
}

static void canary_deleted(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;

	if (gone(c))
		return;
	if (status) {
		remove_failed(c, msg);
		return;
	}
	stage_logf(c->st, "deployment %s/%s: %s", c->ns, c->canary_name,
		   wrote ? "deleted" : "already absent");
	if (c->phase == PH_PROMOTE)
		promoted(c);
	else if (c->phase == PH_UNDO)
		undone(c);
	else
		aborted(c);
}

static void vs_reset(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;
	struct kpl_err err = { 0 };
	char *path, *what;
	int rc;

	if (gone(c))
		return;
	if (status) {
		remove_failed(c, msg);
		return;
	}
	stage_logf(c->st, "virtualservice %s/%s: %s", c->ns, c->service,
		   !wrote ? "already all stable"
		   : c->phase == PH_PROMOTE ? "all traffic to stable (now running the new image)"
					    : "all traffic back to stable");
	path = kube_deployment_path(c->ns, c->canary_name);
	what = kpl_asprintf("deployment %s/%s", c->ns, c->canary_name);
	rc = istio_delete(stage_http(c->st), &c->cfg, what, path, canary_deleted, c, &c->req,
			  &err);
	free(path);
	free(what);
	if (rc)
		remove_failed(c, err.msg);
}

/* Weights to 100/0, header route removed; a missing VirtualService or
 * route has nothing to reset. */
static int reset_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct istio_weights w;
	struct kpl_err e2 = { 0 };

	(void)data;
	(void)err;
	*out = NULL;
	if (!cur || istio_vs_weights(cur, &w, &e2))
		return 0;
	*out = json_deep_copy(cur);
	if (istio_vs_set_weights(*out, 0, NULL, NULL, &e2) <= 0) {
		json_decref(*out);
		*out = NULL;
	}
	return 0;
}

/* Weights back to 100/0, then the canary Deployment deleted, each write
 * only if still needed (a restart does it again). Ends the abort, the
 * promotion or the undo, whichever c->phase is. */
static void remove_canary(struct canary *c)
{
	struct kpl_err err = { 0 };
	char *path, *what;
	int rc;

	if (c->phase != PH_ABORT && c->phase != PH_PROMOTE && c->phase != PH_UNDO)
		BUG("canary %s: removed in phase %s", c->target, phase_names[c->phase]);
	path = istio_path("virtualservices", c->ns, c->service);
	what = kpl_asprintf("virtualservice %s/%s", c->ns, c->service);
	rc = istio_update(stage_http(c->st), &c->cfg, what, path, path, reset_modify, vs_reset, c,
			  &c->req, &err);
	free(path);
	free(what);
	if (rc)
		remove_failed(c, err.msg);
}

/* ---------------------------------------------------------------------- */
/* The stable Deployment: read, patched and followed alike by prepare, the
 * promotion and its undo; failure() and what comes next go by c->phase. */

static void prep_stable(struct canary *c);
static void promote_got(struct canary *c);
static void undo_got(struct canary *c);

static void stable_got(int status, json_t *obj, const struct kube_status *ks, void *data)
{
	struct canary *c = data;
	char text[600], *m;

	c->req = NULL;
	if (gone(c))
		return;
	if (status || ks) {
		reply_text(status, ks, text, sizeof text);
		m = kpl_asprintf("get deployment %s/%s: %s", c->ns, c->name, text);
		failure(c, m);
		free(m);
		return;
	}
	json_decref(c->stable);
	c->stable = json_incref(obj);
	switch (c->phase) {
	case PH_PREPARE:
		prep_stable(c);
		break;
	case PH_PROMOTE:
		promote_got(c);
		break;
	case PH_UNDO:
		undo_got(c);
		break;
	default:
		BUG("canary %s: stable read in phase %s", c->target, phase_names[c->phase]);
	}
}

/* Reads the stable Deployment into c->stable (again after a 409). */
static void get_stable(struct canary *c)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(c->ns, c->name);

	if (kube_request(stage_http(c->st), &c->cfg, "GET", path, NULL, NULL, stable_got, c,
			 &c->req, &err))
		failure(c, err.msg);
	free(path);
}

/* Done once stable's rollout is; a failed one, when undoing, means stable
 * is not ready on its old template either, and failure() stops the undo
 * there: moving the traffic to it would make things worse. */
static int stable_event(struct kube_watch *w, const char *type, json_t *obj, void *data)
{
	struct canary *c = data;
	char msg[512];
	int v;

	(void)w;
	if (!c->st)
		return 1;
	if ((v = rollout_verdict(c, type, obj, msg, sizeof msg)) == 0)
		return 0;
	stop_watch(c);
	if (v < 0) {
		failure(c, msg);
		return 1;
	}
	json_decref(c->stable);
	c->stable = json_incref(obj); /* the revision the promotion records */
	remove_canary(c);
	return 1;
}

static void follow_stable(struct canary *c)
{
	struct kpl_err err = { 0 };

	if (follow(c, c->name, stable_event, &err))
		failure(c, err.msg);
}

static void stable_patched(int status, json_t *obj, const struct kube_status *ks, void *data)
{
	struct canary *c = data;
	char text[600], *m;

	(void)obj;
	c->req = NULL;
	if (gone(c))
		return;
	if (!status && ks && ks->code == 409 && c->conflicts < ROLLOUT_MAX_CONFLICTS) {
		c->conflicts++;
		stage_logf(c->st, "patch deployment %s/%s: %s: %s; reading it again (%d of %d)",
			   c->ns, c->name, ks->reason, ks->message, c->conflicts,
			   ROLLOUT_MAX_CONFLICTS);
		get_stable(c);
		return;
	}
	if (status || ks) {
		reply_text(status, ks, text, sizeof text);
		m = kpl_asprintf("patch deployment %s/%s: %s", c->ns, c->name, text);
		failure(c, m);
		free(m);
		return;
	}
	if (c->phase == PH_UNDO)
		stage_logf(c->st, "patch deployment %s/%s: pod template of revision %s restored "
			   "(%s)", c->ns, c->name, c->prev_revision, c->prev_image);
	else
		stage_logf(c->st, "patch deployment %s/%s: patched to %s", c->ns, c->name,
			   c->image);
	follow_stable(c);
}

static void patch_stable(struct canary *c, enum kube_patch type, const char *body)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(c->ns, c->name);

	if (kube_request(stage_http(c->st), &c->cfg, "PATCH", path, kube_patch_content_type(type),
			 body, stable_patched, c, &c->req, &err))
		failure(c, err.msg);
	free(path);
}

/* ---------------------------------------------------------------------- */
/* Promotion */

static void promoted(struct canary *c)
{
	Kpl__Store__V1__ReleaseRecord rec = KPL__STORE__V1__RELEASE_RECORD__INIT;
	const json_t *tmpl = json_object_get(json_object_get(c->stable, "spec"), "template");
	char *t = rollout_template_text(tmpl), *m;
	const char *rev = kube_revision(c->stable);

	rec.target = c->target;
	rec.kind = "canary";
	rec.revision = (char *)rev;
	rec.image = c->image;
	rec.template_ = t;
	rec.previous_revision = c->prev_revision ? c->prev_revision : "";
	rec.previous_image = c->prev_image ? c->prev_image : "";
	rec.previous_template = c->prev_template ? c->prev_template : "";
	stage_record_release(c->st, &rec);
	stage_set_output(c->st, "revision", rev);
	stage_set_output(c->st, "image", c->image);
	set_weight_output(c);
	m = kpl_asprintf("promoted %s: deployment %s at revision %s, 100%% of traffic to stable, "
			 "canary removed", c->image, c->name, rev);
	free(t);
	finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, m);
	free(m);
}

static void promote_patch(struct canary *c)
{
	const char *rv = json_string_value(json_object_get(json_object_get(c->stable, "metadata"),
							   "resourceVersion"));
	char *cause = kpl_asprintf("kpl run %s stage %s: canary promoted, image %s",
				   stage_run_id(c->st), stage_name(c->st), c->image);
	json_t *patch = json_pack("{s:{s:{s:s}}, s:{s:{s:{s:[{s:s, s:s}]}}}}", "metadata",
				  "annotations", "kubernetes.io/change-cause", cause, "spec",
				  "template", "spec", "containers", "name", c->container, "image",
				  c->image);
	char *body;

	if (rv)
		json_object_set_new(json_object_get(patch, "metadata"), "resourceVersion",
				    json_string(rv));
	body = json_dumps(patch, JSON_COMPACT);
	patch_stable(c, KUBE_PATCH_STRATEGIC, body);
	json_decref(patch);
	free(cause);
	free(body);
}

static void promote_got(struct canary *c)
{
	struct kpl_err err = { 0 };
	const json_t *tmpl = json_object_get(json_object_get(c->stable, "spec"), "template");
	json_t *cont;
	const char *img;

	if (!(cont = istio_find_container(tmpl, c->name, c->container, &err))) {
		failure(c, err.msg);
		return;
	}
	if (!c->container) /* resumed past prepare */
		c->container = kpl_strdup(json_string_value(json_object_get(cont, "name")) ?: "");
	img = json_string_value(json_object_get(cont, "image"));
	if (img && strcmp(img, c->image) == 0) {
		/* patched before a restart (or by someone): only follow */
		follow_stable(c);
		return;
	}
	if (!c->prev_template) {
		/* The intent record, durable with the phase before the patch. */
		Kpl__Store__V1__ReleaseRecord rec = KPL__STORE__V1__RELEASE_RECORD__INIT;

		c->prev_revision = kpl_strdup(kube_revision(c->stable));
		c->prev_image = kpl_strdup(img ? img : "");
		c->prev_template = rollout_template_text(tmpl);
		rec.target = c->target;
		rec.kind = "canary";
		rec.revision = "";
		rec.image = c->image;
		rec.template_ = "";
		rec.previous_revision = c->prev_revision;
		rec.previous_image = c->prev_image;
		rec.previous_template = c->prev_template;
		stage_record_release(c->st, &rec);
		record(c, promote_patch);
		return;
	}
	promote_patch(c);
}

static void promote_start(struct canary *c)
{
	if (cancel_point(c))
		return;
	c->phase = PH_PROMOTE;
	free(c->vprogress);
	c->vprogress = NULL;
	stage_logf(c->st, "promoting %s: deployment %s takes the image", c->image, c->name);
	get_stable(c);
}

/* ---------------------------------------------------------------------- */
/* A failed promotion, undone */

/*
 * Once the intent record holds stable's replaced template, a promotion that
 * fails is undone in the order that keeps users on ready pods: stable's
 * template put back (rollback's patch, rollout.h) and its rollout followed
 * while the traffic still goes where the steps left it (the canary's pods
 * are ready, stable's new ones may not be); then the weights back to stable;
 * then the canary deleted. The phase "undo" is recorded first, and the
 * restore's patch after that (restored), so a restart carries on: the
 * template found in place is only followed, the reset and the delete are
 * idempotent.
 */

/* The undo stops here: what it had not done yet stays. */
static void undo_failed(struct canary *c, const char *msg)
{
	char *m = kpl_asprintf("undoing the promotion failed: %s (after: %s)", msg, c->reason);

	stop_watch(c);
	finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
	free(m);
}

static void undone(struct canary *c)
{
	char *m;

	if (c->restored)
		m = kpl_asprintf("%s; stable restored to revision %s, canary removed", c->reason,
				 c->prev_revision);
	else
		m = kpl_asprintf("%s; stable still on revision %s's template, canary removed",
				 c->reason, c->prev_revision);
	finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
	free(m);
}

/* The JSON patch rollback sends, against the Deployment read last. */
static void undo_patch(struct canary *c)
{
	struct kpl_err err = { 0 };
	char *body = NULL;
	int rc = rollout_restore_patch(c->stable, c->prev_template, c->target, &body, &err);

	if (rc < 0) {
		undo_failed(c, err.msg);
		return;
	}
	if (rc == 1) { /* cannot be: undo_got saw it differ; follow all the same */
		follow_stable(c);
		return;
	}
	patch_stable(c, KUBE_PATCH_JSON, body);
	free(body);
}

static void undo_got(struct canary *c)
{
	const json_t *tmpl = json_object_get(json_object_get(c->stable, "spec"), "template");
	char *cur = rollout_template_text(tmpl);
	int same = strcmp(cur, c->prev_template) == 0;

	free(cur);
	if (same) {
		stage_logf(c->st, "deployment %s/%s: already on the template of revision %s",
			   c->ns, c->name, c->prev_revision);
		follow_stable(c);
		return;
	}
	if (c->restored) { /* recorded already (a 409, or a restart) */
		undo_patch(c);
		return;
	}
	c->restored = 1;
	record(c, undo_patch);
}

/* A promotion failed (why): undone when stable may have changed, else an
 * abort; with on_failure: freeze nothing is undone. */
static void promote_failure(struct canary *c, const char *why)
{
	char *m;

	stop_watch(c);
	stop_timer(c);
	free(c->reason);
	c->reason = kpl_asprintf("promotion failed: %s", why);
	if (c->freeze) {
		m = kpl_asprintf("%s (on_failure is freeze: nothing undone)", c->reason);
		finish(c, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, m);
		free(m);
		return;
	}
	if (!c->prev_template) { /* the intent was never recorded: stable untouched */
		abort_start(c);
		return;
	}
	c->phase = PH_UNDO;
	c->conflicts = 0;
	stage_logf(c->st, "undoing the promotion (%s): deployment %s back to revision %s (%s), "
		   "then traffic to stable and the canary removed", why, c->name,
		   c->prev_revision, c->prev_image);
	record(c, get_stable);
}

/* ---------------------------------------------------------------------- */
/* The steps */

static void run_step(struct canary *c);
static void apply_step(struct canary *c);

static void next_step(struct canary *c)
{
	c->step++;
	c->pause_until = 0;
	free(c->vprogress);
	c->vprogress = NULL;
	run_step(c);
}

/* A copy of the VirtualService cur with weight% to the canary (and the
 * testers' header route): *out stays NULL when cur already says so. */
static int vs_with_weight(struct canary *c, const json_t *cur, int weight, const char *missing,
			  json_t **out, struct kpl_err *err)
{
	int rc;

	if (!cur)
		return kpl_errf(err, KPL_ENOTFOUND, "virtualservice %s/%s not found%s", c->ns,
				c->service, missing);
	*out = json_deep_copy(cur);
	rc = istio_vs_set_weights(*out, weight, c->header, c->header_value, err);
	if (rc <= 0) {
		json_decref(*out);
		*out = NULL;
	}
	return rc < 0 ? rc : 0;
}

static int weight_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct canary *c = data;

	return vs_with_weight(c, cur, c->steps[c->step].weight, " (the mesh kind creates it)",
			      out, err);
}

static void weight_done(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;

	if (gone(c))
		return;
	if (status) {
		failure(c, msg);
		return;
	}
	c->weight = c->steps[c->step].weight;
	set_weight_output(c);
	stage_logf(c->st, "step %zu/%zu: %d%% of traffic to the canary%s", c->step + 1,
		   c->n_steps, c->weight, wrote ? "" : " (already so)");
	next_step(c);
}

static void on_pause(uv_timer_t *t)
{
	struct canary *c = t->data;

	c->timer_on = 0;
	if (!c->st)
		return;
	stage_logf(c->st, "step %zu/%zu: pause over", c->step + 1, c->n_steps);
	next_step(c);
}

static void on_round(struct verify_run *run, const struct verify_progress *p, void *data)
{
	struct canary *c = data;
	char *text;

	(void)run;
	if (!c->st)
		return;
	free(c->vprogress);
	c->vprogress = verify_progress_format(p, NULL);
	/* the round's lines and the progress in one commit */
	text = resume_text(c);
	stage_save_resume(c->st, text);
	free(text);
}

static void on_verify_done(struct verify_run *run, const struct verify_result *res, void *data)
{
	struct canary *c = data;
	char *m;

	(void)run;
	c->verify = NULL;
	if (gone(c))
		return;
	if (res->state == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED) {
		stage_logf(c->st, "step %zu/%zu: %s", c->step + 1, c->n_steps, res->msg);
		if (cancel_point(c))
			return;
		next_step(c);
		return;
	}
	if (res->state == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED) {
		/* only our cancel stops it */
		abort_start(c);
		return;
	}
	m = kpl_strdup(res->msg);
	failure(c, m);
	free(m);
}

static int start_verify(struct canary *c, struct kpl_err *err)
{
	const struct cstep *s = &c->steps[c->step];
	struct verify_config cfg;
	struct verify_progress prog, *from = NULL;
	struct stage_endpoint prom = { 0 };
	struct verify_run_options o = { 0 };
	char path[300];
	int rc;

	snprintf(path, sizeof path, "stages.%s.with.steps[%zu].verify", stage_name(c->st),
		 c->step);
	if ((rc = verify_config_load(c->st, s->verify, path, c->version, &cfg, err)))
		return rc;
	if (cfg.n_queries && (rc = stage_endpoint(c->st, CFG_PROMETHEUS, "prometheus", &prom, err))) {
		verify_config_release(&cfg);
		return rc;
	}
	if (c->vprogress && verify_progress_parse(c->vprogress, &cfg, &prog) == 0)
		from = &prog;
	o.st = c->st;
	o.cfg = &cfg;
	o.prom = cfg.n_queries ? &prom : NULL;
	o.from = from;
	o.on_round = on_round;
	o.on_done = on_verify_done;
	o.data = c;
	rc = verify_run_start(&o, &c->verify, err);
	if (from)
		verify_progress_release(&prog);
	stage_endpoint_release(&prom);
	if (rc)
		c->verify = NULL;
	return rc;
}

static void apply_step(struct canary *c)
{
	const struct cstep *s = &c->steps[c->step];
	struct kpl_err err = { 0 };
	char *path, *what;
	int64_t left;
	int rc;

	switch (s->kind) {
	case CSTEP_WEIGHT:
		path = istio_path("virtualservices", c->ns, c->service);
		what = kpl_asprintf("virtualservice %s/%s", c->ns, c->service);
		rc = istio_update(stage_http(c->st), &c->cfg, what, path, path, weight_modify,
				  weight_done, c, &c->req, &err);
		free(path);
		free(what);
		if (rc)
			failure(c, err.msg);
		return;
	case CSTEP_PAUSE:
		left = c->pause_until - kpl_now_ms();
		if (left < 0)
			left = 0;
		stage_logf(c->st, "step %zu/%zu: pause, %lld ms left", c->step + 1, c->n_steps,
			   (long long)left);
		c->timer_on = 1;
		uv_timer_start(&c->timer, on_pause, (uint64_t)left, 0);
		return;
	case CSTEP_VERIFY:
		stage_logf(c->st, "step %zu/%zu: verify (canary version %s)%s", c->step + 1,
			   c->n_steps, c->version, c->vprogress ? ", carrying on" : "");
		if (start_verify(c, &err))
			failure(c, err.msg);
		return;
	}
}

/* Records the step (with a pause's deadline), then applies it. */
static void run_step(struct canary *c)
{
	if (cancel_point(c))
		return;
	if (c->step >= c->n_steps) {
		promote_start(c);
		return;
	}
	c->phase = PH_STEPS;
	if (c->steps[c->step].kind == CSTEP_PAUSE)
		c->pause_until = kpl_now_ms() + c->steps[c->step].pause_ms;
	record(c, apply_step);
}

/* ---------------------------------------------------------------------- */
/* Preparing */

static int canary_event(struct kube_watch *w, const char *type, json_t *obj, void *data)
{
	struct canary *c = data;
	char msg[512], *m;
	int v;

	(void)w;
	if (!c->st)
		return 1;
	if ((v = rollout_verdict(c, type, obj, msg, sizeof msg)) == 0)
		return 0;
	stop_watch(c);
	if (v < 0) {
		m = kpl_asprintf("canary %s", msg);
		failure(c, m);
		free(m);
		return 1;
	}
	c->step = 0;
	run_step(c);
	return 1;
}

static void prep_follow(struct canary *c)
{
	struct kpl_err err = { 0 };

	if (cancel_point(c))
		return;
	if (follow(c, c->canary_name, canary_event, &err))
		failure(c, err.msg);
}

/* The canary Deployment: created, or replaced when it runs something else. */
static int canary_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct canary *c = data;
	json_t *want = istio_canary_deployment(c->stable, c->canary_name, c->label, c->version,
					       c->container, c->image, c->replicas, err);

	if (!want)
		return err->code;
	if (cur) {
		const json_t *tmpl = json_object_get(json_object_get(cur, "spec"), "template");
		char *a = rollout_template_text(tmpl);
		char *b = rollout_template_text(json_object_get(json_object_get(want, "spec"),
								"template"));
		int same = strcmp(a, b) == 0 &&
			   json_integer_value(json_object_get(json_object_get(cur, "spec"),
							      "replicas")) == c->replicas;
		free(a);
		free(b);
		if (same) {
			json_decref(want);
			want = NULL;
		}
	}
	*out = want;
	return 0;
}

static void canary_written(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;

	if (gone(c))
		return;
	if (status) {
		failure(c, msg);
		return;
	}
	stage_logf(c->st, "deployment %s/%s: %s with %s (%ld replica%s)", c->ns, c->canary_name,
		   wrote ? "written" : "already running", c->image, c->replicas,
		   c->replicas == 1 ? "" : "s");
	prep_follow(c);
}

static void prep_canary(struct canary *c)
{
	struct kpl_err err = { 0 };
	char *path = kube_deployment_path(c->ns, c->canary_name);
	char *coll = kube_deployment_path(c->ns, NULL);
	char *what = kpl_asprintf("deployment %s/%s", c->ns, c->canary_name);
	int rc;

	if (cancel_point(c))
		goto out;
	rc = istio_update(stage_http(c->st), &c->cfg, what, path, coll, canary_modify,
			  canary_written, c, &c->req, &err);
	if (rc)
		failure(c, err.msg);
out:
	free(path);
	free(coll);
	free(what);
}

static int vs_prep_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct canary *c = data;

	/* 100/0 with the canary destination in place, and the testers' route */
	return vs_with_weight(c, cur, c->weight, ": switch the mesh on first (kind mesh)", out,
			      err);
}

static void vs_prepared(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;

	if (gone(c))
		return;
	if (status) {
		failure(c, msg);
		return;
	}
	stage_logf(c->st, "virtualservice %s/%s: %s", c->ns, c->service,
		   wrote ? (c->header ? "routes to stable and canary subsets (100/0), header "
				       "route for testers" : "routes to stable and canary subsets "
				       "(100/0)")
			 : "already as wanted");
	prep_canary(c);
}

static void prep_vs(struct canary *c)
{
	struct kpl_err err = { 0 };
	char *path = istio_path("virtualservices", c->ns, c->service);
	char *what = kpl_asprintf("virtualservice %s/%s", c->ns, c->service);
	int rc;

	if (cancel_point(c))
		goto out;
	rc = istio_update(stage_http(c->st), &c->cfg, what, path, path, vs_prep_modify,
			  vs_prepared, c, &c->req, &err);
	if (rc)
		failure(c, err.msg);
out:
	free(path);
	free(what);
}

static int dr_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct canary *c = data;

	if (!cur)
		return kpl_errf(err, KPL_ENOTFOUND, "destinationrule %s/%s not found: switch the "
				"mesh on first (kind mesh)", c->ns, c->service);
	*out = json_deep_copy(cur);
	if (!istio_dr_set(*out, c->service, c->label, c->stable_version, c->version)) {
		json_decref(*out);
		*out = NULL;
	}
	return 0;
}

static void dr_done(int status, const char *msg, int wrote, void *data)
{
	struct canary *c = data;

	if (gone(c))
		return;
	if (status) {
		failure(c, msg);
		return;
	}
	stage_logf(c->st, "destinationrule %s/%s: subsets stable (%s=%s) and canary (%s=%s)%s",
		   c->ns, c->service, c->label, c->stable_version, c->label, c->version,
		   wrote ? "" : ", already so");
	prep_vs(c);
}

/* Stable as read (get_stable): its version label, then the DestinationRule. */
static void prep_stable(struct canary *c)
{
	struct kpl_err err = { 0 };
	const json_t *tmpl, *labels;
	const char *ver;
	char *m, *path, *what;
	json_t *cont;
	int rc;

	tmpl = json_object_get(json_object_get(c->stable, "spec"), "template");
	labels = json_object_get(json_object_get(tmpl, "metadata"), "labels");
	if (!(cont = istio_find_container(tmpl, c->name, c->container, &err))) {
		failure(c, err.msg);
		return;
	}
	if (!c->container)
		c->container = kpl_strdup(json_string_value(json_object_get(cont, "name")) ?: "");
	if (!(ver = json_string_value(json_object_get(labels, c->label)))) {
		m = kpl_asprintf("deployment %s/%s: its pods have no label %s to tell stable from "
				 "canary (the mesh kind sets it)", c->ns, c->name, c->label);
		failure(c, m);
		free(m);
		return;
	}
	if (strcmp(ver, c->version) == 0) {
		m = kpl_asprintf("deployment %s/%s: its pods are labelled %s=%s, the canary's "
				 "version: set with.version to another value", c->ns, c->name,
				 c->label, ver);
		failure(c, m);
		free(m);
		return;
	}
	free(c->stable_version);
	c->stable_version = kpl_strdup(ver);
	path = istio_path("destinationrules", c->ns, c->service);
	what = kpl_asprintf("destinationrule %s/%s", c->ns, c->service);
	rc = istio_update(stage_http(c->st), &c->cfg, what, path, path, dr_modify, dr_done, c,
			  &c->req, &err);
	free(path);
	free(what);
	if (rc)
		failure(c, err.msg);
}

static void prepare(struct canary *c)
{
	if (!cancel_point(c))
		get_stable(c);
}

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int parse_weight(const char *s, int *out)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (!*s || *end || v < 0 || v > 100)
		return KPL_EINVAL;
	*out = (int)v;
	return 0;
}

static int check_steps(const struct pl_node *steps, const char *file, const char *path,
		       bool *queries, struct kpl_err *err)
{
	char sub[300];

	if (steps->type != PL_SEQ || !steps->n)
		return with_err(err, file, steps, path, "steps", "must be a non-empty list of "
				"{ weight: N }, { pause: DURATION }, { verify: {...} }");
	for (size_t i = 0; i < steps->n; i++) {
		const struct pl_node *s = steps->items[i], *v;
		const char *k, *why;
		int64_t ms;
		int w;

		snprintf(sub, sizeof sub, "%s.steps[%zu]", path, i);
		if (s->type != PL_MAP || s->n != 1)
			return with_err(err, file, s, sub, NULL, "must be one of { weight: N }, "
					"{ pause: DURATION }, { verify: {...} }");
		k = s->keys[0]->scalar;
		v = s->items[0];
		if (strcmp(k, "weight") == 0) {
			if (v->type != PL_SCALAR || parse_weight(v->scalar, &w))
				return with_err(err, file, v, sub, k, "must be a whole number from 0 "
						"to 100 (percent of traffic to the canary)");
		} else if (strcmp(k, "pause") == 0) {
			if (v->type != PL_SCALAR || pl_duration_parse(v->scalar, &ms, &why))
				return with_err(err, file, v, sub, k, "must be a duration (30s, 2m)");
		} else if (strcmp(k, "verify") == 0) {
			char vpath[320];
			snprintf(vpath, sizeof vpath, "%s.verify", sub);
			if (v->type == PL_MAP && pl_map_get(v, "prometheus"))
				return with_err(err, file, pl_map_get(v, "prometheus"), vpath,
						"prometheus", "set prometheus on the canary's with "
						"(one endpoint for every verify step)");
			if (verify_check_node(v, file, vpath, false, err))
				return KPL_EINVAL;
			*queries |= pl_map_get(v, "queries") != NULL;
		} else {
			return with_err(err, file, s->keys[0], sub, k, "unknown step (allowed: "
					"weight, pause, verify)");
		}
	}
	return 0;
}

static int canary_check_with(const struct pl_node *with, const char *file, const char *path,
			     struct kpl_err *err)
{
	static const char *const scalars[] = { "cluster", "namespace", "deployment", "container",
					       "image", "replicas", "service", "version_label",
					       "version", "prometheus", "on_failure" };
	static const char *const required[] = { "cluster", "deployment", "image", "steps" };
	const struct pl_node *hr;
	bool queries = false;

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: required (cluster, deployment, image, "
				"steps)", file, path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "must be a mapping");
	for (size_t i = 0; i < with->n; i++) {
		const struct pl_node *k = with->keys[i], *v = with->items[i];
		int known = 0;

		for (size_t j = 0; j < KPL_ARRAY_SIZE(scalars); j++)
			if (strcmp(k->scalar, scalars[j]) == 0) {
				known = 1;
				if (v->type != PL_SCALAR || !*v->scalar)
					return with_err(err, file, v, path, k->scalar,
							"must be a non-empty string");
			}
		if (strcmp(k->scalar, "replicas") == 0 && !strstr(v->scalar, "${{")) {
			char *end;
			long n = strtol(v->scalar, &end, 10);
			if (*end || n < 1)
				return with_err(err, file, v, path, k->scalar,
						"must be a whole number >= 1");
		}
		if (strcmp(k->scalar, "on_failure") == 0 && strcmp(v->scalar, "abort") &&
		    strcmp(v->scalar, "freeze"))
			return with_err(err, file, v, path, k->scalar, "must be abort or freeze");
		if (strcmp(k->scalar, "version") == 0 && !strstr(v->scalar, "${{") &&
		    !istio_label_value_ok(v->scalar))
			return with_err(err, file, v, path, k->scalar, "must be a label value "
					"(up to 63 letters, digits, '-', '_', '.')");
		if (strcmp(k->scalar, "steps") == 0) {
			known = 1;
			if (check_steps(v, file, path, &queries, err))
				return KPL_EINVAL;
		}
		if (strcmp(k->scalar, "header_route") == 0) {
			known = 1;
			hr = v;
			if (hr->type != PL_MAP || hr->n != 2 || !pl_map_get(hr, "header") ||
			    !pl_map_get(hr, "value") ||
			    pl_map_get(hr, "header")->type != PL_SCALAR ||
			    pl_map_get(hr, "value")->type != PL_SCALAR ||
			    !*pl_map_get(hr, "header")->scalar)
				return with_err(err, file, hr, path, k->scalar,
						"must be { header: NAME, value: VALUE }");
		}
		if (!known)
			return with_err(err, file, k, path, k->scalar,
					"unknown key (allowed: cluster, namespace, deployment, "
					"container, image, replicas, service, version_label, version, "
					"prometheus, header_route, on_failure, steps)");
	}
	for (size_t j = 0; j < KPL_ARRAY_SIZE(required); j++)
		if (!pl_map_get(with, required[j]))
			return with_err(err, file, with, path, required[j], "required");
	if (queries && !pl_map_get(with, "prometheus"))
		return with_err(err, file, with, path, "prometheus", "required: a verify step has "
				"queries (the name of a prometheus endpoint in the daemon config)");
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The kind */

static int load(struct canary *c, struct stage *st, struct kpl_err *err)
{
	const struct pl_node *steps = stage_with_get(st, "steps");
	const struct pl_node *hr = stage_with_get(st, "header_route");
	char *reps = stage_expand(st, stage_with_get(st, "replicas"));
	char *onf = stage_expand(st, stage_with_get(st, "on_failure"));
	struct stage_endpoint ep;
	int rc = KPL_EINVAL;

	c->container = stage_expand(st, stage_with_get(st, "container"));
	c->image = stage_expand(st, stage_with_get(st, "image"));
	c->name = stage_expand(st, stage_with_get(st, "deployment"));
	c->service = stage_expand(st, stage_with_get(st, "service"));
	c->label = stage_expand(st, stage_with_get(st, "version_label"));
	c->version = stage_expand(st, stage_with_get(st, "version"));
	c->replicas = 1;
	if (!c->image || !*c->image || !c->name || !*c->name) {
		kpl_errf(err, rc, "with.image and with.deployment must not be empty");
		goto out;
	}
	if (reps) {
		char *end;
		c->replicas = strtol(reps, &end, 10);
		if (*end || c->replicas < 1) {
			kpl_errf(err, rc, "with.replicas: \"%s\" is not a whole number >= 1", reps);
			goto out;
		}
	}
	c->freeze = onf && strcmp(onf, "freeze") == 0;
	if (!c->service)
		c->service = kpl_strdup(c->name);
	if (!c->label)
		c->label = kpl_strdup("version");
	if (!c->version)
		c->version = kpl_strdup("canary");
	if (!istio_label_value_ok(c->version)) {
		kpl_errf(err, rc, "with.version: \"%s\" is not a label value", c->version);
		goto out;
	}
	c->canary_name = kpl_asprintf("%s-canary", c->name);
	if (hr && hr->type == PL_MAP) {
		c->header = stage_expand(st, pl_map_get(hr, "header"));
		c->header_value = stage_expand(st, pl_map_get(hr, "value"));
	}
	c->steps = kpl_calloc(steps && steps->n ? steps->n : 1, sizeof *c->steps);
	for (size_t i = 0; steps && steps->type == PL_SEQ && i < steps->n; i++) {
		const struct pl_node *s = steps->items[i];
		const char *k = s->keys[0]->scalar, *why;
		struct cstep *cs = &c->steps[c->n_steps++];

		if (strcmp(k, "weight") == 0) {
			cs->kind = CSTEP_WEIGHT;
			parse_weight(s->items[0]->scalar, &cs->weight);
		} else if (strcmp(k, "pause") == 0) {
			cs->kind = CSTEP_PAUSE;
			pl_duration_parse(s->items[0]->scalar, &cs->pause_ms, &why);
		} else {
			cs->kind = CSTEP_VERIFY;
			cs->verify = s->items[0];
		}
	}
	if ((rc = stage_endpoint(st, CFG_KUBERNETES, "cluster", &ep, err)) != 0)
		goto out;
	rc = kube_config_from_endpoint(ep.ep, ep.token, &c->cfg, err);
	c->cluster = kpl_strdup(ep.ep->name);
	stage_endpoint_release(&ep);
	if (rc)
		goto out;
	{
		char *ns = stage_expand(st, stage_with_get(st, "namespace"));
		c->ns = kpl_strdup(ns && *ns ? ns : c->cfg.namespace ? c->cfg.namespace : "default");
		free(ns);
	}
	c->target = kpl_asprintf("%s/%s/%s", c->cluster, c->ns, c->name);
	if (strlen(c->target) > STORE_MAX_RELEASE_TARGET)
		rc = kpl_errf(err, KPL_EINVAL, "%.80s...: cluster/namespace/deployment is %zu "
			      "bytes, over %d", c->target, strlen(c->target),
			      STORE_MAX_RELEASE_TARGET);
out:
	free(reps);
	free(onf);
	return rc;
}

static struct canary *canary_new(struct stage *st)
{
	struct canary *c = kpl_calloc(1, sizeof *c);

	kube_config_init(&c->cfg);
	uv_timer_init(stage_loop(st), &c->timer);
	c->timer.data = c;
	return c;
}

/* Frees a canary that never started. */
static void canary_discard(struct canary *c)
{
	c->st = NULL;
	maybe_free(c);
}

static int canary_start(struct stage *st, struct kpl_err *err)
{
	struct canary *c = canary_new(st);
	int rc;

	if ((rc = load(c, st, err))) {
		canary_discard(c);
		return rc;
	}
	c->st = st;
	stage_set_impl(st, c);
	c->phase = PH_PREPARE;
	stage_logf(st, "canary %s of deployment %s/%s: %zu steps", c->image, c->ns, c->name,
		   c->n_steps);
	record(c, prepare);
	return 0;
}

static int canary_resume(struct stage *st, struct kpl_err *err)
{
	struct canary *c;
	int64_t pid;
	uint64_t start;
	const char *resume;
	int rc;

	stage_resume_info(st, &pid, &start, &resume);
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was changed yet");
	c = canary_new(st);
	if ((rc = load(c, st, err))) {
		canary_discard(c);
		return rc;
	}
	if (resume_parse(c, resume)) {
		canary_discard(c);
		return kpl_errf(err, KPL_ESTATE, "the recorded canary progress is unreadable");
	}
	c->st = st;
	stage_set_impl(st, c);
	kpl_info(LOG, "run %s stage %s: carrying on in phase %s, step %zu", stage_run_id(st),
		 stage_name(st), phase_names[c->phase], c->step);
	switch (c->phase) {
	case PH_PREPARE:
		prepare(c);
		break;
	case PH_STEPS:
		if (c->step >= c->n_steps)
			promote_start(c);
		else
			apply_step(c);
		break;
	case PH_FROZEN:
		break; /* still WAITING: the answer comes through the engine */
	case PH_PROMOTE:
		promote_start(c);
		break;
	case PH_ABORT:
		remove_canary(c);
		break;
	case PH_UNDO:
		if (c->prev_template) {
			get_stable(c);
			break;
		}
		/* nothing recorded to restore: the removal ends as an abort would */
		c->phase = PH_ABORT;
		remove_canary(c);
		break;
	case PH_LAST_:
		BUG("canary phase");
	}
	return 0;
}

static void canary_cancel(struct stage *st)
{
	struct canary *c = stage_impl(st);

	if (!c || !c->st || c->cancelled)
		return;
	c->cancelled = 1;
	if (c->phase == PH_ABORT || c->phase == PH_UNDO)
		return; /* already undoing */
	if (c->verify) {
		verify_run_cancel(c->verify); /* on_verify_done aborts */
		return;
	}
	if (c->timer_on || c->watch || (c->phase == PH_FROZEN && !c->waiting_commit)) {
		abort_start(c);
		return;
	}
	/* a request or a commit in flight: its callback reaches a cancel point */
}

static void canary_abandon(struct stage *st)
{
	struct canary *c = stage_impl(st);

	if (!c || !c->st)
		return;
	c->st = NULL;
	stage_set_impl(st, NULL);
	stop_watch(c);
	stop_timer(c);
	if (c->verify) {
		verify_run_abandon(c->verify);
		c->verify = NULL;
	}
	if (c->req)
		http_request_cancel(c->req);
	maybe_free(c);
}

static void canary_approve(struct stage *st, bool approve, const char *msg)
{
	struct canary *c = stage_impl(st);

	if (!c || c->phase != PH_FROZEN) {
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
			   "the canary was not frozen: nothing to approve");
		return;
	}
	stage_logf(st, "%s", msg);
	if (approve) {
		promote_start(c);
		return;
	}
	free(c->reason);
	c->reason = kpl_asprintf("frozen canary %s", msg);
	abort_start(c);
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const canary_with_keys[] = {
	"cluster", "namespace", "deployment", "container", "image", "replicas", "service",
	"version_label", "version", "prometheus", "header_route", "on_failure", "steps", NULL
};

const struct stage_kind canary_kind = {
	.name = "canary",
	.with_keys = canary_with_keys,
	.check_with = canary_check_with,
	.start = canary_start,
	.cancel = canary_cancel,
	.resume = canary_resume,
	.abandon = canary_abandon,
	.with_roots = EXPR_ROOT_CANARY,
	.approve = canary_approve,
};
