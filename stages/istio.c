/*
 * istio.c - Istio traffic objects and the canary Deployment (istio.h).
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "stages/istio.h"

char *istio_path(const char *resource, const char *ns, const char *name)
{
	char *ens = kube_escape(ns), *ename = name ? kube_escape(name) : NULL, *p;

	if (ename)
		p = kpl_asprintf("%s/namespaces/%s/%s/%s", ISTIO_GROUP_PATH, ens, resource, ename);
	else
		p = kpl_asprintf("%s/namespaces/%s/%s", ISTIO_GROUP_PATH, ens, resource);
	free(ens);
	free(ename);
	return p;
}

bool istio_label_value_ok(const char *v)
{
	size_t n = v ? strlen(v) : 0;

	if (n == 0 || n > 63 || !isalnum((unsigned char)v[0]) ||
	    !isalnum((unsigned char)v[n - 1]))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)v[i]) && v[i] != '-' && v[i] != '_' && v[i] != '.')
			return false;
	return true;
}

static json_t *managed_meta(const char *ns, const char *name, const char *deployment)
{
	return json_pack("{s:s, s:s, s:{s:s, s:s}}", "name", name, "namespace", ns, "labels",
			 "app.kubernetes.io/managed-by", "kpl", ISTIO_LABEL_DEPLOYMENT, deployment);
}

/* ---------------------------------------------------------------------- */
/* DestinationRule */

json_t *istio_destination_rule(const char *ns, const char *name, const char *host,
			       const char *deployment, const char *label,
			       const char *stable_version)
{
	json_t *dr = json_pack("{s:s, s:s, s:o, s:{}}", "apiVersion", "networking.istio.io/v1",
			       "kind", "DestinationRule", "metadata",
			       managed_meta(ns, name, deployment), "spec");

	istio_dr_set(dr, host, label, stable_version, NULL);
	return dr;
}

/* Sets subset name to {label: version}, appending it if missing. */
static void set_subset(json_t *subsets, const char *name, const char *label,
		       const char *version)
{
	json_t *s, *want = json_pack("{s:s, s:{s:s}}", "name", name, "labels", label, version);
	size_t i;

	json_array_foreach(subsets, i, s) {
		if (json_is_string(json_object_get(s, "name")) &&
		    strcmp(json_string_value(json_object_get(s, "name")), name) == 0) {
			/* keep a trafficPolicy someone set on it */
			json_object_set(s, "labels", json_object_get(want, "labels"));
			json_decref(want);
			return;
		}
	}
	json_array_append_new(subsets, want);
}

int istio_dr_set(json_t *dr, const char *host, const char *label, const char *stable_version,
		 const char *canary_version)
{
	json_t *before = json_deep_copy(dr), *spec = json_object_get(dr, "spec"), *subsets;
	int changed;

	if (!json_is_object(spec))
		json_object_set_new(dr, "spec", spec = json_object());
	json_object_set_new(spec, "host", json_string(host));
	if (!json_is_array(subsets = json_object_get(spec, "subsets")))
		json_object_set_new(spec, "subsets", subsets = json_array());
	set_subset(subsets, ISTIO_SUBSET_STABLE, label, stable_version);
	if (canary_version)
		set_subset(subsets, ISTIO_SUBSET_CANARY, label, canary_version);
	changed = !json_equal(before, dr);
	json_decref(before);
	return changed;
}

/* ---------------------------------------------------------------------- */
/* VirtualService */

static json_t *destination(const char *host, const char *subset, long port)
{
	json_t *d = json_pack("{s:s, s:s}", "host", host, "subset", subset);

	if (port > 0)
		json_object_set_new(d, "port", json_pack("{s:I}", "number", (json_int_t)port));
	return d;
}

static json_t *primary_route(const char *host, long port)
{
	return json_pack("{s:s, s:[{s:o, s:i}]}", "name", ISTIO_ROUTE_PRIMARY, "route",
			 "destination", destination(host, ISTIO_SUBSET_STABLE, port), "weight", 100);
}

