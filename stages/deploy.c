/*
 * deploy.c - the `deploy` stage kind: set a container's image (and
 * optionally replicas, env, resources) of a Kubernetes Deployment, then
 * follow the rollout with kubectl's rules.
 *
 *   with:
 *     cluster: prod            # a `kubernetes:` endpoint of the daemon config
 *     namespace: shop          # default: the context's namespace, else "default"
 *     deployment: web
 *     container: web           # default: the only container
 *     image: reg/web:1.2.3
 *     replicas: 3              # optional
 *     env: { MODE: prod }      # optional: set (merged by name) in the container
 *     resources: { limits: { cpu: 500m } }   # optional: the container's resources
 *     create_from: k8s/web.yaml  # optional: a Deployment manifest (path in the
 *                              # run's workspace) created when the Deployment
 *                              # does not exist, with the settings above applied
 *
 * The change is a strategic merge patch (application/strategic-merge-patch+
 * json: containers merge by name, so other containers and settings stay as
 * they are) carrying metadata.resourceVersion from the read that recorded
 * the replaced revision: if anyone changed the Deployment in between the
 * server answers 409 Conflict and the stage reads it again (rollout.h). It
 * also sets the annotation kubernetes.io/change-cause ("kpl run R stage S:
 * image I"), which `kubectl rollout history` shows.
 *
 * Outputs: revision (the Deployment's revision once rolled out), image.
 * Release history, resume and cancel: see rollout.h. After a kpld restart
 * the stage reads the Deployment again; if the template already has the
 * image (and the other settings), the patch was applied and it only
 * follows the rollout: a change is never sent twice.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stages/kinds.h"
#include "stages/rollout.h"

#define DEPLOY_MAX_MANIFEST (1024 * 1024)

struct deploy {
	char *container; /* with.container, or NULL */
	char *image;
	long replicas;   /* -1: not given */
	json_t *env;     /* array of {name, value}, or NULL */
	json_t *resources;
	char *create_from;
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int deploy_check_with(const struct pl_node *with, const char *file, const char *path,
			     struct kpl_err *err)
{
	static const char *const scalars[] = { "cluster", "namespace", "deployment", "container",
					       "image", "replicas", "create_from" };
	static const char *const required[] = { "cluster", "deployment", "image" };

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: required (cluster, deployment, image)",
				file, path);
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
			if (*end || n < 0)
				return with_err(err, file, v, path, k->scalar,
						"must be a whole number >= 0");
		}
		if (strcmp(k->scalar, "env") == 0) {
			known = 1;
			if (v->type != PL_MAP)
				return with_err(err, file, v, path, k->scalar,
						"must be a mapping of NAME: value");
			for (size_t j = 0; j < v->n; j++)
				if (v->items[j]->type != PL_SCALAR)
					return with_err(err, file, v->items[j], path, "env",
							"values must be strings");
		}
		if (strcmp(k->scalar, "resources") == 0) {
			known = 1;
			if (v->type != PL_MAP)
				return with_err(err, file, v, path, k->scalar,
						"must be a mapping (limits, requests)");
		}
		if (!known)
			return with_err(err, file, k, path, k->scalar,
					"unknown key (allowed: cluster, namespace, deployment, "
					"container, image, replicas, env, resources, create_from)");
	}
	for (size_t j = 0; j < KPL_ARRAY_SIZE(required); j++)
		if (!pl_map_get(with, required[j]))
			return with_err(err, file, with, path, required[j], "required");
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The plan */

static void deploy_free(void *impl)
{
	struct deploy *d = impl;

	free(d->container);
	free(d->image);
	json_decref(d->env);
	json_decref(d->resources);
	free(d->create_from);
	free(d);
}

static const char *deploy_container(struct rollout *r)
{
	return ((struct deploy *)rollout_impl(r))->container;
}

/* The container of a pod template that the stage changes; err if none. */
static json_t *find_container(struct deploy *dp, json_t *tmpl, const char *name,
			      struct kpl_err *err)
{
	json_t *cs = json_object_get(json_object_get(tmpl, "spec"), "containers"), *c;
	char names[300] = "";
	size_t i, used = 0;

