/*
 * kube.c - the Kubernetes API client (see kube.h).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/kube.h"

#define LOG "kube"
#define KUBE_SA_DIR "/var/run/secrets/kubernetes.io/serviceaccount"
#define KUBE_TOKEN_FILE_TTL_MS 60000
#define KUBE_MAX_FILE (1024 * 1024)
#define KUBE_REV_ANNOTATION "deployment.kubernetes.io/revision"

/* ---------------------------------------------------------------------- */
/* Small helpers */

static void set_str(char **dst, const char *s)
{
	free(*dst);
	*dst = s ? kpl_strdup(s) : NULL;
}

static void free_secret(char **s)
{
	if (*s)
		memset(*s, 0, strlen(*s));
	free(*s);
	*s = NULL;
}

static char *read_file(const char *path, size_t max, size_t *len, int *err_no)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	size_t n;

	if (!f) {
		*err_no = errno;
		return NULL;
	}
	buf = kpl_malloc(max + 1);
	n = fread(buf, 1, max + 1, f);
	fclose(f);
	if (n > max) {
		free(buf);
		*err_no = EFBIG;
		return NULL;
	}
	buf[n] = '\0';
	if (len)
		*len = n;
	return buf;
}

static void trim_right(char *s)
{
	size_t n = strlen(s);

	while (n && isspace((unsigned char)s[n - 1]))
		s[--n] = '\0';
}

/* base64 (standard alphabet, padding optional, whitespace skipped).
 * Returns a malloc'd NUL-terminated buffer or NULL if it is not base64. */
static char *b64_decode(const char *in, size_t *out_len)
{
	static signed char map[256];
	static int init;
	size_t n = strlen(in), o = 0;
	unsigned acc = 0;
	int bits = 0, pad = 0;
	char *out = kpl_malloc(n / 4 * 3 + 4);

	if (!init) {
		const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
		memset(map, -1, sizeof map);
		for (int i = 0; i < 64; i++)
			map[(unsigned char)a[i]] = (signed char)i;
		init = 1;
	}
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)in[i];
		if (isspace(ch))
			continue;
		if (ch == '=') {
			pad++;
			continue;
		}
		if (pad || map[ch] < 0)
			goto bad;
		acc = (acc << 6) | (unsigned)map[ch];
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[o++] = (char)((acc >> bits) & 0xff);
		}
	}
	if (pad > 2 || bits >= 6)
		goto bad;
	out[o] = '\0';
	if (out_len)
		*out_len = o;
	return out;
bad:
	free(out);
	return NULL;
}

/* ---------------------------------------------------------------------- */
/* Configuration */

void kube_config_init(struct kube_config *c)
{
	memset(c, 0, sizeof *c);
}

void kube_config_release(struct kube_config *c)
{
	free(c->context);
	free(c->server);
	free(c->namespace);
	free(c->ca_file);
	free(c->ca_data);
	free(c->client_cert);
	free(c->client_key);
	free(c->client_cert_data);
	free_secret(&c->client_key_data);
	free_secret(&c->token);
	free(c->token_file);
	free(c->username);
	free_secret(&c->password);
	free(c->tls_server_name);
	free_secret(&c->file_token);
	kube_config_init(c);
}

static const char *scalar_of(const struct pl_node *map, const char *key)
{
	const struct pl_node *v = map && map->type == PL_MAP ? pl_map_get(map, key) : NULL;

	return v && v->type == PL_SCALAR ? v->scalar : NULL;
}

/* The entry named name in a kubeconfig list (clusters, users, contexts);
 * returns its inner mapping (entry[inner]). */
static const struct pl_node *named_entry(const struct pl_node *root, const char *list,
					 const char *inner, const char *name)
{
	const struct pl_node *l = pl_map_get(root, list);

	if (!l || l->type != PL_SEQ)
		return NULL;
	for (size_t i = 0; i < l->n; i++) {
		const char *nm = scalar_of(l->items[i], "name");
		if (nm && strcmp(nm, name) == 0) {
			const struct pl_node *in = pl_map_get(l->items[i], inner);
			return in && in->type == PL_MAP ? in : NULL;
		}
	}
	return NULL;
}

static void names_of(const struct pl_node *root, const char *list, char *buf, size_t n)
{
	const struct pl_node *l = pl_map_get(root, list);
	size_t used = 0;

	buf[0] = '\0';
	for (size_t i = 0; l && l->type == PL_SEQ && i < l->n; i++) {
		const char *nm = scalar_of(l->items[i], "name");
		if (nm && used + strlen(nm) + 3 < n)
			used += (size_t)snprintf(buf + used, n - used, "%s%s", used ? ", " : "", nm);
	}
	if (!buf[0])
		snprintf(buf, n, "none");
}

static char *resolve_path(const char *kubeconfig, const char *p)
{
	const char *slash;

	if (!p || !*p)
		return NULL;
	if (p[0] == '/' || !kubeconfig || !(slash = strrchr(kubeconfig, '/')))
		return kpl_strdup(p);
	return kpl_asprintf("%.*s/%s", (int)(slash - kubeconfig), kubeconfig, p);
}