static json_t *string_array(const char *const *v, size_t n)
{
	json_t *a = json_array();

	for (size_t i = 0; i < n; i++)
		json_array_append_new(a, json_string(v[i]));
	return a;
}

static json_t *gateways_array(const char *const *gw, size_t n)
{
	json_t *a = string_array(gw, n);
	int mesh = 0;

	for (size_t i = 0; i < n; i++)
		mesh |= strcmp(gw[i], "mesh") == 0;
	if (!mesh)
		json_array_append_new(a, json_string("mesh"));
	return a;
}

json_t *istio_virtual_service(const char *ns, const char *name, const char *const *hosts,
			      size_t n_hosts, const char *const *gateways, size_t n_gateways,
			      const char *host, long port, const char *deployment)
{
	json_t *vs = json_pack("{s:s, s:s, s:o, s:{s:o, s:[o]}}", "apiVersion",
			       "networking.istio.io/v1", "kind", "VirtualService", "metadata",
			       managed_meta(ns, name, deployment), "spec", "hosts",
			       string_array(hosts, n_hosts), "http", primary_route(host, port));

	if (n_gateways)
		json_object_set_new(json_object_get(vs, "spec"), "gateways",
				    gateways_array(gateways, n_gateways));
	return vs;
}

/* The primary route of vs (borrowed) and its index, or NULL. */
static json_t *find_primary(const json_t *vs, size_t *at)
{
	json_t *http = json_object_get(json_object_get(vs, "spec"), "http"), *r;
	size_t i;

	json_array_foreach(http, i, r) {
		const char *name = json_string_value(json_object_get(r, "name"));
		if (name && strcmp(name, ISTIO_ROUTE_PRIMARY) == 0) {
			*at = i;
			return r;
		}
	}
	json_array_foreach(http, i, r) {
		json_t *m = json_object_get(r, "match");
		if (!m || (json_is_array(m) && json_array_size(m) == 0)) {
			*at = i;
			return r;
		}
	}
	return NULL;
}

int istio_vs_set_hosts(json_t *vs, const char *const *hosts, size_t n_hosts,
		       const char *const *gateways, size_t n_gateways, const char *host,
		       long port)
{
	json_t *before = json_deep_copy(vs), *spec = json_object_get(vs, "spec"), *http;
	size_t at;
	int changed;

	if (!json_is_object(spec))
		json_object_set_new(vs, "spec", spec = json_object());
	json_object_set_new(spec, "hosts", string_array(hosts, n_hosts));
	if (n_gateways)
		json_object_set_new(spec, "gateways", gateways_array(gateways, n_gateways));
	else
		json_object_del(spec, "gateways");
	if (!find_primary(vs, &at)) {
		if (!json_is_array(http = json_object_get(spec, "http")))
			json_object_set_new(spec, "http", http = json_array());
		json_array_append_new(http, primary_route(host, port));
	}
	changed = !json_equal(before, vs);
	json_decref(before);
	return changed;
}

static const char *dest_subset(const json_t *d)
{
	const char *s = json_string_value(json_object_get(json_object_get(d, "destination"),
							  "subset"));
	return s ? s : "";
}

static int no_primary(const json_t *vs, struct kpl_err *err)
{
	const char *name = json_string_value(json_object_get(json_object_get(vs, "metadata"),
							     "name"));
	return kpl_errf(err, KPL_ENOTFOUND, "virtualservice %s has no primary route to a "
			"\"stable\" subset (the mesh kind creates it)", name ? name : "?");
}

int istio_vs_weights(const json_t *vs, struct istio_weights *w, struct kpl_err *err)
{
	size_t at, i;
	json_t *r = find_primary(vs, &at), *dests, *d, *http, *h;
	int found = 0;

	memset(w, 0, sizeof *w);
	if (!r)
		return no_primary(vs, err);
	dests = json_object_get(r, "route");
	json_array_foreach(dests, i, d) {
		json_t *wt = json_object_get(d, "weight");
		int v = wt ? (int)json_integer_value(wt) : json_array_size(dests) == 1 ? 100 : 0;
		if (strcmp(dest_subset(d), ISTIO_SUBSET_STABLE) == 0) {
			w->stable = v;
			found = 1;
		} else if (strcmp(dest_subset(d), ISTIO_SUBSET_CANARY) == 0) {
			w->canary = v;
		}
	}
	if (!found)
		return no_primary(vs, err);
	http = json_object_get(json_object_get(vs, "spec"), "http");
	json_array_foreach(http, i, h) {
		const char *name = json_string_value(json_object_get(h, "name"));
		if (name && strcmp(name, ISTIO_ROUTE_HEADER) == 0)
			w->header = true;
	}
	return 0;
}

