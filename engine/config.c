/* config.c - reading and checking the daemon's config file (config.h). */
#include "engine/config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipelines/pipeline.h"

static const char *const kind_keys[] = {
#define CFG_KIND_KEY(e, key) key,
	CFG_KIND_MAP(CFG_KIND_KEY)
#undef CFG_KIND_KEY
};

const char *cfg_kind_key(enum cfg_kind kind)
{
	return kind < CFG_KIND_LAST_ ? kind_keys[kind] : "?";
}

/* Which keys each kind takes: a table, so checks and docs agree. */
enum field { F_URL, F_USERNAME, F_PASSWORD, F_TOKEN, F_CA, F_CERT, F_KEY, F_INSECURE,
	     F_KUBECONFIG, F_CONTEXT, F_INCLUSTER, F_KIND, F_SECRET, F_BUTTONS, F_LAST_ };
static const char *const field_names[F_LAST_] = {
	"url", "username", "password", "token", "ca_file", "client_cert", "client_key",
	"insecure", "kubeconfig", "context", "in_cluster", "kind", "secret", "buttons",
};
#define B(f) (1u << (f))
static const unsigned kind_fields[CFG_KIND_LAST_] = {
	[CFG_JENKINS] = B(F_URL) | B(F_USERNAME) | B(F_PASSWORD) | B(F_TOKEN) | B(F_CA) |
			B(F_CERT) | B(F_KEY) | B(F_INSECURE),
	[CFG_REGISTRY] = B(F_URL) | B(F_USERNAME) | B(F_PASSWORD) | B(F_TOKEN) | B(F_CA) |
			 B(F_CERT) | B(F_KEY) | B(F_INSECURE),
	[CFG_KUBERNETES] = B(F_KUBECONFIG) | B(F_CONTEXT) | B(F_INCLUSTER),
	[CFG_PROMETHEUS] = B(F_URL) | B(F_USERNAME) | B(F_PASSWORD) | B(F_TOKEN) | B(F_CA) |
			   B(F_CERT) | B(F_KEY) | B(F_INSECURE),
	[CFG_NOTIFIER] = B(F_URL) | B(F_KIND) | B(F_SECRET) | B(F_CA) | B(F_INSECURE) |
			 B(F_BUTTONS),
};

struct cfg *cfg_empty(void)
{
	struct cfg *c = kpl_calloc(1, sizeof *c);
	c->path = kpl_strdup("(none)");
	return c;
}

void cfg_free(struct cfg *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++) {
		struct cfg_endpoint *e = &c->eps[i];
		free(e->name);
		free(e->url);
		free(e->username);
		free(e->password);
		free(e->token);
		free(e->ca_file);
		free(e->client_cert);
		free(e->client_key);
		free(e->kubeconfig);
		free(e->context);
		free(e->secret);
	}
	free(c->eps);
	free(c->path);
	free(c);
}

static int node_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: %s", file, n->pos.line, n->pos.col,
			path, msg);
}

static char **field_slot(struct cfg_endpoint *e, enum field f)
{
	switch (f) {
	case F_URL: return &e->url;
	case F_USERNAME: return &e->username;
	case F_PASSWORD: return &e->password;
	case F_TOKEN: return &e->token;
	case F_CA: return &e->ca_file;
	case F_CERT: return &e->client_cert;
	case F_KEY: return &e->client_key;
	case F_KUBECONFIG: return &e->kubeconfig;
	case F_CONTEXT: return &e->context;
	case F_SECRET: return &e->secret;
	default: return NULL;
	}
}