static int is_true(const char *s)
{
	return s && (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "TRUE") == 0);
}

/* Decodes a *-data field into *dst. */
static int data_field(const struct pl_node *m, const char *key, const char *path,
		      const char *where, char **dst, struct kpl_err *err)
{
	const char *v = scalar_of(m, key);
	char *dec;

	if (!v || !*v)
		return 0;
	if (!(dec = b64_decode(v, NULL)))
		return kpl_errf(err, KPL_EINVAL, "kubeconfig %s: %s.%s: not base64", path, where,
				key);
	free_secret(dst);
	*dst = dec;
	return 0;
}

int kube_config_parse(const char *text, size_t len, const char *path, const char *context,
		      struct kube_config *out, struct kpl_err *err)
{
	struct pl_node *root = NULL;
	const struct pl_node *ctx, *cl, *us = NULL;
	const char *cluster_name, *user_name, *v;
	char names[256], cwhere[200], uwhere[200];
	int rc;

	kube_config_init(out);
	if (!path)
		path = "(kubeconfig)";
	if ((rc = pl_doc_parse(text, len, path, &root, err)) != 0)
		return rc;
	if (root->type != PL_MAP) {
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: not a mapping", path);
		goto fail;
	}
	if (!context || !*context)
		context = scalar_of(root, "current-context");
	if (!context || !*context) {
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: no current-context (name one with "
			      "`context:` in the daemon config)", path);
		goto fail;
	}
	if (!(ctx = named_entry(root, "contexts", "context", context))) {
		names_of(root, "contexts", names, sizeof names);
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: no context named \"%s\" (declared: %s)",
			      path, context, names);
		goto fail;
	}
	out->context = kpl_strdup(context);
	set_str(&out->namespace, scalar_of(ctx, "namespace"));
	cluster_name = scalar_of(ctx, "cluster");
	user_name = scalar_of(ctx, "user");
	if (!cluster_name || !(cl = named_entry(root, "clusters", "cluster", cluster_name))) {
		names_of(root, "clusters", names, sizeof names);
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: context \"%s\": no cluster named \"%s\" "
			      "(declared: %s)", path, context, cluster_name ? cluster_name : "",
			      names);
		goto fail;
	}
	if (user_name && *user_name && !(us = named_entry(root, "users", "user", user_name))) {
		names_of(root, "users", names, sizeof names);
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: context \"%s\": no user named \"%s\" "
			      "(declared: %s)", path, context, user_name, names);
		goto fail;
	}
	snprintf(cwhere, sizeof cwhere, "clusters[%s].cluster", cluster_name);
	snprintf(uwhere, sizeof uwhere, "users[%s].user", user_name ? user_name : "");
	v = scalar_of(cl, "server");
	if (!v || (strncmp(v, "https://", 8) != 0 && strncmp(v, "http://", 7) != 0)) {
		rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: %s.server: %s", path, cwhere,
			      v ? "not an http(s) URL" : "required");
		goto fail;
	}
	out->server = kpl_strdup(v);
	while (strlen(out->server) > 8 && out->server[strlen(out->server) - 1] == '/')
		out->server[strlen(out->server) - 1] = '\0';
	out->ca_file = resolve_path(path, scalar_of(cl, "certificate-authority"));
	if ((rc = data_field(cl, "certificate-authority-data", path, cwhere, &out->ca_data, err)))
		goto fail;
	out->insecure = is_true(scalar_of(cl, "insecure-skip-tls-verify"));
	set_str(&out->tls_server_name, scalar_of(cl, "tls-server-name"));
	if (us) {
		if (pl_map_get(us, "exec") || pl_map_get(us, "auth-provider")) {
			rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: %s.%s: not supported by kpl (use "
				      "a token, a client certificate or in_cluster)", path, uwhere,
				      pl_map_get(us, "exec") ? "exec" : "auth-provider");
			goto fail;
		}
		out->client_cert = resolve_path(path, scalar_of(us, "client-certificate"));
		out->client_key = resolve_path(path, scalar_of(us, "client-key"));
		if ((rc = data_field(us, "client-certificate-data", path, uwhere,
				     &out->client_cert_data, err)) ||
		    (rc = data_field(us, "client-key-data", path, uwhere, &out->client_key_data,
				     err)))
			goto fail;
		if ((v = scalar_of(us, "token")) && *v)
			out->token = kpl_strdup(v);
		out->token_file = resolve_path(path, scalar_of(us, "tokenFile"));
		set_str(&out->username, scalar_of(us, "username"));
		if ((v = scalar_of(us, "password")))
			out->password = kpl_strdup(v);
		if ((out->client_cert || out->client_cert_data) !=
		    (out->client_key || out->client_key_data)) {
			rc = kpl_errf(err, KPL_EINVAL, "kubeconfig %s: %s: a client certificate needs "
				      "its key (and a key its certificate)", path, uwhere);
			goto fail;
		}
	}
	pl_doc_free(root);
	return 0;