int istio_vs_set_weights(json_t *vs, int canary, const char *header, const char *value,
			 struct kpl_err *err)
{
	json_t *before, *http, *r, *dests, *d, *stable = NULL, *host, *port, *nd, *h;
	size_t at, i;
	int changed;

	if (canary < 0 || canary > 100)
		return kpl_errf(err, KPL_EINVAL, "weight %d: must be from 0 to 100", canary);
	if (!(r = find_primary(vs, &at)))
		return no_primary(vs, err);
	dests = json_object_get(r, "route");
	json_array_foreach(dests, i, d)
		if (strcmp(dest_subset(d), ISTIO_SUBSET_STABLE) == 0 && !stable)
			stable = json_object_get(d, "destination");
	if (!stable || !json_string_value(json_object_get(stable, "host")))
		return no_primary(vs, err);
	before = json_deep_copy(vs);
	host = json_object_get(stable, "host");
	port = json_object_get(stable, "port");
	/* Both destinations, in this order, and nothing else (Argo Rollouts
	 * drops unknown destinations too). */
	nd = json_array();
	d = json_pack("{s:O, s:i}", "destination", stable, "weight", 100 - canary);
	json_array_append_new(nd, d);
	d = json_pack("{s:{s:O, s:s}, s:i}", "destination", "host", host, "subset",
		      ISTIO_SUBSET_CANARY, "weight", canary);
	if (port)
		json_object_set(json_object_get(d, "destination"), "port", port);
	json_array_append_new(nd, d);
	json_object_set_new(r, "route", nd);
	if (!json_object_get(r, "name"))
		json_object_set_new(r, "name", json_string(ISTIO_ROUTE_PRIMARY));

	http = json_object_get(json_object_get(vs, "spec"), "http");
	for (i = json_array_size(http); i-- > 0;) {
		const char *name = json_string_value(json_object_get(json_array_get(http, i), "name"));
		if (name && strcmp(name, ISTIO_ROUTE_HEADER) == 0)
			json_array_remove(http, i);
	}
	if (header && value) {
		char *lower = kpl_strdup(header);
		for (char *p = lower; *p; p++)
			*p = (char)tolower((unsigned char)*p);
		h = json_pack("{s:s, s:[{s:{s:{s:s}}}], s:[{s:{s:O, s:s}}]}", "name",
			      ISTIO_ROUTE_HEADER, "match", "headers", lower, "exact", value, "route",
			      "destination", "host", host, "subset", ISTIO_SUBSET_CANARY);
		if (port)
			json_object_set(json_object_get(json_array_get(json_object_get(h, "route"), 0),
							"destination"), "port", port);
		/* first: routes are matched in order */
		json_array_insert_new(http, 0, h);
		free(lower);
	}
	changed = !json_equal(before, vs);
	json_decref(before);
	return changed;
}

/* ---------------------------------------------------------------------- */
/* The canary Deployment */

json_t *istio_find_container(const json_t *tmpl, const char *deployment,
			     const char *container, struct kpl_err *err)
{
	json_t *cs = json_object_get(json_object_get(tmpl, "spec"), "containers"), *c;
	char names[300] = "";
	size_t i, used = 0;

	if (!container && json_array_size(cs) == 1)
		return json_array_get(cs, 0);
	json_array_foreach(cs, i, c) {
		const char *nm = json_string_value(json_object_get(c, "name"));
		if (nm && container && strcmp(nm, container) == 0)
			return c;
		if (nm && used + strlen(nm) + 3 < sizeof names)
			used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
						 used ? ", " : "", nm);
	}
	if (!container)
		kpl_errf(err, KPL_EINVAL, "deployment \"%s\" has %zu containers (%s): name one "
			 "with container", deployment, json_array_size(cs), names);
	else
		kpl_errf(err, KPL_EINVAL, "deployment \"%s\" has no container \"%s\" "
			 "(containers: %s)", deployment, container, *names ? names : "none");
	return NULL;
}