	if (!dp->container && json_array_size(cs) == 1)
		return json_array_get(cs, 0);
	json_array_foreach(cs, i, c) {
		const char *nm = json_string_value(json_object_get(c, "name"));
		if (nm && dp->container && strcmp(nm, dp->container) == 0)
			return c;
		if (nm && used + strlen(nm) + 3 < sizeof names)
			used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
						 used ? ", " : "", nm);
	}
	if (!dp->container)
		kpl_errf(err, KPL_EINVAL, "deployment \"%s\" has %zu containers (%s): name one "
			 "with container", name, json_array_size(cs), names);
	else
		kpl_errf(err, KPL_EINVAL, "deployment \"%s\" has no container \"%s\" "
			 "(containers: %s)", name, dp->container, *names ? names : "none");
	return NULL;
}

/* Whether the container already has everything the stage sets. */
static int applied(struct deploy *dp, const json_t *d, const json_t *c)
{
	const char *img = json_string_value(json_object_get(c, "image"));
	json_t *env = json_object_get(c, "env"), *want, *have;
	size_t i, j;

	if (!img || strcmp(img, dp->image) != 0)
		return 0;
	if (dp->replicas >= 0 &&
	    json_integer_value(json_object_get(json_object_get(d, "spec"), "replicas")) !=
		    dp->replicas)
		return 0;
	if (dp->resources && !json_equal(dp->resources, json_object_get(c, "resources")))
		return 0;
	json_array_foreach(dp->env, i, want) {
		int found = 0;
		json_array_foreach(env, j, have)
			if (json_equal(json_object_get(have, "name"), json_object_get(want, "name")) &&
			    json_equal(json_object_get(have, "value"), json_object_get(want, "value")))
				found = 1;
		if (!found)
			return 0;
	}
	return 1;
}

static json_t *container_patch(struct deploy *dp, const char *name)
{
	json_t *c = json_pack("{s:s, s:s}", "name", name, "image", dp->image);

	if (dp->env)
		json_object_set(c, "env", dp->env);
	if (dp->resources)
		json_object_set(c, "resources", dp->resources);
	return c;
}

static char *change_cause(struct rollout *r, struct deploy *dp)
{
	struct stage *st = rollout_stage(r);

	return kpl_asprintf("kpl run %s stage %s: image %s", stage_run_id(st), stage_name(st),
			    dp->image);
}

/* Whether rel names a path below the workspace by itself: relative, and
 * no ".." component (symlinks are kpl_open_ws's). */
static bool in_workspace(const char *rel)
{
	if (!*rel || rel[0] == '/')
		return false;
	for (const char *p = rel; *p; p++)
		if ((p == rel || p[-1] == '/') && p[0] == '.' && p[1] == '.' &&
		    (p[2] == '/' || p[2] == '\0'))
			return false;
	return true;
}

/* The Deployment of create_from, with the stage's settings applied. */
static int plan_create(struct rollout *r, struct deploy *dp, struct rollout_plan *plan,
		       struct kpl_err *err)
{
	struct stage *st = rollout_stage(r);
	char *path, *text = NULL, *cause, buf[700];
	struct pl_node *root = NULL;
	json_t *m = NULL, *meta, *tmpl, *c, *ann;
	const char *kind, *name;
	size_t len = 0;
	FILE *f;
	int rc = KPL_EINVAL, fd;