fail:
	pl_doc_free(root);
	kube_config_release(out);
	return rc;
}

int kube_config_load(const char *path, const char *context, struct kube_config *out,
		     struct kpl_err *err)
{
	size_t len;
	int e = 0, rc;
	char *text = read_file(path, KUBE_MAX_FILE, &len, &e);

	kube_config_init(out);
	if (!text)
		return kpl_errf(err, KPL_EINVAL, "kubeconfig %s: %s", path, strerror(e));
	rc = kube_config_parse(text, len, path, context, out, err);
	memset(text, 0, len);
	free(text);
	return rc;
}

int kube_config_in_cluster(const char *host, const char *port, const char *dir,
			   struct kube_config *out, struct kpl_err *err)
{
	char *p, *ns;
	int e = 0;

	kube_config_init(out);
	if (!host)
		host = getenv("KUBERNETES_SERVICE_HOST");
	if (!port)
		port = getenv("KUBERNETES_SERVICE_PORT");
	if (!dir)
		dir = KUBE_SA_DIR;
	if (!host || !*host || !port || !*port)
		return kpl_errf(err, KPL_EINVAL, "in_cluster: not running in a cluster "
				"(KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set)");
	/* net.JoinHostPort: brackets around an IPv6 address */
	out->server = strchr(host, ':') ? kpl_asprintf("https://[%s]:%s", host, port)
					 : kpl_asprintf("https://%s:%s", host, port);
	out->token_file = kpl_asprintf("%s/token", dir);
	out->ca_file = kpl_asprintf("%s/ca.crt", dir);
	p = read_file(out->token_file, KUBE_MAX_FILE, NULL, &e);
	if (!p) {
		kpl_errf(err, KPL_EINVAL, "in_cluster: cannot read %s: %s", out->token_file,
			 strerror(e));
		kube_config_release(out);
		return KPL_EINVAL;
	}
	free_secret(&p);
	if ((ns = getenv("POD_NAMESPACE")) && *ns) {
		out->namespace = kpl_strdup(ns);
	} else {
		char *f = kpl_asprintf("%s/namespace", dir);
		if ((out->namespace = read_file(f, 4096, NULL, &e)) != NULL)
			trim_right(out->namespace);
		free(f);
	}
	return 0;
}

int kube_config_from_endpoint(const struct cfg_endpoint *ep, const char *token,
			      struct kube_config *out, struct kpl_err *err)
{
	int rc;

	if (ep->in_cluster)
		rc = kube_config_in_cluster(NULL, NULL, NULL, out, err);
	else if (ep->kubeconfig)
		rc = kube_config_load(ep->kubeconfig, ep->context, out, err);
	else
		return kpl_errf(err, KPL_EINVAL, "config kubernetes.%s: needs kubeconfig or "
				"in_cluster", ep->name);
	if (rc == 0 && token && *token) {
		free_secret(&out->token);
		free(out->token_file);
		out->token_file = NULL;
		out->token = kpl_strdup(token);
	}
	return rc;
}

/* The bearer token to send: the fixed one, or the token file's (re-read at
 * most once a minute). */
static const char *current_token(struct kube_config *c)
{
	int64_t now = kpl_now_ms();
	int e = 0;

	if (c->token)
		return c->token;
	if (!c->token_file)
		return NULL;
	if (!c->file_token || now - c->file_token_ms >= KUBE_TOKEN_FILE_TTL_MS) {
		char *t = read_file(c->token_file, KUBE_MAX_FILE, NULL, &e);
		if (t) {
			trim_right(t);
			free_secret(&c->file_token);
			c->file_token = t;
			c->file_token_ms = now;
		} else {
			kpl_warn(LOG, "cannot read token file %s: %s", c->token_file, strerror(e));
		}
	}
	return c->file_token;
}

static char *replace_all(char *text, const char *secret)
{
	char *p, *out;
	size_t sl;

	if (!secret || strlen(secret) < 4)
		return text;
	sl = strlen(secret);
	while ((p = strstr(text, secret)) != NULL) {
		out = kpl_asprintf("%.*s***%s", (int)(p - text), text, p + sl);
		free(text);
		text = out;
	}
	return text;
}

char *kube_redact(const struct kube_config *c, const char *text)
{
	char *r = kpl_strdup(text ? text : "");

	r = replace_all(r, c->token);
	r = replace_all(r, c->file_token);
	r = replace_all(r, c->password);
	return r;
}

/* ---------------------------------------------------------------------- */
/* Status */

void kube_status_parse(long http_status, const char *body, size_t len,
		       struct kube_status *st)
{
	json_t *j = body && len ? json_loadb(body, len, 0, NULL) : NULL;
	const char *kind = j ? json_string_value(json_object_get(j, "kind")) : NULL;

