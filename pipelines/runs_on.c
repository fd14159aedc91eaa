/*
 * runs_on.c - the shape of `runs_on` (pipelines/runs_on.h).
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "pipelines/runs_on.h"

const char *const pl_runs_on_keys[] = {
	"cluster", "namespace", "image", "resources", "service_account", "node_selector",
	"tolerations", "image_pull_timeout", "schedule_timeout", "workspace", NULL,
};

static int at(struct kpl_err *err, const char *file, const struct pl_node *n,
	      const char *path, const char *key, const char *fmt, const char *arg)
{
	char msg[300];

	snprintf(msg, sizeof msg, fmt, arg ? arg : "");
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static bool templated(const struct pl_node *n)
{
	return n->type == PL_SCALAR && strstr(n->scalar, "${{") != NULL;
}

/* RFC 1123 label: what a namespace name must be. */
static bool dns_label(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 63 || !isalnum((unsigned char)s[0]) ||
	    !isalnum((unsigned char)s[n - 1]))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) || s[i] == '-'))
			return false;
	return true;
}

/* RFC 1123 subdomain: a service account's name. */
static bool dns_subdomain(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 253 || !isalnum((unsigned char)s[0]) ||
	    !isalnum((unsigned char)s[n - 1]))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) ||
		      s[i] == '-' || s[i] == '.'))
			return false;
	return true;
}

/* A Kubernetes quantity: a number with an optional suffix (500m, 1.5Gi,
 * 2e3). Loose on purpose: the API server has the last word. */
static bool quantity(const char *s)
{
	static const char *const suffixes[] = { "", "m", "k", "M", "G", "T", "P", "E", "Ki",
						"Mi", "Gi", "Ti", "Pi", "Ei" };
	size_t i = 0, digits = 0;

	if (s[i] == '+' || s[i] == '-')
		i++;
	while (isdigit((unsigned char)s[i]) || s[i] == '.')
		digits += isdigit((unsigned char)s[i++]) != 0;
	if (!digits)
		return false;
	if (s[i] == 'e' || s[i] == 'E') {
		size_t j = i + 1;
		if (s[j] == '+' || s[j] == '-')
			j++;
		if (isdigit((unsigned char)s[j])) {
			while (isdigit((unsigned char)s[j]))
				j++;
			return s[j] == '\0';
		}
	}
	for (size_t k = 0; k < KPL_ARRAY_SIZE(suffixes); k++)
		if (!strcmp(s + i, suffixes[k]))
			return true;
	return false;
}

static int want_string(const struct pl_node *n, const char *file, const char *path,
		       const char *key, struct kpl_err *err)
{
	if (n->type != PL_SCALAR || !n->scalar[0])
		return at(err, file, n, path, key, "expected a non-empty string", NULL);
	return 0;
}

static int check_string_map(const struct pl_node *m, const char *file, const char *path,
			    const char *key, bool quantities, struct kpl_err *err)
{
	char sub[256];

	if (m->type != PL_MAP)
		return at(err, file, m, path, key, "expected a mapping", NULL);
	for (size_t i = 0; i < m->n; i++) {
		const struct pl_node *v = m->items[i];
		snprintf(sub, sizeof sub, "%s.%s", key, m->keys[i]->scalar);
		if (v->type != PL_SCALAR)
			return at(err, file, v, path, sub, "expected a string", NULL);
		if (quantities && !templated(v) && !quantity(v->scalar))
			return at(err, file, v, path, sub, "\"%s\" is not a quantity (500m, 2, "
				  "512Mi, 1Gi)", v->scalar);
	}
	return 0;
}