static int parse_endpoint(struct cfg *c, enum cfg_kind kind, const struct pl_node *key,
			  const struct pl_node *v, struct kpl_err *err)
{
	struct cfg_endpoint *e;
	char path[300];

	snprintf(path, sizeof path, "%s.%s", kind_keys[kind], key->scalar);
	if (v->type != PL_MAP)
		return node_err(err, c->path, v, path, "must be a mapping of settings");
	c->eps = kpl_realloc(c->eps, (c->n + 1) * sizeof *c->eps);
	e = &c->eps[c->n++];
	memset(e, 0, sizeof *e);
	e->kind = kind;
	e->name = kpl_strdup(key->scalar);
	e->line = key->pos.line;
	e->col = key->pos.col;
	e->chat_kind = CHAT_KIND_LAST;
	for (size_t i = 0; i < v->n; i++) {
		const char *k = v->keys[i]->scalar;
		const struct pl_node *val = v->items[i];
		char sub[400];
		enum field f;

		snprintf(sub, sizeof sub, "%s.%s", path, k);
		for (f = 0; f < F_LAST_; f++)
			if (strcmp(field_names[f], k) == 0)
				break;
		if (f == F_LAST_ || !(kind_fields[kind] & B(f))) {
			char allowed[300] = "";
			for (enum field g = 0; g < F_LAST_; g++)
				if (kind_fields[kind] & B(g)) {
					strcat(allowed, allowed[0] ? ", " : "");
					strcat(allowed, field_names[g]);
				}
			char msg[400];
			snprintf(msg, sizeof msg, "unknown key (allowed: %s)", allowed);
			return node_err(err, c->path, v->keys[i], sub, msg);
		}
		if (val->type != PL_SCALAR)
			return node_err(err, c->path, val, sub, "must be a single value");
		if (f == F_KIND) {
			/* Which chat service's webhook the url is: it decides the
			 * body, DingTalk's signature and how a reply is judged. */
			e->chat_kind = val->type == PL_SCALAR ? chat_kind_parse(val->scalar)
							      : CHAT_KIND_LAST;
			if (e->chat_kind == CHAT_KIND_LAST)
				return node_err(err, c->path, val, sub,
						"unknown kind (known: wecom, dingtalk, slack)");
			continue;
		}
		if (f == F_INSECURE || f == F_INCLUSTER || f == F_BUTTONS) {
			bool b;
			if (strcmp(val->scalar, "true") == 0)
				b = true;
			else if (strcmp(val->scalar, "false") == 0)
				b = false;
			else
				return node_err(err, c->path, val, sub, "must be true or false");
			if (f == F_INSECURE)
				e->insecure = b;
			else if (f == F_BUTTONS)
				e->buttons = b;
			else
				e->in_cluster = b;
			continue;
		}
		*field_slot(e, f) = kpl_strdup(val->scalar);
		if (f == F_URL && kind != CFG_NOTIFIER && strncmp(val->scalar, "http://", 7) &&
		    strncmp(val->scalar, "https://", 8))
			return node_err(err, c->path, val, sub, "must start with http:// or https://");
	}
	if (kind == CFG_KUBERNETES && !e->kubeconfig && !e->in_cluster)
		return node_err(err, c->path, v, path,
				"needs `kubeconfig` (a path) or `in_cluster: true`");
	if (kind != CFG_KUBERNETES && !e->url)
		return node_err(err, c->path, v, path, "needs `url`");
	if (kind == CFG_NOTIFIER && e->chat_kind == CHAT_KIND_LAST)
		return node_err(err, c->path, v, path,
				"needs `kind` (wecom, dingtalk or slack)");
	if (kind == CFG_NOTIFIER && e->buttons && e->chat_kind != CHAT_SLACK)
		return node_err(err, c->path, v, path,
				"`buttons` are Slack's (kind: slack)");
	if (kind == CFG_NOTIFIER && e->secret && e->chat_kind != CHAT_DINGTALK)
		return node_err(err, c->path, v, path,
				"`secret` signs DingTalk messages only (kind: dingtalk)");
	if ((e->client_cert == NULL) != (e->client_key == NULL))
		return node_err(err, c->path, v, path,
				"give both `client_cert` and `client_key`, or neither");
	return 0;
}

int cfg_load(const char *path, struct cfg **out, struct kpl_err *err)
{
	struct cfg *c;
	struct pl_node *root = NULL;
	FILE *f;
	char *text;
	size_t len;
	int rc;

	*out = NULL;
	if (!(f = fopen(path, "r")))
		return kpl_errf(err, KPL_EIO, "config %s: %s", path, strerror(errno));
	text = kpl_malloc(KPL_MAX_PIPELINE_BYTES + 1);
	len = fread(text, 1, KPL_MAX_PIPELINE_BYTES + 1, f);
	fclose(f);
	if (len > KPL_MAX_PIPELINE_BYTES) {
		free(text);
		return kpl_errf(err, KPL_ETOOBIG, "config %s: over %d bytes", path,
				KPL_MAX_PIPELINE_BYTES);
	}
	rc = pl_doc_parse(text, len, path, &root, err);
	free(text);
	if (rc)
		return rc;
	c = kpl_calloc(1, sizeof *c);
	c->path = kpl_strdup(path);
	if (root->type != PL_MAP) {
		rc = node_err(err, path, root, "(top)", "must be a mapping of sections");
		goto fail;
	}
	for (size_t i = 0; i < root->n; i++) {
		const struct pl_node *k = root->keys[i], *v = root->items[i];
		enum cfg_kind kind;

		for (kind = 0; kind < CFG_KIND_LAST_; kind++)
			if (strcmp(kind_keys[kind], k->scalar) == 0)
				break;
		if (kind == CFG_KIND_LAST_ && strcmp(k->scalar, "chatops") == 0)
			continue; /* engine/chatops.c reads it */
		if (kind == CFG_KIND_LAST_) {
			rc = node_err(err, path, k, k->scalar, "unknown section (allowed: jenkins, "
				      "registries, kubernetes, prometheus, notifiers, chatops)");
			goto fail;
		}
		if (v->type == PL_SCALAR && !v->scalar[0])
			continue; /* an empty section */
		if (v->type != PL_MAP) {
			rc = node_err(err, path, v, k->scalar, "must map names to settings");
			goto fail;
		}
		for (size_t j = 0; j < v->n; j++)
			if ((rc = parse_endpoint(c, kind, v->keys[j], v->items[j], err)) != 0)
				goto fail;
	}
	pl_doc_free(root);
	*out = c;
	return 0;
fail:
	pl_doc_free(root);
	cfg_free(c);
	return rc;
}

const struct cfg_endpoint *cfg_find(const struct cfg *c, enum cfg_kind kind,
				    const char *name)
{
	for (size_t i = 0; c && i < c->n; i++)
		if (c->eps[i].kind == kind && strcmp(c->eps[i].name, name) == 0)
			return &c->eps[i];
	return NULL;
}

const char *cfg_names(const struct cfg *c, enum cfg_kind kind, char *buf, size_t n)
{
	size_t used = 0;

	buf[0] = '\0';
	for (size_t i = 0; c && i < c->n; i++) {
		if (c->eps[i].kind != kind)
			continue;
		used += (size_t)snprintf(buf + used, used < n ? n - used : 0, "%s%s",
					 used ? ", " : "", c->eps[i].name);
	}
	if (!buf[0])
		snprintf(buf, n, "none");
	return buf;
}