	memset(st, 0, sizeof *st);
	st->code = http_status;
	if (kind && strcmp(kind, "Status") == 0) {
		const char *r = json_string_value(json_object_get(j, "reason"));
		const char *m = json_string_value(json_object_get(j, "message"));
		json_t *code = json_object_get(j, "code");
		snprintf(st->reason, sizeof st->reason, "%s", r ? r : "");
		snprintf(st->message, sizeof st->message, "%s", m ? m : "");
		if (json_is_integer(code) && json_integer_value(code) > 0)
			st->code = (long)json_integer_value(code);
	} else {
		/* Not a Status (a proxy, a load balancer): the body's start. */
		size_t n = len < 200 ? len : 200;
		snprintf(st->message, sizeof st->message, "HTTP %ld%s%.*s", http_status,
			 n ? ": " : "", (int)n, body ? body : "");
		for (char *p = st->message; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
		trim_right(st->message);
	}
	if (!st->message[0] && !st->reason[0])
		snprintf(st->message, sizeof st->message, "HTTP %ld", http_status);
	json_decref(j);
}

const char *kube_status_text(const struct kube_status *st, char *buf, size_t n)
{
	char who[200] = "";

	if (st->server[0] && st->code > 0 && strncmp(st->message, "HTTP ", 5) != 0)
		snprintf(who, sizeof who, "kubernetes %s: %ld ", st->server, st->code);
	else if (st->server[0])
		snprintf(who, sizeof who, "kubernetes %s: ", st->server);
	if (st->reason[0] && st->message[0])
		snprintf(buf, n, "%s%s: %s", who, st->reason, st->message);
	else
		snprintf(buf, n, "%s%s", who, st->reason[0] ? st->reason : st->message);
	return buf;
}

/* A transport failure (the message names the method and URL already). */
static void status_of_error(struct kube_status *st, const char *msg)
{
	memset(st, 0, sizeof *st);
	/* Cut to fit, said so to the compiler (-Wformat-truncation). */
	snprintf(st->message, sizeof st->message, "kubernetes: %.*s",
		 (int)(sizeof st->message - sizeof "kubernetes: "), msg);
}

int kube_status_is_gone(const struct kube_status *st)
{
	return st->code == 410 || strcmp(st->reason, "Expired") == 0 ||
	       strcmp(st->reason, "Gone") == 0;
}

/* ---------------------------------------------------------------------- */
/* URLs and patches */

const char *kube_patch_content_type(enum kube_patch p)
{
	switch (p) {
	case KUBE_PATCH_JSON: return "application/json-patch+json";
	case KUBE_PATCH_MERGE: return "application/merge-patch+json";
	case KUBE_PATCH_STRATEGIC: return "application/strategic-merge-patch+json";
	case KUBE_PATCH_APPLY: return "application/apply-patch+yaml";
	}
	BUG("kube_patch_content_type: %d", (int)p);
}

char *kube_escape(const char *s)
{
	char *out = kpl_malloc(strlen(s) * 3 + 1), *o = out;

	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (isalnum(c) || strchr("-._~", c))
			*o++ = (char)c;
		else
			o += sprintf(o, "%%%02X", c);
	}
	*o = '\0';
	return out;
}

char *kube_deployment_path(const char *ns, const char *name)
{
	char *ens = kube_escape(ns), *en = name ? kube_escape(name) : NULL;
	char *p = kpl_asprintf("/apis/apps/v1/namespaces/%s/deployments%s%s", ens,
			       en ? "/" : "", en ? en : "");
	free(ens);
	free(en);
	return p;
}

char *kube_replicasets_path(const char *ns)
{
	char *ens = kube_escape(ns);
	char *p = kpl_asprintf("/apis/apps/v1/namespaces/%s/replicasets", ens);
	free(ens);
	return p;
}

char *kube_label_selector(const json_t *d)
{
	json_t *ml = json_object_get(json_object_get(json_object_get(d, "spec"), "selector"),
				     "matchLabels");
	const char *k;
	json_t *v;
	char *out = NULL, *n;

	json_object_foreach(ml, k, v) {
		if (!json_is_string(v))
			continue;
		n = kpl_asprintf("%s%s%s=%s", out ? out : "", out ? "," : "", k,
				 json_string_value(v));
		free(out);
		out = n;
	}
	return out;
}

/* ---------------------------------------------------------------------- */
/* Rollout status */

static json_int_t int_at(const json_t *obj, const char *a, const char *b)
{
	return json_integer_value(json_object_get(json_object_get(obj, a), b));
}

/* Go's %q for a Kubernetes name (no control characters in one). */
static void quote(char *buf, size_t n, const char *s)
{
	size_t o = 0;

	if (n < 3)
		return;
	buf[o++] = '"';
	for (; s && *s && o + 3 < n; s++) {
		if (*s == '"' || *s == '\\')
			buf[o++] = '\\';
		buf[o++] = *s;
	}
	buf[o++] = '"';
	buf[o] = '\0';
}

enum kube_rollout kube_rollout_status(const json_t *d, char *msg, size_t n)
{
	const json_t *meta = json_object_get(d, "metadata");
	const json_t *spec = json_object_get(d, "spec");
	const json_t *status = json_object_get(d, "status");
	const json_t *conds = json_object_get(status, "conditions"), *c, *replicas;
	char name[300];
	size_t i;