static int check_resources(const struct pl_node *r, const char *file, const char *path,
			   struct kpl_err *err)
{
	if (r->type != PL_MAP)
		return at(err, file, r, path, "resources", "expected a mapping with requests "
			  "and/or limits", NULL);
	for (size_t i = 0; i < r->n; i++) {
		const char *k = r->keys[i]->scalar;
		char sub[64];
		int rc;
		if (strcmp(k, "requests") && strcmp(k, "limits"))
			return at(err, file, r->keys[i], path, "resources", "unknown key \"%s\" "
				  "(allowed: requests, limits)", k);
		snprintf(sub, sizeof sub, "resources.%s", k);
		if ((rc = check_string_map(r->items[i], file, path, sub, true, err)))
			return rc;
	}
	return 0;
}

static int check_tolerations(const struct pl_node *t, const char *file, const char *path,
			     struct kpl_err *err)
{
	static const char *const keys[] = { "key", "operator", "value", "effect",
					    "tolerationSeconds" };
	char sub[64];

	if (t->type != PL_SEQ)
		return at(err, file, t, path, "tolerations", "expected a list of tolerations "
			  "({key, operator, value, effect})", NULL);
	for (size_t i = 0; i < t->n; i++) {
		const struct pl_node *e = t->items[i], *v;
		snprintf(sub, sizeof sub, "tolerations[%zu]", i);
		if (e->type != PL_MAP)
			return at(err, file, e, path, sub, "expected a mapping (key, operator, "
				  "value, effect, tolerationSeconds)", NULL);
		for (size_t j = 0; j < e->n; j++) {
			size_t k;
			for (k = 0; k < KPL_ARRAY_SIZE(keys); k++)
				if (!strcmp(e->keys[j]->scalar, keys[k]))
					break;
			if (k == KPL_ARRAY_SIZE(keys))
				return at(err, file, e->keys[j], path, sub, "unknown key \"%s\" "
					  "(allowed: key, operator, value, effect, "
					  "tolerationSeconds)", e->keys[j]->scalar);
			if (e->items[j]->type != PL_SCALAR)
				return at(err, file, e->items[j], path, sub, "%s: expected a string",
					  e->keys[j]->scalar);
		}
		v = pl_map_get(e, "operator");
		if (v && !templated(v) && strcmp(v->scalar, "Exists") && strcmp(v->scalar, "Equal"))
			return at(err, file, v, path, sub, "operator \"%s\": use Exists or Equal",
				  v->scalar);
		if (v && !strcmp(v->scalar, "Exists") && pl_map_get(e, "value"))
			return at(err, file, v, path, sub, "operator Exists takes no value%s", NULL);
		v = pl_map_get(e, "effect");
		if (v && !templated(v) && strcmp(v->scalar, "NoSchedule") &&
		    strcmp(v->scalar, "PreferNoSchedule") && strcmp(v->scalar, "NoExecute"))
			return at(err, file, v, path, sub, "effect \"%s\": use NoSchedule, "
				  "PreferNoSchedule or NoExecute", v->scalar);
		v = pl_map_get(e, "tolerationSeconds");
		if (v) {
			const char *s = v->scalar;
			bool digits = *s != '\0';
			for (; *s; s++)
				digits &= isdigit((unsigned char)*s) != 0;
			if (!digits)
				return at(err, file, v, path, sub, "tolerationSeconds: expected a "
					  "whole number of seconds%s", NULL);
		}
		if (!pl_map_get(e, "key") &&
		    !((v = pl_map_get(e, "operator")) && !strcmp(v->scalar, "Exists")))
			return at(err, file, e, path, sub, "a toleration without key must have "
				  "operator Exists (it tolerates every taint)%s", NULL);
	}
	return 0;
}

int pl_runs_on_check(const struct pl_node *n, const char *file, const char *path,
		     struct kpl_err *err)
{
	const struct pl_node *v;
	int rc;