	if (!dp->create_from)
		return kpl_errf(err, KPL_ENOTFOUND, "%s", rollout_not_found(r, buf, sizeof buf));
	/* kpld reads it outside the stages' sandbox: only the run's own
	 * workspace, never a path of the host or of another run. */
	if (!in_workspace(dp->create_from))
		return kpl_errf(err, KPL_EINVAL, "create_from %s: want a path in the run's "
				"workspace (relative, without ..)", dp->create_from);
	path = kpl_asprintf("%s/%s", stage_workspace(st), dp->create_from);
	/* A small file in the workspace, read at once. */
	if ((fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC)) < 0 || !(f = fdopen(fd, "rb"))) {
		if (fd >= 0)
			close(fd);
		kpl_errf(err, KPL_EINVAL, "create_from %s: cannot read it", dp->create_from);
		goto out;
	}
	text = kpl_malloc(DEPLOY_MAX_MANIFEST + 1);
	len = fread(text, 1, DEPLOY_MAX_MANIFEST + 1, f);
	fclose(f);
	if (len > DEPLOY_MAX_MANIFEST) {
		kpl_errf(err, KPL_ETOOBIG, "create_from %s: over %d bytes", dp->create_from,
			 DEPLOY_MAX_MANIFEST);
		goto out;
	}
	if (pl_doc_parse(text, len, dp->create_from, &root, err))
		goto out;
	m = kube_json_from_node(root);
	kind = json_string_value(json_object_get(m, "kind"));
	if (!kind || strcmp(kind, "Deployment") != 0) {
		kpl_errf(err, KPL_EINVAL, "create_from %s: not a Deployment (kind: %s)",
			 dp->create_from, kind ? kind : "none");
		goto out;
	}
	if (!json_is_object(meta = json_object_get(m, "metadata")))
		json_object_set_new(m, "metadata", meta = json_object());
	name = json_string_value(json_object_get(meta, "name"));
	if (name && strcmp(name, rollout_deployment(r)) != 0) {
		kpl_errf(err, KPL_EINVAL, "create_from %s: names deployment \"%s\", not \"%s\"",
			 dp->create_from, name, rollout_deployment(r));
		goto out;
	}
	json_object_set_new(meta, "name", json_string(rollout_deployment(r)));
	json_object_set_new(meta, "namespace", json_string(rollout_namespace(r)));
	if (!json_is_object(ann = json_object_get(meta, "annotations")))
		json_object_set_new(meta, "annotations", ann = json_object());
	cause = change_cause(r, dp);
	json_object_set_new(ann, "kubernetes.io/change-cause", json_string(cause));
	free(cause);
	tmpl = json_object_get(json_object_get(m, "spec"), "template");
	if (!(c = find_container(dp, tmpl, rollout_deployment(r), err)))
		goto out;
	json_object_set_new(c, "image", json_string(dp->image));
	if (dp->resources)
		json_object_set(c, "resources", dp->resources);
	if (dp->env) {
		json_t *env = json_object_get(c, "env"), *e, *have;
		size_t i, j;
		if (!json_is_array(env))
			json_object_set_new(c, "env", env = json_array());
		json_array_foreach(dp->env, i, e) {
			int set = 0;
			json_array_foreach(env, j, have)
				if (json_equal(json_object_get(have, "name"), json_object_get(e, "name"))) {
					json_array_set(env, j, e);
					set = 1;
				}
			if (!set)
				json_array_append(env, e);
		}
	}
	if (dp->replicas >= 0)
		json_object_set_new(json_object_get(m, "spec"), "replicas",
				    json_integer(dp->replicas));
	plan->action = ROLLOUT_CREATE;
	plan->body = json_dumps(m, JSON_COMPACT);
	plan->image = kpl_strdup(dp->image);
	rc = 0;
out:
	json_decref(m);
	pl_doc_free(root);
	free(text);
	free(path);
	return rc;
}

static int deploy_plan(struct rollout *r, const json_t *d, const json_t *rs,
		       struct rollout_plan *plan, struct kpl_err *err)
{
	struct deploy *dp = rollout_impl(r);
	json_t *tmpl, *c, *patch;
	const char *rv, *cname;
	char *cause;