	quote(name, sizeof name, json_string_value(json_object_get(meta, "name")));
	if (json_integer_value(json_object_get(meta, "generation")) >
	    json_integer_value(json_object_get(status, "observedGeneration"))) {
		snprintf(msg, n, "Waiting for deployment spec update to be observed...");
		return KUBE_ROLLOUT_WAITING;
	}
	json_array_foreach(conds, i, c) {
		const char *type = json_string_value(json_object_get(c, "type"));
		const char *reason = json_string_value(json_object_get(c, "reason"));
		if (type && strcmp(type, "Progressing") == 0) {
			/* GetDeploymentCondition: the first of that type */
			if (reason && strcmp(reason, "ProgressDeadlineExceeded") == 0) {
				snprintf(msg, n, "deployment %s exceeded its progress deadline", name);
				return KUBE_ROLLOUT_FAILED;
			}
			break;
		}
	}
	replicas = json_object_get(spec, "replicas");
	if (json_is_integer(replicas) &&
	    int_at(d, "status", "updatedReplicas") < json_integer_value(replicas)) {
		snprintf(msg, n, "Waiting for deployment %s rollout to finish: %lld out of %lld new "
			 "replicas have been updated...", name,
			 (long long)int_at(d, "status", "updatedReplicas"),
			 (long long)json_integer_value(replicas));
		return KUBE_ROLLOUT_WAITING;
	}
	if (int_at(d, "status", "replicas") > int_at(d, "status", "updatedReplicas")) {
		snprintf(msg, n, "Waiting for deployment %s rollout to finish: %lld old replicas "
			 "are pending termination...", name,
			 (long long)(int_at(d, "status", "replicas") -
				     int_at(d, "status", "updatedReplicas")));
		return KUBE_ROLLOUT_WAITING;
	}
	if (int_at(d, "status", "availableReplicas") < int_at(d, "status", "updatedReplicas")) {
		snprintf(msg, n, "Waiting for deployment %s rollout to finish: %lld of %lld updated "
			 "replicas are available...", name,
			 (long long)int_at(d, "status", "availableReplicas"),
			 (long long)int_at(d, "status", "updatedReplicas"));
		return KUBE_ROLLOUT_WAITING;
	}
	snprintf(msg, n, "deployment %s successfully rolled out", name);
	return KUBE_ROLLOUT_DONE;
}

const char *kube_revision(const json_t *obj)
{
	const char *r = json_string_value(json_object_get(
		json_object_get(json_object_get(obj, "metadata"), "annotations"),
		KUBE_REV_ANNOTATION));
	return r ? r : "";
}

const char *kube_template_image(const json_t *tmpl, const char *container)
{
	json_t *cs = json_object_get(json_object_get(tmpl, "spec"), "containers"), *c;
	size_t i;

	json_array_foreach(cs, i, c) {
		const char *nm = json_string_value(json_object_get(c, "name"));
		if (nm && strcmp(nm, container) == 0)
			return json_string_value(json_object_get(c, "image"));
	}
	return NULL;
}

/* A copy of a template without the pod-template-hash label. */
static json_t *template_sans_hash(const json_t *tmpl)
{
	json_t *t = json_deep_copy(tmpl);
	json_t *labels = json_object_get(json_object_get(t, "metadata"), "labels");

	if (labels)
		json_object_del(labels, "pod-template-hash");
	return t;
}

const json_t *kube_current_replicaset(const json_t *d, const json_t *list)
{
	const char *uid = json_string_value(
		json_object_get(json_object_get(d, "metadata"), "uid"));
	json_t *want = template_sans_hash(json_object_get(json_object_get(d, "spec"), "template"));
	const json_t *found = NULL, *rs;
	size_t i, j;

	json_array_foreach(json_object_get(list, "items"), i, rs) {
		json_t *owners = json_object_get(json_object_get(rs, "metadata"), "ownerReferences");
		json_t *o, *t;
		int owned = 0;

		json_array_foreach(owners, j, o) {
			const char *ouid = json_string_value(json_object_get(o, "uid"));
			if (json_is_true(json_object_get(o, "controller")) && uid && ouid &&
			    strcmp(uid, ouid) == 0)
				owned = 1;
		}
		if (!owned)
			continue;
		t = template_sans_hash(json_object_get(json_object_get(rs, "spec"), "template"));
		if (json_equal(t, want))
			found = rs;
		json_decref(t);
		if (found)
			break;
	}
	json_decref(want);
	return found;
}

static int plain_number(const char *s, int *is_int)
{
	char *end;

	if (!*s)
		return 0;
	errno = 0;
	(void)strtoll(s, &end, 10);
	if (!*end && !errno) {
		*is_int = 1;
		return 1;
	}
	(void)strtod(s, &end);
	*is_int = 0;
	return !*end && (isdigit((unsigned char)s[0]) || s[0] == '-' || s[0] == '.');
}

