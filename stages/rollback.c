/*
 * rollback.c - the `rollback` stage kind: put a Deployment's pod template
 * back to a revision kpl recorded, then follow the rollout.
 *
 *   with:
 *     cluster: prod        # a `kubernetes:` endpoint of the daemon config
 *     namespace: shop      # default: the context's namespace, else "default"
 *     deployment: web
 *     to_revision: "4"     # optional
 *
 * Which template (from the release history, rollout.h):
 *   - no to_revision: the previous_template of the newest "deploy" record of
 *     the target, i.e. what the last deploy replaced, whether its rollout
 *     succeeded or not (a failed deploy leaves its intent record; a
 *     successful one also its result record, with the same previous_*).
 *     "rollback" records are skipped, so rolling back twice is a no-op;
 *   - to_revision N: the template that was revision N: the template of a
 *     record whose revision is N, else the previous_template of a record
 *     whose previous_revision is N (newest first); else the stage fails
 *     ("unable to find specified revision N ...").
 * Like kubectl rollout undo: a paused Deployment is refused; a template that
 * already matches (ignoring pod-template-hash) is not patched ("skipped
 * rollback"); the change is a JSON patch (application/json-patch+json)
 * replacing /spec/template, with /metadata/resourceVersion replaced by the
 * one read, so a concurrent change gives 409 and a fresh read (rollout.h).
 * The Deployment controller then rolls forward to that template (the old
 * ReplicaSet gets a new revision number). Records a "rollback" release
 * (intent and result, rollout.h). Outputs revision and image.
 *
 * Mesh weights: after the template, rollback_mesh_reset() below sends the
 * traffic of the mesh kind's VirtualServices for the Deployment back to the
 * stable subset and deletes a canary Deployment left behind (see its
 * comment).
 *
 * A promoted canary (kind "canary" records, canary.c) is a release like a
 * deploy: without to_revision the newest "deploy" or "canary" record
 * decides.
 */
#include <stdlib.h>
#include <string.h>

#include "stages/istio.h"
#include "stages/kinds.h"
#include "stages/rollout.h"
#include "store/store.h"

struct rollback {
	char *to_revision; /* NULL: the last deploy's previous */
	char *template_;   /* the chosen template (JSON text) */
	char *image;       /* its image, when the record says */
	char *revision;    /* the revision it was, "" if unknown */
	int chosen;
};

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int rollback_check_with(const struct pl_node *with, const char *file,
			       const char *path, struct kpl_err *err)
{
	static const char *const keys[] = { "cluster", "namespace", "deployment", "to_revision" };

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: required (cluster, deployment)", file,
				path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "must be a mapping");
	for (size_t i = 0; i < with->n; i++) {
		const struct pl_node *k = with->keys[i], *v = with->items[i];
		int known = 0;
		for (size_t j = 0; j < KPL_ARRAY_SIZE(keys); j++)
			known |= strcmp(k->scalar, keys[j]) == 0;
		if (!known)
			return with_err(err, file, k, path, k->scalar,
					"unknown key (allowed: cluster, namespace, deployment, "
					"to_revision)");
		if (v->type != PL_SCALAR || !*v->scalar)
			return with_err(err, file, v, path, k->scalar, "must be a non-empty string");
	}
	if (!pl_map_get(with, "cluster"))
		return with_err(err, file, with, path, "cluster", "required");
	if (!pl_map_get(with, "deployment"))
		return with_err(err, file, with, path, "deployment", "required");
	return 0;
}

static void rollback_free(void *impl)
{
	struct rollback *rb = impl;

	free(rb->to_revision);
	free(rb->template_);
	free(rb->image);
	free(rb->revision);
	free(rb);
}

/* Picks the template to restore from the release history. */
static int choose(struct rollout *r, struct rollback *rb, struct kpl_err *err)
{
	Kpl__Store__V1__ReleaseRecord **recs = NULL;
	size_t n = 0;
	int rc;

	if ((rc = stage_releases(rollout_stage(r), rollout_target(r), &recs, &n)) != 0 &&
	    rc != KPL_ENOTFOUND)
		return kpl_errf(err, rc, "cannot read the release history of %s: %s",
				rollout_target(r), kpl_strerror(rc));
	for (size_t i = 0; i < n && !rb->template_; i++) {
		Kpl__Store__V1__ReleaseRecord *rec = recs[i];
		if (rb->to_revision) {
			if (strcmp(rec->revision, rb->to_revision) == 0 && *rec->template_) {
				rb->template_ = kpl_strdup(rec->template_);
				rb->image = kpl_strdup(rec->image);
			} else if (strcmp(rec->previous_revision, rb->to_revision) == 0 &&
				   *rec->previous_template) {
				rb->template_ = kpl_strdup(rec->previous_template);
				rb->image = kpl_strdup(rec->previous_image);
			}
			if (rb->template_)
				rb->revision = kpl_strdup(rb->to_revision);
		} else if (strcmp(rec->kind, "deploy") == 0 || strcmp(rec->kind, "canary") == 0) {
			if (!*rec->previous_template) {
				rc = kpl_errf(err, KPL_ENOTFOUND, "the last deploy of %s (run %s stage "
					      "%s) created it: there is no earlier revision to "
					      "restore", rollout_target(r), rec->run_id, rec->stage);
				goto out;
			}
			rb->template_ = kpl_strdup(rec->previous_template);
			rb->image = kpl_strdup(rec->previous_image);
			rb->revision = kpl_strdup(rec->previous_revision);
		}
	}
	if (!rb->template_) {
		if (rb->to_revision)
			rc = kpl_errf(err, KPL_ENOTFOUND, "unable to find specified revision %s in "
				      "the release history of %s", rb->to_revision,
				      rollout_target(r));
		else
			rc = kpl_errf(err, KPL_ENOTFOUND, "no rollout history found for %s (no "
				      "deploy recorded by kpl)", rollout_target(r));
		goto out;
	}
	rb->chosen = 1;
	rc = 0;
out:
	store_free_releases(recs, n);
	return rc;
}