static json_t *object_at(json_t *parent, const char *key)
{
	json_t *o = json_object_get(parent, key);

	if (!json_is_object(o))
		json_object_set_new(parent, key, o = json_object());
	return o;
}

json_t *istio_canary_deployment(const json_t *stable, const char *name, const char *label,
				const char *version, const char *container, const char *image,
				long replicas, struct kpl_err *err)
{
	const json_t *smeta = json_object_get(stable, "metadata");
	const char *sname = json_string_value(json_object_get(smeta, "name"));
	json_t *spec = json_deep_copy(json_object_get(stable, "spec")), *d, *meta, *tmpl, *tlabels,
	       *c;

	if (!json_is_object(spec)) {
		json_decref(spec); /* a copy of whatever spec was */
		spec = json_object();
	}
	tmpl = object_at(spec, "template");
	if (!(c = istio_find_container(tmpl, sname ? sname : "?", container, err))) {
		json_decref(spec);
		return NULL;
	}
	json_object_set_new(c, "image", json_string(image));
	tlabels = object_at(object_at(tmpl, "metadata"), "labels");
	json_object_del(tlabels, "pod-template-hash");
	json_object_set_new(tlabels, label, json_string(version));
	json_object_set_new(object_at(object_at(spec, "selector"), "matchLabels"), label,
			    json_string(version));
	json_object_set_new(spec, "replicas", json_integer(replicas));
	json_object_del(spec, "paused");
	meta = json_pack("{s:s, s:O?, s:{s:s}}", "name", name, "namespace",
			 json_object_get(smeta, "namespace"), "annotations", "kpl.dev/canary-of",
			 sname ? sname : "");
	if (json_is_object(json_object_get(smeta, "labels")))
		json_object_set_new(meta, "labels", json_deep_copy(json_object_get(smeta, "labels")));
	else
		json_object_set_new(meta, "labels", json_object());
	json_object_set_new(json_object_get(meta, "labels"), label, json_string(version));
	d = json_pack("{s:s, s:s, s:o, s:o}", "apiVersion", "apps/v1", "kind", "Deployment",
		      "metadata", meta, "spec", spec);
	return d;
}

/* ---------------------------------------------------------------------- */
/* Glue */

struct istio_op {
	struct http_client *h;
	struct kube_config *cfg;
	char *what, *path, *collection;
	istio_modify_cb modify;
	istio_done_cb done;
	void *data;
	struct http_request **slot, *req;
	int conflicts;
	int creating;
};

static void op_free(struct istio_op *op)
{
	free(op->what);
	free(op->path);
	free(op->collection);
	free(op);
}

static void op_end(struct istio_op *op, int status, const char *msg, int wrote)
{
	if (op->slot)
		*op->slot = NULL;
	op->done(status, msg, wrote, op->data);
	op_free(op);
}

/* st, when given, says what the server (or the transport: kube.c names the
 * request and the error then) said; else the code's name. */
static void op_fail(struct istio_op *op, const char *verb, int status,
		    const struct kube_status *st)
{
	char text[600], *msg;

	if (st)
		kube_status_text(st, text, sizeof text);
	else
		snprintf(text, sizeof text, "%s", kpl_strerror(status));
	msg = kpl_asprintf("%s %s: %s", verb, op->what, text);
	op_end(op, status ? status : KPL_EUNAVAILABLE, msg, 0);
	free(msg);
}

static int op_send(struct istio_op *op, const char *method, const char *path, const char *body,
		   kube_done_cb cb, struct kpl_err *err)
{
	int rc = kube_request(op->h, op->cfg, method, path, NULL, body, cb, op, &op->req, err);

	if (op->slot)
		*op->slot = rc ? NULL : op->req;
	return rc;
}

