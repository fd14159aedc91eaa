/*
 * mesh.c - the `mesh` stage kind: switch a service between plain
 * Kubernetes and the Istio mesh (Kplcloud's "service mode" toggle).
 *
 *   with:
 *     cluster: prod            # a `kubernetes:` endpoint of the daemon config
 *     namespace: shop          # default: the context's namespace, else "default"
 *     deployment: web
 *     mode: mesh               # mesh | plain
 *     service: web             # the Service (and the VS/DR names); default: deployment
 *     hosts: [web.shop.svc.cluster.local]   # VirtualService hosts; default: [service]
 *     gateways: [istio-system/public]       # exposed outside: the VS binds them
 *                              # (and "mesh", so calls inside keep the routes)
 *     port: 80                 # optional destination port
 *     version_label: version   # the pod label subsets select by (default version)
 *     version: v1              # its value for the stable subset when the pod
 *                              # template has none (default: stable)
 *
 * mode mesh: the pod template gets the label sidecar.istio.io/inject="true"
 * (the label, not the deprecated annotation: external-apis.md 4.4) and the
 * version label if it had none, by a strategic merge patch carrying the
 * resourceVersion read (rollout.h: recorded first, 409 read again); then the
 * DestinationRule (subset stable by the version label) and the
 * VirtualService (hosts, gateways, a primary route 100% to stable) are
 * created, or updated in place when they exist (a canary's weights and
 * subset are left alone); then the rollout (every pod re-created with its
 * sidecar) is followed to the end.
 * mode plain: the label becomes "false", the VirtualService and
 * DestinationRule are deleted (absent ones are fine), the rollout followed.
 *
 * A template already labelled as wanted is not patched; the objects are
 * still made to match, so running the stage again repairs them. After a
 * restart it reads everything again (the same steps, nothing sent twice).
 * Release records of kind "mesh" (rollout.h); outputs revision, image, mode.
 */
#include <stdlib.h>
#include <string.h>

#include "stages/istio.h"
#include "stages/kinds.h"
#include "stages/rollout.h"

struct mesh {
	int on;
	char *service, *label, *version;
	char **hosts, **gateways;
	size_t n_hosts, n_gateways;
	long port;
	struct rollout *r;
	struct http_request *req;
	char *stable_version; /* the template's version label value */
};

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int mesh_check_with(const struct pl_node *with, const char *file, const char *path,
			   struct kpl_err *err)
{
	static const char *const scalars[] = { "cluster", "namespace", "deployment", "mode",
					       "service", "port", "version_label", "version" };

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: required (cluster, deployment, mode)",
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
		if (strcmp(k->scalar, "mode") == 0 && !strstr(v->scalar, "${{") &&
		    strcmp(v->scalar, "mesh") && strcmp(v->scalar, "plain"))
			return with_err(err, file, v, path, k->scalar, "must be mesh or plain");
		if (strcmp(k->scalar, "port") == 0 && !strstr(v->scalar, "${{")) {
			char *end;
			long n = strtol(v->scalar, &end, 10);
			if (*end || n < 1 || n > 65535)
				return with_err(err, file, v, path, k->scalar,
						"must be a port number (1-65535)");
		}
		if ((strcmp(k->scalar, "version") == 0) && !strstr(v->scalar, "${{") &&
		    !istio_label_value_ok(v->scalar))
			return with_err(err, file, v, path, k->scalar, "must be a label value "
					"(up to 63 letters, digits, '-', '_', '.')");
		if (strcmp(k->scalar, "hosts") == 0 || strcmp(k->scalar, "gateways") == 0) {
			known = 1;
			if (v->type != PL_SEQ || (v->n == 0 && k->scalar[0] == 'h'))
				return with_err(err, file, v, path, k->scalar,
						"must be a non-empty list of strings");
			for (size_t j = 0; j < v->n; j++)
				if (v->items[j]->type != PL_SCALAR || !*v->items[j]->scalar)
					return with_err(err, file, v->items[j], path, k->scalar,
							"items must be non-empty strings");
		}
		if (!known)
			return with_err(err, file, k, path, k->scalar,
					"unknown key (allowed: cluster, namespace, deployment, mode, "
					"service, hosts, gateways, port, version_label, version)");
	}
	if (!pl_map_get(with, "cluster"))
		return with_err(err, file, with, path, "cluster", "required");
	if (!pl_map_get(with, "deployment"))
		return with_err(err, file, with, path, "deployment", "required");
	if (!pl_map_get(with, "mode"))
		return with_err(err, file, with, path, "mode", "required (mesh or plain)");
	return 0;
}