static int rollback_plan(struct rollout *r, const json_t *d, const json_t *rs,
			 struct rollout_plan *plan, struct kpl_err *err)
{
	struct rollback *rb = rollout_impl(r);
	char buf[700];
	int rc;

	(void)rs;
	if (!d)
		return kpl_errf(err, KPL_ENOTFOUND, "%s", rollout_not_found(r, buf, sizeof buf));
	if (!rb->chosen && (rc = choose(r, rb, err)) != 0)
		return rc;
	if (json_is_true(json_object_get(json_object_get(d, "spec"), "paused")))
		return kpl_errf(err, KPL_ESTATE, "you cannot rollback a paused deployment; resume "
				"it first with 'kubectl rollout resume' and try again");
	plan->image = kpl_strdup(rb->image ? rb->image : "");
	rc = rollout_restore_patch(d, rb->template_, rollout_target(r), &plan->body, err);
	if (rc < 0)
		return rc;
	if (rc == 1) {
		struct stage *st = rollout_stage(r);
		if (st)
			stage_logf(st, "skipped rollback (current template already matches "
				   "revision %s)", *rb->revision ? rb->revision : "(unknown)");
		plan->action = ROLLOUT_FOLLOW;
		return 0;
	}
	plan->action = ROLLOUT_PATCH;
	plan->patch = KUBE_PATCH_JSON;
	return 0;
}

/*
 * The mesh hook: runs after the template is patched back (or found already
 * restored) and before the rollout is followed. It returns mesh weights to
 * the stable subset: every VirtualService of the namespace that the mesh
 * kind made for this Deployment (label kpl.dev/deployment=NAME, istio.h)
 * and that sends anything to the canary subset (a weight above 0, or the
 * testers' header route) is PUT back to 100/0 without the header route;
 * then a canary Deployment NAME-canary, if one exists, is deleted. A
 * cluster without Istio's CRDs (404 on the list) has nothing to reset.
 */
struct mesh_reset {
	struct rollout *r;
	json_t *list; /* the VirtualServices' items */
	size_t next;
	struct http_request *req;
};

static void mesh_reset_end(struct mesh_reset *m, int status, const char *msg)
{
	struct rollout *r = m->r;

	json_decref(m->list);
	free(m);
	rollout_step_done(r, status, msg);
}

static void canary_deleted(int status, const char *msg, int wrote, void *data)
{
	struct mesh_reset *m = data;
	struct stage *st = rollout_stage(m->r);

	if (!status && wrote && st)
		stage_logf(st, "deployment %s/%s-canary: deleted", rollout_namespace(m->r),
			   rollout_deployment(m->r));
	mesh_reset_end(m, status, msg);
}

static int vs_reset(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct istio_weights w;
	struct kpl_err e2 = { 0 };

	(void)data;
	(void)err;
	*out = NULL;
	if (!cur || istio_vs_weights(cur, &w, &e2) || (w.canary == 0 && !w.header))
		return 0;
	*out = json_deep_copy(cur);
	if (istio_vs_set_weights(*out, 0, NULL, NULL, &e2) <= 0) {
		json_decref(*out);
		*out = NULL;
	}
	return 0;
}

static void reset_next(struct mesh_reset *m);

static void vs_reset_done(int status, const char *msg, int wrote, void *data)
{
	struct mesh_reset *m = data;
	struct stage *st = rollout_stage(m->r);
	const char *name = json_string_value(json_object_get(
		json_object_get(json_array_get(m->list, m->next), "metadata"), "name"));

	if (status || !st) {
		mesh_reset_end(m, status ? status : KPL_ECANCELLED, msg);
		return;
	}
	if (wrote)
		stage_logf(st, "virtualservice %s/%s: all traffic back to stable",
			   rollout_namespace(m->r), name ? name : "?");
	m->next++;
	reset_next(m);
}