static void op_get(struct istio_op *op);

static void write_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct istio_op *op = data;
	const char *verb = op->creating ? "create" : "put";

	(void)obj;
	op->req = NULL;
	if (status) {
		op_fail(op, verb, status, st);
		return;
	}
	if (st && st->code == 409 && op->conflicts < ISTIO_MAX_CONFLICTS) {
		op->conflicts++;
		op_get(op);
		return;
	}
	if (st) {
		op_fail(op, verb, 0, st);
		return;
	}
	op_end(op, 0, NULL, 1);
}

static void get_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct istio_op *op = data;
	struct kpl_err err = { 0 };
	json_t *out = NULL;
	const json_t *cur = obj;
	char *body;
	int rc;

	op->req = NULL;
	if (status) {
		op_fail(op, "get", status, st);
		return;
	}
	if (st && st->code == 404)
		cur = NULL;
	else if (st) {
		op_fail(op, "get", 0, st);
		return;
	}
	if (op->modify(cur, &out, op->data, &err)) {
		op_end(op, err.code ? err.code : KPL_EINVAL, err.msg, 0);
		return;
	}
	if (!out) {
		op_end(op, 0, NULL, 0);
		return;
	}
	op->creating = cur == NULL;
	if (cur) {
		/* PUT needs the resourceVersion read: a concurrent writer gets
		 * us a 409 and a fresh read. */
		json_t *rv = json_object_get(json_object_get(cur, "metadata"), "resourceVersion");
		json_t *meta = json_object_get(out, "metadata");
		if (!json_is_object(meta))
			json_object_set_new(out, "metadata", meta = json_object());
		if (rv)
			json_object_set(meta, "resourceVersion", rv);
	} else {
		json_t *meta = json_object_get(out, "metadata");
		json_object_del(meta, "resourceVersion");
	}
	body = json_dumps(out, JSON_COMPACT);
	json_decref(out);
	rc = op_send(op, cur ? "PUT" : "POST", cur ? op->path : op->collection, body, write_done,
		     &err);
	free(body);
	if (rc)
		op_end(op, rc, err.msg, 0);
}

static void op_get(struct istio_op *op)
{
	struct kpl_err err = { 0 };
	int rc = op_send(op, "GET", op->path, NULL, get_done, &err);

	if (rc)
		op_end(op, rc, err.msg, 0);
}

static struct istio_op *op_new(struct http_client *h, struct kube_config *cfg, const char *what,
			       const char *path, istio_done_cb done, void *data,
			       struct http_request **req)
{
	struct istio_op *op = kpl_calloc(1, sizeof *op);

	op->h = h;
	op->cfg = cfg;
	op->what = kpl_strdup(what);
	op->path = kpl_strdup(path);
	op->done = done;
	op->data = data;
	op->slot = req;
	return op;
}

int istio_update(struct http_client *h, struct kube_config *cfg, const char *what,
		 const char *path, const char *collection, istio_modify_cb modify,
		 istio_done_cb done, void *data, struct http_request **req,
		 struct kpl_err *err)
{
	struct istio_op *op = op_new(h, cfg, what, path, done, data, req);
	int rc;

	op->collection = kpl_strdup(collection);
	op->modify = modify;
	if ((rc = op_send(op, "GET", op->path, NULL, get_done, err)))
		op_free(op);
	return rc;
}

static void delete_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct istio_op *op = data;

	(void)obj;
	op->req = NULL;
	if (status)
		op_fail(op, "delete", status, st);
	else if (st && st->code == 404)
		op_end(op, 0, NULL, 0);
	else if (st)
		op_fail(op, "delete", 0, st);
	else
		op_end(op, 0, NULL, 1);
}

int istio_delete(struct http_client *h, struct kube_config *cfg, const char *what,
		 const char *path, istio_done_cb done, void *data, struct http_request **req,
		 struct kpl_err *err)
{
	struct istio_op *op = op_new(h, cfg, what, path, done, data, req);
	int rc;

	if ((rc = op_send(op, "DELETE", op->path, NULL, delete_done, err)))
		op_free(op);
	return rc;
}