static void free_strings(char **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i]);
	free(v);
}

static void mesh_free(void *impl)
{
	struct mesh *m = impl;

	free(m->service);
	free(m->label);
	free(m->version);
	free_strings(m->hosts, m->n_hosts);
	free_strings(m->gateways, m->n_gateways);
	free(m->stable_version);
	free(m);
}

/* ---------------------------------------------------------------------- */
/* The Deployment */

static int mesh_plan(struct rollout *r, const json_t *d, const json_t *rs,
		     struct rollout_plan *plan, struct kpl_err *err)
{
	struct mesh *m = rollout_impl(r);
	const json_t *tmpl, *labels;
	const char *inject, *ver, *rv, *cont, *img;
	json_t *patch, *want;
	struct stage *st = rollout_stage(r);
	char buf[700], *cause;

	(void)rs;
	if (!d)
		return kpl_errf(err, KPL_ENOTFOUND, "%s", rollout_not_found(r, buf, sizeof buf));
	tmpl = json_object_get(json_object_get(d, "spec"), "template");
	labels = json_object_get(json_object_get(tmpl, "metadata"), "labels");
	inject = json_string_value(json_object_get(labels, ISTIO_INJECT_LABEL));
	ver = json_string_value(json_object_get(labels, m->label));
	free(m->stable_version);
	m->stable_version = kpl_strdup(ver ? ver : m->version);
	cont = json_string_value(json_object_get(
		json_array_get(json_object_get(json_object_get(tmpl, "spec"), "containers"), 0),
		"name"));
	img = cont ? kube_template_image(tmpl, cont) : NULL;
	plan->image = kpl_strdup(img ? img : "");
	want = json_object();
	if (!inject || strcmp(inject, m->on ? "true" : "false") != 0)
		json_object_set_new(want, ISTIO_INJECT_LABEL, json_string(m->on ? "true" : "false"));
	if (m->on && !ver)
		json_object_set_new(want, m->label, json_string(m->version));
	if (json_object_size(want) == 0) {
		json_decref(want);
		plan->action = ROLLOUT_FOLLOW;
		return 0;
	}
	rv = json_string_value(json_object_get(json_object_get(d, "metadata"), "resourceVersion"));
	cause = kpl_asprintf("kpl run %s stage %s: mode %s", stage_run_id(st), stage_name(st),
			     m->on ? "mesh" : "plain");
	patch = json_pack("{s:{s:{s:s}}, s:{s:{s:{s:o}}}}", "metadata", "annotations",
			  "kubernetes.io/change-cause", cause, "spec", "template", "metadata",
			  "labels", want);
	free(cause);
	if (rv)
		json_object_set_new(json_object_get(patch, "metadata"), "resourceVersion",
				    json_string(rv));
	plan->action = ROLLOUT_PATCH;
	plan->patch = KUBE_PATCH_STRATEGIC;
	plan->body = json_dumps(patch, JSON_COMPACT);
	json_decref(patch);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The traffic objects, after the Deployment is patched */

static const char *deployment_of(struct mesh *m)
{
	return rollout_deployment(m->r);
}

static int dr_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct mesh *m = data;

