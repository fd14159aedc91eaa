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
 * Mesh weights: rollback_mesh_reset() below is the hook where the canary
 * kind's VirtualService weights go back to the stable subset. It does
 * nothing yet (there is no canary kind, and `with` has no mesh keys); see
 * its comment.
 */
#include <stdlib.h>
#include <string.h>

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
		} else if (strcmp(rec->kind, "deploy") == 0) {
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
	json_t *tmpl, *patch;
	const char *rv;
	char *cur, buf[700];
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
	cur = rollout_template_text(json_object_get(json_object_get(d, "spec"), "template"));
	if (strcmp(cur, rb->template_) == 0) {
		struct stage *st = rollout_stage(r);
		if (st)
			stage_logf(st, "skipped rollback (current template already matches "
				   "revision %s)", *rb->revision ? rb->revision : "(unknown)");
		free(cur);
		plan->action = ROLLOUT_FOLLOW;
		return 0;
	}
	free(cur);
	if (!(tmpl = json_loads(rb->template_, 0, NULL)))
		return kpl_errf(err, KPL_ECORRUPT, "the recorded template of %s is not JSON",
				rollout_target(r));
	rv = json_string_value(json_object_get(json_object_get(d, "metadata"), "resourceVersion"));
	patch = json_pack("[{s:s, s:s, s:s}, {s:s, s:s, s:o}]",
			  "op", "replace", "path", "/metadata/resourceVersion", "value", rv ? rv : "",
			  "op", "replace", "path", "/spec/template", "value", tmpl);
	if (!rv)
		json_array_remove(patch, 0);
	plan->action = ROLLOUT_PATCH;
	plan->patch = KUBE_PATCH_JSON;
	plan->body = json_dumps(patch, JSON_COMPACT);
	json_decref(patch);
	return 0;
}

/*
 * The mesh hook: runs after the template is patched back (or found already
 * restored) and before the rollout is followed.
 *
 * NEEDSWORK(canary): when the canary kind exists, this is where the
 * VirtualService of the target goes back to 100% stable / 0% canary (the
 * canary engineer adds the `with` keys or reads the canary's records, and
 * calls rollout_step_done(r, 0, NULL) once the PUT succeeded, or
 * rollout_step_done(r, code, "put virtualservice ...: REASON: MESSAGE")).
 * Today no stage puts weights anywhere, so there is nothing to reset and it
 * goes straight on; it claims nothing in the log.
 */
static void rollback_mesh_reset(struct rollout *r)
{
	rollout_step_done(r, 0, NULL);
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

const struct stage_kind rollback_kind = {
	.name = "rollback",
	.check_with = rollback_check_with,
	.start = rollback_start,
	.cancel = rollout_cancel,
	.resume = rollback_resume,
	.abandon = rollout_abandon,
};