	(void)rs;
	if (!d)
		return plan_create(r, dp, plan, err);
	tmpl = json_object_get(json_object_get(d, "spec"), "template");
	if (!(c = find_container(dp, tmpl, rollout_deployment(r), err)))
		return err->code;
	cname = json_string_value(json_object_get(c, "name"));
	if (!dp->container)
		dp->container = kpl_strdup(cname);
	/* recorded image: the changed container's */
	free(plan->previous_image);
	plan->previous_image = kpl_strdup(json_string_value(json_object_get(c, "image")) ?: "");
	plan->image = kpl_strdup(dp->image);
	if (applied(dp, d, c)) {
		plan->action = ROLLOUT_FOLLOW;
		return 0;
	}
	rv = json_string_value(json_object_get(json_object_get(d, "metadata"), "resourceVersion"));
	cause = change_cause(r, dp);
	patch = json_pack("{s:{s:s, s:{s:s}}, s:{s:{s:{s:[o]}}}}",
			  "metadata", "resourceVersion", rv ? rv : "", "annotations",
			  "kubernetes.io/change-cause", cause,
			  "spec", "template", "spec", "containers", container_patch(dp, cname));
	free(cause);
	if (!rv)
		json_object_del(json_object_get(patch, "metadata"), "resourceVersion");
	if (dp->replicas >= 0)
		json_object_set_new(json_object_get(patch, "spec"), "replicas",
				    json_integer(dp->replicas));
	plan->action = ROLLOUT_PATCH;
	plan->patch = KUBE_PATCH_STRATEGIC;
	plan->body = json_dumps(patch, JSON_COMPACT);
	json_decref(patch);
	return 0;
}

static const struct rollout_ops deploy_ops = {
	.kind = "deploy",
	.plan = deploy_plan,
	.container = deploy_container,
	.free_impl = deploy_free,
};

/* ---------------------------------------------------------------------- */
/* The kind */

static int deploy_begin(struct stage *st, int resumed, struct kpl_err *err)
{
	struct deploy *dp = kpl_calloc(1, sizeof *dp);
	const struct pl_node *env = stage_with_get(st, "env");
	const struct pl_node *res = stage_with_get(st, "resources");
	char *ns = stage_expand(st, stage_with_get(st, "namespace"));
	char *name = stage_expand(st, stage_with_get(st, "deployment"));
	char *reps = stage_expand(st, stage_with_get(st, "replicas"));
	int rc;

	dp->container = stage_expand(st, stage_with_get(st, "container"));
	dp->image = stage_expand(st, stage_with_get(st, "image"));
	dp->create_from = stage_expand(st, stage_with_get(st, "create_from"));
	dp->replicas = -1;
	if (reps) {
		char *end;
		dp->replicas = strtol(reps, &end, 10);
		if (*end || dp->replicas < 0) {
			rc = kpl_errf(err, KPL_EINVAL, "with.replicas: \"%s\" is not a whole "
				      "number >= 0", reps);
			goto fail;
		}
	}
	if (!dp->image || !*dp->image || !name || !*name) {
		rc = kpl_errf(err, KPL_EINVAL, "with.image and with.deployment must not be empty");
		goto fail;
	}
	if (env && env->type == PL_MAP) {
		dp->env = json_array();
		for (size_t i = 0; i < env->n; i++) {
			char *v = stage_expand(st, env->items[i]);
			json_array_append_new(dp->env, json_pack("{s:s, s:s}", "name",
								 env->keys[i]->scalar, "value",
								 v ? v : ""));
			free(v);
		}
	}
	if (res)
		dp->resources = kube_json_from_node(res);
	rc = rollout_start(st, &deploy_ops, ns, name, dp, resumed, err);
	if (rc)
		goto fail;
	free(ns);
	free(name);
	free(reps);
	return 0;
fail:
	deploy_free(dp);
	free(ns);
	free(name);
	free(reps);
	return rc;
}

static int deploy_start(struct stage *st, struct kpl_err *err)
{
	return deploy_begin(st, 0, err);
}

static int deploy_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t start;
	const char *resume;

	stage_resume_info(st, &pid, &start, &resume);
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was changed yet");
	return deploy_begin(st, 1, err);
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const deploy_with_keys[] = {
	"cluster", "namespace", "deployment", "container", "image", "replicas", "env",
	"resources", "create_from", NULL
};

const struct stage_kind deploy_kind = {
	.name = "deploy",
	.with_keys = deploy_with_keys,
	.check_with = deploy_check_with,
	.start = deploy_start,
	.cancel = rollout_cancel,
	.resume = deploy_resume,
	.abandon = rollout_abandon,
};