	(void)err;
	if (!cur) {
		*out = istio_destination_rule(rollout_namespace(m->r), m->service, m->service,
					      deployment_of(m), m->label, m->stable_version);
		return 0;
	}
	*out = json_deep_copy(cur);
	/* a canary subset in it stays (a canary may be running) */
	if (!istio_dr_set(*out, m->service, m->label, m->stable_version, NULL)) {
		json_decref(*out);
		*out = NULL;
	}
	return 0;
}

static int vs_modify(const json_t *cur, json_t **out, void *data, struct kpl_err *err)
{
	struct mesh *m = data;

	(void)err;
	if (!cur) {
		*out = istio_virtual_service(rollout_namespace(m->r), m->service,
					     (const char *const *)m->hosts, m->n_hosts,
					     (const char *const *)m->gateways, m->n_gateways,
					     m->service, m->port, deployment_of(m));
		return 0;
	}
	*out = json_deep_copy(cur);
	if (!istio_vs_set_hosts(*out, (const char *const *)m->hosts, m->n_hosts,
				(const char *const *)m->gateways, m->n_gateways, m->service,
				m->port)) {
		json_decref(*out);
		*out = NULL;
	}
	return 0;
}

enum { OBJ_DR, OBJ_VS };

static void next_object(struct mesh *m, int which);

static void object_done(int status, const char *msg, int wrote, void *data, int which)
{
	struct mesh *m = data;
	struct stage *st = rollout_stage(m->r);

	if (status || !st) {
		rollout_step_done(m->r, status ? status : KPL_ECANCELLED, msg);
		return;
	}
	{
		int obj = m->on ? which : (which == OBJ_DR ? OBJ_VS : OBJ_DR);
		stage_logf(st, "%s %s/%s: %s", obj == OBJ_DR ? "destinationrule" : "virtualservice",
			   rollout_namespace(m->r), m->service,
			   m->on ? (wrote ? "written" : "already as wanted")
				 : (wrote ? "deleted" : "already absent"));
	}
	if (which == OBJ_DR)
		next_object(m, OBJ_VS);
	else
		rollout_step_done(m->r, 0, NULL);
}

static void dr_done(int status, const char *msg, int wrote, void *data)
{
	object_done(status, msg, wrote, data, OBJ_DR);
}

static void vs_done(int status, const char *msg, int wrote, void *data)
{
	object_done(status, msg, wrote, data, OBJ_VS);
}

/* mesh: the DestinationRule first (routes name its subsets), then the
 * VirtualService; plain: the VirtualService first, so that no route names a
 * subset that is gone. which counts the steps (OBJ_DR: the first). */
static void next_object(struct mesh *m, int which)
{
	struct stage *st = rollout_stage(m->r);
	struct kpl_err err = { 0 };
	const char *ns = rollout_namespace(m->r);
	int obj = m->on ? which : (which == OBJ_DR ? OBJ_VS : OBJ_DR);
	const char *res = obj == OBJ_DR ? "destinationrules" : "virtualservices";
	char *path = istio_path(res, ns, m->service), *coll = istio_path(res, ns, NULL);
	char *what = kpl_asprintf("%s %s/%s", obj == OBJ_DR ? "destinationrule" : "virtualservice",
				  ns, m->service);
	istio_done_cb done = which == OBJ_DR ? dr_done : vs_done;
	int rc;

	if (m->on)
		rc = istio_update(stage_http(st), rollout_config(m->r), what, path, coll,
				  obj == OBJ_DR ? dr_modify : vs_modify, done, m, &m->req, &err);
	else
		rc = istio_delete(stage_http(st), rollout_config(m->r), what, path, done, m,
				  &m->req, &err);
	free(path);
	free(coll);
	free(what);
	if (rc)
		rollout_step_done(m->r, rc, err.msg);
}

static void mesh_after_change(struct rollout *r)
{
	struct mesh *m = rollout_impl(r);

	m->r = r;
	stage_set_output(rollout_stage(r), "mode", m->on ? "mesh" : "plain");
	next_object(m, OBJ_DR);
}