json_t *kube_json_from_node(const struct pl_node *n)
{
	json_t *j;
	int is_int;

	if (!n)
		return json_null();
	switch (n->type) {
	case PL_SCALAR:
		if (n->plain && n->style == 0) {
			const char *s = n->scalar;
			if (!strcmp(s, "null") || !strcmp(s, "~") || !*s)
				return json_null();
			if (!strcmp(s, "true") || !strcmp(s, "True"))
				return json_true();
			if (!strcmp(s, "false") || !strcmp(s, "False"))
				return json_false();
			if (plain_number(s, &is_int))
				return is_int ? json_integer(strtoll(s, NULL, 10))
					      : json_real(strtod(s, NULL));
		}
		return json_string(n->scalar);
	case PL_SEQ:
		j = json_array();
		for (size_t i = 0; i < n->n; i++)
			json_array_append_new(j, kube_json_from_node(n->items[i]));
		return j;
	case PL_MAP:
		j = json_object();
		for (size_t i = 0; i < n->n; i++)
			json_object_set_new(j, n->keys[i]->scalar, kube_json_from_node(n->items[i]));
		return j;
	}
	return json_null();
}

/* ---------------------------------------------------------------------- */
/* Requests */

struct kube_req {
	kube_done_cb done;
	void *data;
	char server[160]; /* for kube_status.server */
};

static void set_auth_tls(struct kube_config *cfg, struct http_request_options *o)
{
	const char *tok = current_token(cfg);

	if (tok && *tok) {
		o->auth.kind = HTTP_AUTH_BEARER;
		o->auth.token = tok;
	} else if (cfg->username && cfg->password) {
		o->auth.kind = HTTP_AUTH_BASIC;
		o->auth.user = cfg->username;
		o->auth.password = cfg->password;
	}
	o->tls.ca_file = cfg->ca_file;
	o->tls.ca_data = cfg->ca_data;
	o->tls.client_cert = cfg->client_cert;
	o->tls.client_key = cfg->client_key;
	o->tls.client_cert_data = cfg->client_cert_data;
	o->tls.client_key_data = cfg->client_key_data;
	o->tls.insecure = cfg->insecure;
}

static void request_done(struct http_response *resp, int status, void *data)
{
	struct kube_req *r = data;
	struct kube_status st;
	json_t *obj = NULL;

	if (status) {
		status_of_error(&st, resp->err.msg);
		r->done(status, NULL, &st, r->data);
	} else if (resp->status >= 200 && resp->status < 300) {
		json_error_t je;
		if (resp->body_len &&
		    !(obj = json_loadb(resp->body, resp->body_len, 0, &je))) {
			memset(&st, 0, sizeof st);
			st.code = resp->status;
			snprintf(st.server, sizeof st.server, "%s", r->server);
			snprintf(st.message, sizeof st.message, "reply is not JSON: %s", je.text);
			r->done(KPL_EINVAL, NULL, &st, r->data);
		} else {
			r->done(0, obj, NULL, r->data);
		}
	} else {
		kube_status_parse(resp->status, resp->body, resp->body_len, &st);
		snprintf(st.server, sizeof st.server, "%s", r->server);
		r->done(0, NULL, &st, r->data);
	}
	json_decref(obj);
	free(r);
}

int kube_request(struct http_client *h, struct kube_config *cfg, const char *method,
		 const char *path, const char *content_type, const char *body,
		 kube_done_cb done, void *data, struct http_request **out,
		 struct kpl_err *err)
{
	struct http_request_options o = { 0 };
	struct http_header hdr[2] = {
		{ "Accept", "application/json" },
		{ "Content-Type", content_type ? content_type : "application/json" },
	};
	struct kube_req *r = kpl_malloc(sizeof *r);
	char *url = kpl_asprintf("%s%s", cfg->server, path);
	int rc;

	r->done = done;
	r->data = data;
	snprintf(r->server, sizeof r->server, "%s", cfg->server);
	o.method = method;
	o.url = url;
	o.headers = hdr;
	o.n_headers = body ? 2 : 1;
	o.body = body;
	o.body_len = body ? strlen(body) : 0;
	o.on_done = request_done;
	o.data = r;
	set_auth_tls(cfg, &o);
	rc = http_request_start(h, &o, out, err);
	if (rc)
		free(r);
	free(url);
	return rc;
}

int kube_stream_lines(struct http_client *h, struct kube_config *cfg, const char *path,
		      http_line_cb on_line, http_done_cb on_done, void *data,
		      struct http_request **out, struct kpl_err *err)
{
	struct http_request_options o = { 0 };
	struct http_header hdr[] = { { "Accept", "*/*" } };
	char *url = kpl_asprintf("%s%s", cfg->server, path);
	int rc;