static void reset_next(struct mesh_reset *m)
{
	struct stage *st = rollout_stage(m->r);
	struct kpl_err err = { 0 };
	const char *ns = rollout_namespace(m->r);
	char *path, *what;
	int rc;

	if (!st) {
		mesh_reset_end(m, KPL_ECANCELLED, NULL);
		return;
	}
	if (m->next < json_array_size(m->list)) {
		const char *name = json_string_value(json_object_get(
			json_object_get(json_array_get(m->list, m->next), "metadata"), "name"));
		path = istio_path("virtualservices", ns, name ? name : "");
		what = kpl_asprintf("virtualservice %s/%s", ns, name ? name : "");
		rc = istio_update(stage_http(st), rollout_config(m->r), what, path, path, vs_reset,
				  vs_reset_done, m, &m->req, &err);
	} else {
		char *canary = kpl_asprintf("%s-canary", rollout_deployment(m->r));
		path = kube_deployment_path(ns, canary);
		what = kpl_asprintf("deployment %s/%s", ns, canary);
		free(canary);
		rc = istio_delete(stage_http(st), rollout_config(m->r), what, path, canary_deleted,
				  m, &m->req, &err);
	}
	free(path);
	free(what);
	if (rc)
		mesh_reset_end(m, rc, err.msg);
}

static void vs_listed(int status, json_t *obj, const struct kube_status *ks, void *data)
{
	struct mesh_reset *m = data;
	char text[600], *msg;

	m->req = NULL;
	if (!status && ks && ks->code == 404) {
		/* no Istio here: nothing routes by weight */
		m->list = json_array();
	} else if (status || ks) {
		if (ks)
			kube_status_text(ks, text, sizeof text);
		else
			snprintf(text, sizeof text, "%s", kpl_strerror(status));
		msg = kpl_asprintf("list virtualservices of %s/%s: %s", rollout_namespace(m->r),
				   rollout_deployment(m->r), text);
		mesh_reset_end(m, status ? status : KPL_EUNAVAILABLE, msg);
		free(msg);
		return;
	} else {
		m->list = json_incref(json_object_get(obj, "items"));
		if (!json_is_array(m->list)) {
			json_decref(m->list);
			m->list = json_array();
		}
	}
	reset_next(m);
}

static void rollback_mesh_reset(struct rollout *r)
{
	struct mesh_reset *m = kpl_calloc(1, sizeof *m);
	struct kpl_err err = { 0 };
	char *coll = istio_path("virtualservices", rollout_namespace(r), NULL);
	char *sel = kpl_asprintf("%s=%s", ISTIO_LABEL_DEPLOYMENT, rollout_deployment(r));
	char *esel = kube_escape(sel);
	char *path = kpl_asprintf("%s?labelSelector=%s", coll, esel);

	m->r = r;
	if (kube_request(stage_http(rollout_stage(r)), rollout_config(r), "GET", path, NULL, NULL,
			 vs_listed, m, &m->req, &err))
		mesh_reset_end(m, err.code, err.msg);
	free(coll);
	free(sel);
	free(esel);
	free(path);
}

static const struct rollout_ops rollback_ops = {
	.kind = "rollback",
	.plan = rollback_plan,
	.after_change = rollback_mesh_reset,
	.free_impl = rollback_free,
};

static int rollback_begin(struct stage *st, int resumed, struct kpl_err *err)
{
	struct rollback *rb = kpl_calloc(1, sizeof *rb);
	char *ns = stage_expand(st, stage_with_get(st, "namespace"));
	char *name = stage_expand(st, stage_with_get(st, "deployment"));
	int rc;

	rb->to_revision = stage_expand(st, stage_with_get(st, "to_revision"));
	if (!name || !*name) {
		rc = kpl_errf(err, KPL_EINVAL, "with.deployment must not be empty");
		rollback_free(rb);
	} else if ((rc = rollout_start(st, &rollback_ops, ns, name, rb, resumed, err)) != 0) {
		rollback_free(rb);
	}
	free(ns);
	free(name);
	return rc;
}

static int rollback_start(struct stage *st, struct kpl_err *err)
{
	return rollback_begin(st, 0, err);
}

static int rollback_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t start;
	const char *resume;

	stage_resume_info(st, &pid, &start, &resume);
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was changed yet");
	return rollback_begin(st, 1, err);
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const rollback_with_keys[] = {
	"cluster", "namespace", "deployment", "to_revision", NULL
};

const struct stage_kind rollback_kind = {
	.name = "rollback",
	.with_keys = rollback_with_keys,
	.check_with = rollback_check_with,
	.start = rollback_start,
	.cancel = rollout_cancel,
	.resume = rollback_resume,
	.abandon = rollout_abandon,
};