static const struct rollout_ops mesh_ops = {
	.kind = "mesh",
	.plan = mesh_plan,
	.after_change = mesh_after_change,
	.free_impl = mesh_free,
};

/* ---------------------------------------------------------------------- */
/* The kind */

static char **expand_list(struct stage *st, const struct pl_node *seq, size_t *n)
{
	char **v;

	*n = 0;
	if (!seq || seq->type != PL_SEQ || !seq->n)
		return NULL;
	v = kpl_calloc(seq->n, sizeof *v);
	for (size_t i = 0; i < seq->n; i++)
		v[(*n)++] = stage_expand(st, seq->items[i]);
	return v;
}

static int mesh_begin(struct stage *st, int resumed, struct kpl_err *err)
{
	struct mesh *m = kpl_calloc(1, sizeof *m);
	char *ns = stage_expand(st, stage_with_get(st, "namespace"));
	char *name = stage_expand(st, stage_with_get(st, "deployment"));
	char *mode = stage_expand(st, stage_with_get(st, "mode"));
	char *port = stage_expand(st, stage_with_get(st, "port"));
	int rc = KPL_EINVAL;

	m->service = stage_expand(st, stage_with_get(st, "service"));
	m->label = stage_expand(st, stage_with_get(st, "version_label"));
	m->version = stage_expand(st, stage_with_get(st, "version"));
	m->hosts = expand_list(st, stage_with_get(st, "hosts"), &m->n_hosts);
	m->gateways = expand_list(st, stage_with_get(st, "gateways"), &m->n_gateways);
	if (!name || !*name) {
		kpl_errf(err, rc, "with.deployment must not be empty");
		goto fail;
	}
	if (!mode || (strcmp(mode, "mesh") && strcmp(mode, "plain"))) {
		kpl_errf(err, rc, "with.mode: \"%s\": must be mesh or plain", mode ? mode : "");
		goto fail;
	}
	m->on = strcmp(mode, "mesh") == 0;
	if (!m->service)
		m->service = kpl_strdup(name);
	if (!m->label)
		m->label = kpl_strdup("version");
	if (!m->version)
		m->version = kpl_strdup("stable");
	if (!istio_label_value_ok(m->version)) {
		kpl_errf(err, rc, "with.version: \"%s\" is not a label value", m->version);
		goto fail;
	}
	if (!m->hosts) {
		m->hosts = kpl_calloc(1, sizeof *m->hosts);
		m->hosts[0] = kpl_strdup(m->service);
		m->n_hosts = 1;
	}
	if (port) {
		char *end;
		m->port = strtol(port, &end, 10);
		if (*end || m->port < 1 || m->port > 65535) {
			kpl_errf(err, rc, "with.port: \"%s\" is not a port number", port);
			goto fail;
		}
	}
	if ((rc = rollout_start(st, &mesh_ops, ns, name, m, resumed, err)) != 0)
		goto fail;
	free(ns);
	free(name);
	free(mode);
	free(port);
	return 0;
fail:
	mesh_free(m);
	free(ns);
	free(name);
	free(mode);
	free(port);
	return rc;
}

static int mesh_start(struct stage *st, struct kpl_err *err)
{
	return mesh_begin(st, 0, err);
}

static int mesh_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t start;
	const char *resume;

	stage_resume_info(st, &pid, &start, &resume);
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was changed yet");
	return mesh_begin(st, 1, err);
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const mesh_with_keys[] = {
	"cluster", "namespace", "deployment", "mode", "service", "hosts", "gateways", "port",
	"version_label", "version", NULL
};

const struct stage_kind mesh_kind = {
	.name = "mesh",
	.with_keys = mesh_with_keys,
	.check_with = mesh_check_with,
	.start = mesh_start,
	.cancel = rollout_cancel,
	.resume = mesh_resume,
	.abandon = rollout_abandon,
};