	o.url = url;
	o.headers = hdr;
	o.n_headers = 1;
	o.timeout_ms = HTTP_TIMEOUT_NONE;
	o.on_line = on_line;
	o.max_line = KUBE_STREAM_MAX_LINE;
	o.on_done = on_done;
	o.data = data;
	set_auth_tls(cfg, &o);
	rc = http_request_start(h, &o, out, err);
	free(url);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Watches */

int kube_watch_event_parse(const char *line, size_t n, json_t **root, const char **type,
			   json_t **object)
{
	json_t *j = json_loadb(line, n, 0, NULL);

	*root = NULL;
	if (!j || !json_is_object(j) || !json_is_string(json_object_get(j, "type")) ||
	    !json_is_object(json_object_get(j, "object"))) {
		json_decref(j);
		return KPL_EINVAL;
	}
	*root = j;
	*type = json_string_value(json_object_get(j, "type"));
	*object = json_object_get(j, "object");
	return 0;
}

char *kube_watch_url_query(const char *field_selector, const char *rv, int watch)
{
	char *fs = field_selector ? kube_escape(field_selector) : NULL;
	char *erv = rv && *rv ? kube_escape(rv) : NULL;
	char *q = kpl_asprintf("?%s%s%s%s%s%s", fs ? "fieldSelector=" : "", fs ? fs : "",
			       watch ? (fs ? "&" : "") : "",
			       watch ? "watch=1&allowWatchBookmarks=true" : "",
			       erv ? "&resourceVersion=" : "", erv ? erv : "");
	free(fs);
	free(erv);
	return q;
}

struct kube_watch {
	struct http_client *h;
	struct kube_config *cfg;
	char *path, *selector;
	char *rv;
	kube_watch_event_cb on_event;
	kube_watch_error_cb on_error;
	void *data;
	struct http_request *req; /* the list or the watch in flight */
	uv_timer_t timer;         /* backoff before a re-watch */
	int failures;             /* transport errors in a row */
	int gone;                 /* the stream said 410: relist */
	int stopped;
	int streamed;             /* events arrived on this watch request */
	int released;             /* kube_watch_stop was called */
	int closing;
	unsigned lists;
	struct kube_status st;    /* an ERROR event that is not 410 */
	int error_event;
};

static void watch_list(struct kube_watch *w);
static void watch_watch(struct kube_watch *w);

static void watch_timer_closed(uv_handle_t *h)
{
	struct kube_watch *w = h->data;

	free(w->path);
	free(w->selector);
	free(w->rv);
	free(w);
}

/* Frees w once the caller let go of it and no request is in flight. */
static void watch_maybe_free(struct kube_watch *w)
{
	if (w->released && !w->req && !w->closing) {
		w->closing = 1;
		uv_close((uv_handle_t *)&w->timer, watch_timer_closed);
	}
}

static void watch_fail(struct kube_watch *w, int status, const struct kube_status *st)
{
	if (w->stopped)
		return;
	w->stopped = 1;
	w->on_error(w, status, st, w->data);
}

static void set_rv(struct kube_watch *w, const json_t *obj)
{
	const char *rv = json_string_value(
		json_object_get(json_object_get(obj, "metadata"), "resourceVersion"));

	if (rv && *rv)
		set_str(&w->rv, rv);
}

static int deliver(struct kube_watch *w, const char *type, json_t *obj)
{
	if (w->stopped)
		return 1;
	if (w->on_event(w, type, obj, w->data)) {
		w->stopped = 1;
		return 1;
	}
	return 0;
}

static void list_done(int status, json_t *obj, const struct kube_status *st, void *data)
{
	struct kube_watch *w = data;
	json_t *item;
	size_t i;

	w->req = NULL;
	if (w->stopped)
		goto out;
	if (status || st) {
		watch_fail(w, status, st);
		goto out;
	}
	w->lists++;
	set_rv(w, obj);
	json_array_foreach(json_object_get(obj, "items"), i, item)
		if (deliver(w, "SYNC", item))
			goto out;
	watch_watch(w);
out:
	watch_maybe_free(w);
}

static int watch_line(struct http_request *req, const char *line, size_t n, void *data)
{
	struct kube_watch *w = data;
	json_t *root, *obj;
	const char *type;

	(void)req;
	if (w->stopped)
		return KPL_ECANCELLED;
	if (n == 0)
		return 0;
	if (kube_watch_event_parse(line, n, &root, &type, &obj)) {
		kpl_warn(LOG, "watch %s: an event that is not JSON, ignored", w->path);
		return 0;
	}
	w->streamed = 1;
	w->failures = 0;
	if (strcmp(type, "ERROR") == 0) {
		char *body = json_dumps(obj, JSON_COMPACT);
		kube_status_parse(500, body, strlen(body), &w->st);
		snprintf(w->st.server, sizeof w->st.server, "%s", w->cfg->server);
		free(body);
		json_decref(root);
		if (kube_status_is_gone(&w->st)) {
			w->gone = 1;
		} else {
			w->error_event = 1;
		}
		return KPL_ECANCELLED; /* ends this request; watch_done decides */
	}
	set_rv(w, obj);
	if (strcmp(type, "BOOKMARK") == 0) {
		json_decref(root);
		return 0;
	}
	if (deliver(w, type, obj)) {
		json_decref(root);
		return KPL_ECANCELLED;
	}
	json_decref(root);
	return 0;
}

static void watch_timer_fired(uv_timer_t *t)
{
	struct kube_watch *w = t->data;

	if (!w->stopped)
		watch_watch(w);
}

static void watch_done(struct http_response *resp, int status, void *data)
{
	struct kube_watch *w = data;
	struct kube_status st;

	w->req = NULL;
	if (w->stopped)
		goto out;
	if (w->gone) {
		w->gone = 0;
		kpl_info(LOG, "watch %s: resourceVersion %s is gone (410): listing again", w->path,
			 w->rv ? w->rv : "");
		watch_list(w);
		goto out;
	}
	if (w->error_event) {
		watch_fail(w, 0, &w->st);
		goto out;
	}
	if (status == 0 && resp->status >= 300) {
		kube_status_parse(resp->status, resp->body, resp->body_len, &st);
		snprintf(st.server, sizeof st.server, "%s", w->cfg->server);
		if (kube_status_is_gone(&st)) {
			watch_list(w);
			goto out;
		}
		watch_fail(w, 0, &st);
		goto out;
	}
	if (status == 0 || w->streamed) {
		/* The server ended the stream (its timeout): go on from the
		 * last resourceVersion, at once if events came, else after a
		 * pause (a server that ends every watch at once must not
		 * make this a tight loop). */
		w->failures = 0;
		if (w->streamed)
			watch_watch(w);
		else
			uv_timer_start(&w->timer, watch_timer_fired, 1000, 0);
		goto out;
	}
	if (++w->failures >= KUBE_WATCH_MAX_FAILURES) {
		status_of_error(&st, resp->err.msg);
		watch_fail(w, status, &st);
		goto out;
	}
	kpl_info(LOG, "watch %s: %s; watching again", w->path, resp->err.msg);
	uv_timer_start(&w->timer, watch_timer_fired, 250u << w->failures, 0);
out:
	watch_maybe_free(w);
}

static void watch_list(struct kube_watch *w)
{
	char *q = kube_watch_url_query(w->selector, NULL, 0);
	char *path = kpl_asprintf("%s%s", w->path, q);
	struct kpl_err err = { 0 };
	struct kube_status st;

	free(w->rv);
	w->rv = NULL;
	if (kube_request(w->h, w->cfg, "GET", path, NULL, NULL, list_done, w, &w->req, &err)) {
		memset(&st, 0, sizeof st);
		snprintf(st.message, sizeof st.message, "%s", err.msg);
		watch_fail(w, err.code, &st);
	}
	free(q);
	free(path);
}

static void watch_watch(struct kube_watch *w)
{
	char *q = kube_watch_url_query(w->selector, w->rv, 1);
	char *url = kpl_asprintf("%s%s%s", w->cfg->server, w->path, q);
	struct http_header hdr[] = { { "Accept", "application/json" } };
	struct http_request_options o = { 0 };
	struct kpl_err err = { 0 };
	struct kube_status st;

	w->streamed = 0;
	o.url = url;
	o.headers = hdr;
	o.n_headers = 1;
	o.timeout_ms = HTTP_TIMEOUT_NONE;
	o.on_line = watch_line;
	o.on_done = watch_done;
	o.data = w;
	set_auth_tls(w->cfg, &o);
	if (http_request_start(w->h, &o, &w->req, &err)) {
		memset(&st, 0, sizeof st);
		snprintf(st.message, sizeof st.message, "%s", err.msg);
		watch_fail(w, err.code, &st);
	}
	free(q);
	free(url);
}

int kube_watch_start(uv_loop_t *loop, struct http_client *h, struct kube_config *cfg,
		     const char *collection_path, const char *field_selector,
		     kube_watch_event_cb on_event, kube_watch_error_cb on_error, void *data,
		     struct kube_watch **out, struct kpl_err *err)
{
	struct kube_watch *w = kpl_calloc(1, sizeof *w);
	char *q = kube_watch_url_query(field_selector, NULL, 0);
	char *path = kpl_asprintf("%s%s", collection_path, q);
	int rc;

	w->h = h;
	w->cfg = cfg;
	w->path = kpl_strdup(collection_path);
	w->selector = field_selector ? kpl_strdup(field_selector) : NULL;
	w->on_event = on_event;
	w->on_error = on_error;
	w->data = data;
	uv_timer_init(loop, &w->timer);
	w->timer.data = w;
	rc = kube_request(h, cfg, "GET", path, NULL, NULL, list_done, w, &w->req, err);
	free(q);
	free(path);
	if (rc) {
		w->stopped = w->released = 1;
		watch_maybe_free(w);
		return rc;
	}
	*out = w;
	return 0;
}

void kube_watch_stop(struct kube_watch *w)
{
	if (w->released)
		BUG("kube_watch_stop called twice");
	w->stopped = 1;
	w->released = 1;
	uv_timer_stop(&w->timer);
	if (w->req)
		http_request_cancel(w->req);
	else
		watch_maybe_free(w);
}

unsigned kube_watch_lists(const struct kube_watch *w)
{
	return w->lists;
}