	if (n->type == PL_SCALAR) {
		if (!strcmp(n->scalar, "local"))
			return 0;
		return at(err, file, n, path, NULL, "expected a mapping (cluster, namespace, "
			  "image, ...) or `local` for kpld's host; found \"%s\"", n->scalar);
	}
	if (n->type != PL_MAP)
		return at(err, file, n, path, NULL, "expected a mapping (cluster, namespace, "
			  "image, ...) or `local`%s", NULL);
	for (size_t i = 0; i < n->n; i++) {
		const char *k = n->keys[i]->scalar;
		const char *const *a;
		for (a = pl_runs_on_keys; *a; a++)
			if (!strcmp(*a, k))
				break;
		if (!*a)
			return at(err, file, n->keys[i], path, k, "unknown key (allowed: cluster, "
				  "namespace, image, resources, service_account, node_selector, "
				  "tolerations, image_pull_timeout, schedule_timeout, workspace)%s", NULL);
	}
	if ((v = pl_map_get(n, "cluster")) && (rc = want_string(v, file, path, "cluster", err)))
		return rc;
	if ((v = pl_map_get(n, "image")) && (rc = want_string(v, file, path, "image", err)))
		return rc;
	if (v && !templated(v) && strpbrk(v->scalar, " \t\r\n"))
		return at(err, file, v, path, "image", "an image reference has no blanks%s",
			  NULL);
	if ((v = pl_map_get(n, "namespace"))) {
		if ((rc = want_string(v, file, path, "namespace", err)))
			return rc;
		if (!templated(v) && !dns_label(v->scalar))
			return at(err, file, v, path, "namespace", "\"%s\" is not a namespace name "
				  "(lower-case letters, digits and '-', at most 63)", v->scalar);
	}
	if ((v = pl_map_get(n, "service_account"))) {
		if ((rc = want_string(v, file, path, "service_account", err)))
			return rc;
		if (!templated(v) && !dns_subdomain(v->scalar))
			return at(err, file, v, path, "service_account", "\"%s\" is not a service "
				  "account name (lower-case letters, digits, '-' and '.')",
				  v->scalar);
	}
	if ((v = pl_map_get(n, "workspace"))) {
		if ((rc = want_string(v, file, path, "workspace", err)))
			return rc;
		if (!templated(v) && !quantity(v->scalar))
			return at(err, file, v, path, "workspace", "\"%s\" is not a size (the run's "
				  "PersistentVolumeClaim's: 1Gi, 500Mi)", v->scalar);
	}
	if ((v = pl_map_get(n, "resources")) && (rc = check_resources(v, file, path, err)))
		return rc;
	if ((v = pl_map_get(n, "node_selector")) &&
	    (rc = check_string_map(v, file, path, "node_selector", false, err)))
		return rc;
	if ((v = pl_map_get(n, "tolerations")) && (rc = check_tolerations(v, file, path, err)))
		return rc;
	for (const char *const *k = (const char *const[]){ "image_pull_timeout",
							   "schedule_timeout", NULL };
	     *k; k++) {
		int64_t ms;
		const char *why;
		if (!(v = pl_map_get(n, *k)))
			continue;
		if (v->type != PL_SCALAR)
			return at(err, file, v, path, *k, "expected a duration (30s, 5m)%s", NULL);
		if (pl_duration_parse(v->scalar, &ms, &why))
			return at(err, file, v, path, *k, "%s", why);
		if (ms <= 0)
			return at(err, file, v, path, *k, "must be more than 0%s", NULL);
	}
	return 0;
}

bool pl_runs_on_is_local(const struct pl_node *n)
{
	return n && n->type == PL_SCALAR && !strcmp(n->scalar, "local");
}

const struct pl_node *pl_runs_on_get(const struct pl_node *stage_runs_on,
				     const struct pl_node *defaults, const char *key)
{
	const struct pl_node *v = NULL;

	if (stage_runs_on && stage_runs_on->type == PL_MAP)
		v = pl_map_get(stage_runs_on, key);
	if (!v && defaults && defaults->type == PL_MAP)
		v = pl_map_get(defaults, key);
	return v;
}

bool pl_runs_on_pod(const struct pl_node *stage_runs_on, const struct pl_node *defaults)
{
	if (pl_runs_on_is_local(stage_runs_on))
		return false;
	return (stage_runs_on && stage_runs_on->type == PL_MAP) ||
	       (defaults && defaults->type == PL_MAP);
}
