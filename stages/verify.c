/*
 * verify.c - metric analysis (struct verify_run) and the `verify` stage
 * kind around it. What it does is described in verify.h; the Prometheus
 * protocol logic is stages/prom.c, the transport base/http.c.
 */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipelines/template.h"
#include "base/http.h"
#include "stages/kinds.h"
#include "stages/prom.h"
#include "stages/verify.h"

#define LOG "verify"
/* A query or HTTP check may take this long at most (and at least the
 * minimum, however short the interval). */
#define VERIFY_REQUEST_MIN_MS 2000
#define VERIFY_REQUEST_MAX_MS 30000
#define VERIFY_MAX_HTTP_BODY (1024 * 1024)

/* ---------------------------------------------------------------------- */
/* with: */

static int node_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

static int node_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *fmt, ...)
{
	char msg[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: %s", file, n->pos.line, n->pos.col,
			path, msg);
}

static bool has_tpl(const struct pl_node *n)
{
	return n->type == PL_SCALAR && tpl_has_template(n->scalar);
}

/* A finite decimal number, all of s. */
static int parse_number(const char *s, double *out)
{
	char *end;

	errno = 0;
	if (!s || !*s)
		return KPL_EINVAL;
	*out = strtod(s, &end);
	if (*end || errno || !isfinite(*out))
		return KPL_EINVAL;
	return 0;
}

static int parse_uint(const char *s, uint32_t max, uint32_t *out)
{
	char *end;
	unsigned long long v;

	if (!s || *s < '0' || *s > '9')
		return KPL_EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (*end || errno || v > max)
		return KPL_EINVAL;
	*out = (uint32_t)v;
	return 0;
}

static bool good_name(const char *s)
{
	if (!*s || strlen(s) > 64)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
		      (*s >= '0' && *s <= '9') || *s == '-' || *s == '_' || *s == '.'))
			return false;
	return true;
}

struct canary_scan {
	bool uses;
	const char *bad; /* a canary name other than version */
};

static int scan_ref(void *data, const struct expr *ref)
{
	struct canary_scan *c = data;

	if (strcmp(ref->part[0], "canary") != 0)
		return 0;
	c->uses = true;
	if (ref->n_part != 2 || strcmp(ref->part[1], "version") != 0)
		c->bad = "only canary.version is known";
	return 0;
}

/* Which canary references s holds (syntax errors are the pipeline
 * validator's to report). */
static void scan_canary(const char *s, struct canary_scan *c)
{
	struct tpl *t;
	struct kpl_err err = { 0 };
	size_t off;

	memset(c, 0, sizeof *c);
	if (!tpl_has_template(s) ||
	    tpl_parse(s, EXPR_ROOTS_TEMPLATE | EXPR_ROOT_CANARY, &t, &off, &err) < 0)
		return;
	for (size_t i = 0; i < t->n_parts; i++)
		if (t->parts[i].expr)
			expr_walk_refs(t->parts[i].expr, scan_ref, c);
	tpl_free(t);
}

/* A scalar that must be a number (or a template, checked at start). */
static int check_number(const struct pl_node *v, const char *file, const char *path,
			struct kpl_err *err)
{
	double d;

	if (v->type != PL_SCALAR)
		return node_err(err, file, v, path, "must be a number");
	if (!has_tpl(v) && parse_number(v->scalar, &d))
		return node_err(err, file, v, path, "must be a number, not \"%.40s\"", v->scalar);
	return 0;
}

static int check_uint(const struct pl_node *v, const char *file, const char *path,
		      uint32_t min, uint32_t max, struct kpl_err *err)
{
	uint32_t u;

	if (v->type != PL_SCALAR)
		return node_err(err, file, v, path, "must be a whole number");
	if (!has_tpl(v) && (parse_uint(v->scalar, max, &u) || u < min))
		return node_err(err, file, v, path, "must be a whole number from %u to %u",
				min, max);
	return 0;
}

/* A string where canary.version may appear (uses is set if it does). */
static int check_canary_string(const struct pl_node *v, const char *file,
			       const char *path, bool *uses, struct kpl_err *err)
{
	struct canary_scan c;

	if (v->type != PL_SCALAR || !v->scalar[0])
		return node_err(err, file, v, path, "must be a non-empty string");
	scan_canary(v->scalar, &c);
	if (c.bad)
		return node_err(err, file, v, path, "%s", c.bad);
	*uses |= c.uses;
	return 0;
}

/* A string where canary references make no sense. */
static int check_plain_string(const struct pl_node *v, const char *file,
			      const char *path, struct kpl_err *err)
{
	struct canary_scan c;

	if (v->type != PL_SCALAR)
		return node_err(err, file, v, path, "must be a string");
	scan_canary(v->scalar, &c);
	if (c.uses)
		return node_err(err, file, v, path, "canary.version can only be used in "
				"queries[].query, http.url and http.body_contains");
	return 0;
}

static int check_http(const struct pl_node *h, const char *file, const char *path,
		      bool *uses, struct kpl_err *err)
{
	char sub[400];
	const struct pl_node *v;

	if (h->type != PL_MAP)
		return node_err(err, file, h, path, "must be a mapping with url, expect_status, "
				"body_contains");
	for (size_t i = 0; i < h->n; i++) {
		const char *k = h->keys[i]->scalar;
		if (strcmp(k, "url") && strcmp(k, "expect_status") && strcmp(k, "body_contains"))
			return node_err(err, file, h->keys[i], path, "unknown key \"%s\" (allowed: "
					"url, expect_status, body_contains)", k);
	}
	if (!(v = pl_map_get(h, "url")))
		return node_err(err, file, h, path, "needs url");
	snprintf(sub, sizeof sub, "%s.url", path);
	if (check_canary_string(v, file, sub, uses, err))
		return KPL_EINVAL;
	if (!has_tpl(v) && strncmp(v->scalar, "http://", 7) && strncmp(v->scalar, "https://", 8))
		return node_err(err, file, v, sub, "must be an http:// or https:// URL");
	snprintf(sub, sizeof sub, "%s.expect_status", path);
	if ((v = pl_map_get(h, "expect_status")) && check_uint(v, file, sub, 100, 599, err))
		return KPL_EINVAL;
	snprintf(sub, sizeof sub, "%s.body_contains", path);
	if ((v = pl_map_get(h, "body_contains")) && check_canary_string(v, file, sub, uses, err))
		return KPL_EINVAL;
	return 0;
}

static int check_queries(const struct pl_node *qs, const char *file, const char *path,
			 bool have_http, bool *uses, struct kpl_err *err)
{
	char sub[340], key[400];

	if (qs->type != PL_SEQ || qs->n == 0)
		return node_err(err, file, qs, path, "must be a non-empty list of "
				"{ name, query, min, max }");
	if (qs->n > VERIFY_MAX_CHECKS)
		return node_err(err, file, qs, path, "at most %d queries", VERIFY_MAX_CHECKS);
	for (size_t i = 0; i < qs->n; i++) {
		const struct pl_node *q = qs->items[i], *name, *v;
		snprintf(sub, sizeof sub, "%s[%zu]", path, i);
		if (q->type != PL_MAP)
			return node_err(err, file, q, sub, "must be a mapping { name, query, min, max }");
		for (size_t j = 0; j < q->n; j++) {
			const char *k = q->keys[j]->scalar;
			if (strcmp(k, "name") && strcmp(k, "query") && strcmp(k, "min") &&
			    strcmp(k, "max"))
				return node_err(err, file, q->keys[j], sub, "unknown key \"%s\" "
						"(allowed: name, query, min, max)", k);
		}
		if (!(name = pl_map_get(q, "name")))
			return node_err(err, file, q, sub, "needs a name");
		snprintf(key, sizeof key, "%s.name", sub);
		if (name->type != PL_SCALAR || !good_name(name->scalar))
			return node_err(err, file, name, key, "must be 1 to 64 letters, digits, "
					"'-', '_' or '.'");
		if (have_http && !strcmp(name->scalar, "http"))
			return node_err(err, file, name, key, "\"http\" names the http check");
		for (size_t j = 0; j < i; j++) {
			const struct pl_node *o = pl_map_get(qs->items[j], "name");
			if (o && o->type == PL_SCALAR && !strcmp(o->scalar, name->scalar))
				return node_err(err, file, name, key, "\"%s\" is used twice",
						name->scalar);
		}
		if (!(v = pl_map_get(q, "query")))
			return node_err(err, file, q, sub, "needs a query (PromQL)");
		snprintf(key, sizeof key, "%s.query", sub);
		if (check_canary_string(v, file, key, uses, err))
			return KPL_EINVAL;
		if (strlen(v->scalar) > PROM_MAX_QUERY)
			return node_err(err, file, v, key, "longer than %d bytes", PROM_MAX_QUERY);
		snprintf(key, sizeof key, "%s.min", sub);
		if ((v = pl_map_get(q, "min")) && check_number(v, file, key, err))
			return KPL_EINVAL;
		snprintf(key, sizeof key, "%s.max", sub);
		if ((v = pl_map_get(q, "max")) && check_number(v, file, key, err))
			return KPL_EINVAL;
	}
	return 0;
}

int verify_check_node(const struct pl_node *node, const char *file, const char *path,
		      bool allow_canary_version, struct kpl_err *err)
{
	static const char *const keys[] = {
		"prometheus", "queries", "interval", "count", "failure_limit",
		"inconclusive_limit", "http", "canary_version",
	};
	char sub[300];
	const struct pl_node *v, *qs, *http;
	bool uses = false;
	int64_t ms;
	const char *why;

	if (node->type != PL_MAP)
		return node_err(err, file, node, path, "must be a mapping");
	for (size_t i = 0; i < node->n; i++) {
		const char *k = node->keys[i]->scalar;
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(keys); j++)
			if (!strcmp(k, keys[j]))
				break;
		if (j == KPL_ARRAY_SIZE(keys) || (!allow_canary_version &&
						  !strcmp(k, "canary_version")))
			return node_err(err, file, node->keys[i], path, "unknown key \"%s\" "
					"(allowed: prometheus, queries, interval, count, "
					"failure_limit, inconclusive_limit, http%s)", k,
					allow_canary_version ? ", canary_version" : "");
	}
	qs = pl_map_get(node, "queries");
	http = pl_map_get(node, "http");
	if (!qs && !http)
		return node_err(err, file, node, path, "needs queries (PromQL checks), an http "
				"check, or both");
	if (qs) {
		snprintf(sub, sizeof sub, "%s.queries", path);
		if (check_queries(qs, file, sub, http != NULL, &uses, err))
			return KPL_EINVAL;
		snprintf(sub, sizeof sub, "%s.prometheus", path);
		v = pl_map_get(node, "prometheus");
		/* A canary names one endpoint for all its analyses. */
		if (!v && allow_canary_version)
			return node_err(err, file, node, path, "queries need prometheus: the name "
					"of a prometheus endpoint in the daemon config");
		if (v && (v->type != PL_SCALAR || !v->scalar[0]))
			return node_err(err, file, v, sub, "must be the name of a prometheus "
					"endpoint in the daemon config");
	} else if ((v = pl_map_get(node, "prometheus"))) {
		snprintf(sub, sizeof sub, "%s.prometheus", path);
		return node_err(err, file, v, sub, "only used by queries, and there are none");
	}
	if (http) {
		snprintf(sub, sizeof sub, "%s.http", path);
		if (check_http(http, file, sub, &uses, err))
			return KPL_EINVAL;
	}
	snprintf(sub, sizeof sub, "%s.interval", path);
	if (!(v = pl_map_get(node, "interval")))
		return node_err(err, file, node, path, "needs interval (the time between rounds: "
				"30s, 1m)");
	if (check_plain_string(v, file, sub, err))
		return KPL_EINVAL;
	if (!has_tpl(v) && pl_duration_parse(v->scalar, &ms, &why))
		return node_err(err, file, v, sub, "%s", why);
	if (!has_tpl(v) && ms <= 0)
		return node_err(err, file, v, sub, "must be more than 0");
	snprintf(sub, sizeof sub, "%s.count", path);
	if (!(v = pl_map_get(node, "count")))
		return node_err(err, file, node, path, "needs count (the number of rounds)");
	if (check_uint(v, file, sub, 1, VERIFY_MAX_COUNT, err))
		return KPL_EINVAL;
	snprintf(sub, sizeof sub, "%s.failure_limit", path);
	if (!(v = pl_map_get(node, "failure_limit")))
		return node_err(err, file, node, path, "needs failure_limit (failed rounds "
				"allowed; 0: none)");
	if (check_uint(v, file, sub, 0, VERIFY_MAX_COUNT, err))
		return KPL_EINVAL;
	snprintf(sub, sizeof sub, "%s.inconclusive_limit", path);
	if ((v = pl_map_get(node, "inconclusive_limit")) &&
	    check_uint(v, file, sub, 0, VERIFY_MAX_COUNT, err))
		return KPL_EINVAL;
	if ((v = pl_map_get(node, "canary_version"))) {
		snprintf(sub, sizeof sub, "%s.canary_version", path);
		if (check_plain_string(v, file, sub, err))
			return KPL_EINVAL;
	} else if (uses && allow_canary_version) {
		return node_err(err, file, node, path, "${{ canary.version }} is used: set "
				"canary_version (the version under test)");
	}
	return 0;
}

static int verify_check_with(const struct pl_node *with, const char *file,
			     const char *path, struct kpl_err *err)
{
	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a verify stage needs `with` with "
				"queries or http, interval, count and failure_limit", file, path);
	return verify_check_node(with, file, path, true, err);
}

/* ---------------------------------------------------------------------- */
/* Loading an analysis */

void verify_config_release(struct verify_config *cfg)
{
	for (size_t i = 0; i < cfg->n_queries; i++) {
		free(cfg->queries[i].name);
		free(cfg->queries[i].query);
	}
	free(cfg->queries);
	if (cfg->http) {
		free(cfg->http->url);
		free(cfg->http->body_contains);
		free(cfg->http);
	}
	free(cfg->canary_version);
	memset(cfg, 0, sizeof *cfg);
}

/* The expanded text of node[key] into *out (NULL if absent). */
static char *get(struct stage *st, const struct pl_node *node, const char *key)
{
	return stage_expand(st, pl_map_get(node, key));
}

static int load_uint(struct stage *st, const struct pl_node *node, const char *path,
		     const char *key, uint32_t min, uint32_t max, uint32_t *out,
		     struct kpl_err *err)
{
	char *s = get(st, node, key);
	int rc = 0;

	if (s && (parse_uint(s, max, out) || *out < min))
		rc = kpl_errf(err, KPL_EINVAL, "%s.%s: must be a whole number from %u to %u, "
			      "not \"%.40s\"", path, key, min, max, s);
	free(s);
	return rc;
}

static int load_number(struct stage *st, const struct pl_node *node, const char *path,
		       const char *key, bool *has, double *out, struct kpl_err *err)
{
	char *s = get(st, node, key);
	int rc = 0;

	*has = s != NULL;
	if (s && parse_number(s, out))
		rc = kpl_errf(err, KPL_EINVAL, "%s.%s: must be a number, not \"%.40s\"", path,
			      key, s);
	free(s);
	return rc;
}

int verify_config_load(struct stage *st, const struct pl_node *node, const char *path,
		       const char *canary_version, struct verify_config *cfg,
		       struct kpl_err *err)
{
	const struct pl_node *qs = pl_map_get(node, "queries"), *h = pl_map_get(node, "http");
	char sub[300], *s;
	const char *why;
	int rc;

	memset(cfg, 0, sizeof *cfg);
	if (qs && qs->type == PL_SEQ) {
		cfg->queries = kpl_calloc(qs->n ? qs->n : 1, sizeof *cfg->queries);
		for (size_t i = 0; i < qs->n; i++) {
			struct verify_query *q = &cfg->queries[cfg->n_queries++];
			snprintf(sub, sizeof sub, "%s.queries[%zu]", path, i);
			q->name = get(st, qs->items[i], "name");
			q->query = get(st, qs->items[i], "query");
			if ((rc = load_number(st, qs->items[i], sub, "min", &q->has_min, &q->min,
					      err)) ||
			    (rc = load_number(st, qs->items[i], sub, "max", &q->has_max, &q->max,
					      err)))
				goto fail;
		}
	}
	if (h && h->type == PL_MAP) {
		uint32_t code = 200;
		cfg->http = kpl_calloc(1, sizeof *cfg->http);
		cfg->http->url = get(st, h, "url");
		cfg->http->body_contains = get(st, h, "body_contains");
		snprintf(sub, sizeof sub, "%s.http", path);
		if ((rc = load_uint(st, h, sub, "expect_status", 100, 599, &code, err)))
			goto fail;
		cfg->http->expect_status = code;
	}
	s = get(st, node, "interval");
	rc = s ? pl_duration_parse(s, &cfg->interval_ms, &why) : KPL_EINVAL;
	if (rc || cfg->interval_ms <= 0) {
		rc = kpl_errf(err, KPL_EINVAL, "%s.interval: %s", path,
			      !s ? "required" : rc ? why : "must be more than 0");
		free(s);
		goto fail;
	}
	free(s);
	if ((rc = load_uint(st, node, path, "count", 1, VERIFY_MAX_COUNT, &cfg->count, err)) ||
	    (rc = load_uint(st, node, path, "failure_limit", 0, VERIFY_MAX_COUNT,
			    &cfg->failure_limit, err)))
		goto fail;
	cfg->inconclusive_limit = cfg->failure_limit;
	if ((rc = load_uint(st, node, path, "inconclusive_limit", 0, VERIFY_MAX_COUNT,
			    &cfg->inconclusive_limit, err)))
		goto fail;
	if (!cfg->count) {
		rc = kpl_errf(err, KPL_EINVAL, "%s.count: required", path);
		goto fail;
	}
	cfg->canary_version = get(st, node, "canary_version");
	if (!cfg->canary_version && canary_version)
		cfg->canary_version = kpl_strdup(canary_version);
	return 0;
fail:
	verify_config_release(cfg);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Progress */

void verify_progress_release(struct verify_progress *p)
{
	for (size_t i = 0; i < p->n_last; i++)
		free(p->last[i]);
	free(p->last);
	memset(p, 0, sizeof *p);
}

static size_t n_slots(const struct verify_config *cfg)
{
	return cfg->n_queries + (cfg->http ? 1 : 0);
}

char *verify_progress_format(const struct verify_progress *p,
			     const struct verify_config *cfg)
{
	json_t *j = json_object(), *last = json_array();
	char *s;

	(void)cfg;
	json_object_set_new(j, "round", json_integer(p->round));
	json_object_set_new(j, "failures", json_integer(p->failures));
	json_object_set_new(j, "inconclusive", json_integer(p->inconclusive));
	json_object_set_new(j, "at", json_integer(p->last_round_ms));
	for (size_t i = 0; i < p->n_last; i++)
		json_array_append_new(last, p->last[i] ? json_string(p->last[i]) : json_null());
	json_object_set_new(j, "last", last);
	s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	return s;
}

int verify_progress_parse(const char *text, const struct verify_config *cfg,
			  struct verify_progress *p)
{
	json_t *j = text && *text ? json_loads(text, 0, NULL) : NULL, *last;
	json_int_t round, fails, inc, at;

	memset(p, 0, sizeof *p);
	if (!json_is_object(j) ||
	    json_unpack(j, "{s:I, s:I, s:I, s:I}", "round", &round, "failures", &fails,
			"inconclusive", &inc, "at", &at) ||
	    round < 0 || fails < 0 || inc < 0 || round > VERIFY_MAX_COUNT ||
	    fails > round || inc > round) {
		json_decref(j);
		return KPL_EINVAL;
	}
	p->round = (uint32_t)round;
	p->failures = (uint32_t)fails;
	p->inconclusive = (uint32_t)inc;
	p->last_round_ms = at;
	p->n_last = n_slots(cfg);
	p->last = kpl_calloc(p->n_last ? p->n_last : 1, sizeof *p->last);
	last = json_object_get(j, "last");
	if (json_array_size(last) == p->n_last)
		for (size_t i = 0; i < p->n_last; i++) {
			const char *s = json_string_value(json_array_get(last, i));
			p->last[i] = s ? kpl_strdup(s) : NULL;
		}
	json_decref(j);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Measurements: replies in, verdicts and lines out (no I/O) */

enum verdict { V_PASS, V_FAIL, V_INCONCLUSIVE, V_ERROR, V_LAST_ };

struct measure {
	enum verdict verdict;
	char value[48];   /* as shown and kept: "99.2", "no data", "error", "200" */
	char line[1100];  /* the log line, without the round */
	char reason[900]; /* not a pass: what the final message says */
};

static void thresholds(const struct verify_query *q, char *buf, size_t n)
{
	char a[48], b[48];

	if (q->has_min && q->has_max)
		snprintf(buf, n, "min %s, max %s", prom_format_value(q->min, a, sizeof a),
			 prom_format_value(q->max, b, sizeof b));
	else if (q->has_min)
		snprintf(buf, n, "min %s", prom_format_value(q->min, a, sizeof a));
	else if (q->has_max)
		snprintf(buf, n, "max %s", prom_format_value(q->max, a, sizeof a));
	else
		snprintf(buf, n, "no threshold");
}

/* rc: what the transport or prom_parse_reply returned; msg its message. */
static void judge_query(const struct verify_query *q, int rc, const struct prom_sample *s,
			const char *msg, struct measure *m)
{
	char thr[120], v[48];

	memset(m, 0, sizeof *m);
	if (rc == KPL_EINVAL) {
		m->verdict = V_ERROR;
		snprintf(m->value, sizeof m->value, "error");
		snprintf(m->line, sizeof m->line, "%s = error: %s", q->name, msg);
		snprintf(m->reason, sizeof m->reason, "%s: %s", q->name, msg);
		return;
	}
	if (rc) {
		m->verdict = V_INCONCLUSIVE;
		snprintf(m->value, sizeof m->value, "no data");
		snprintf(m->line, sizeof m->line, "%s = no data (%s): inconclusive", q->name, msg);
		snprintf(m->reason, sizeof m->reason, "no data from %s (%s)", q->name, msg);
		return;
	}
	if (s->outcome == PROM_NO_DATA) {
		m->verdict = V_INCONCLUSIVE;
		snprintf(m->value, sizeof m->value, "no data");
		snprintf(m->line, sizeof m->line, "%s = no data (%s): inconclusive", q->name,
			 s->why);
		snprintf(m->reason, sizeof m->reason, "no data from %s (%s)", q->name, s->why);
		return;
	}
	thresholds(q, thr, sizeof thr);
	prom_format_value(s->value, v, sizeof v);
	snprintf(m->value, sizeof m->value, "%s", v);
	if (q->has_min && s->value < q->min) {
		char b[48];
		m->verdict = V_FAIL;
		snprintf(m->reason, sizeof m->reason, "%s = %s, below min %s", q->name, v,
			 prom_format_value(q->min, b, sizeof b));
	} else if (q->has_max && s->value > q->max) {
		char b[48];
		m->verdict = V_FAIL;
		snprintf(m->reason, sizeof m->reason, "%s = %s, above max %s", q->name, v,
			 prom_format_value(q->max, b, sizeof b));
	} else {
		m->verdict = V_PASS;
	}
	snprintf(m->line, sizeof m->line, "%s = %s (%s) %s", q->name, v, thr,
		 m->verdict == V_PASS ? "pass" : "fail");
}

/* shown: "GET URL" with the URL redacted; status < 0: no response (msg). */
static void judge_http(const struct verify_http_check *h, const char *body_contains,
		       const char *shown, int rc, long status, const char *body,
		       const char *msg, struct measure *m)
{
	char expect[200];

	memset(m, 0, sizeof *m);
	if (body_contains)
		snprintf(expect, sizeof expect, "expect %ld, body contains \"%.120s\"",
			 h->expect_status, body_contains);
	else
		snprintf(expect, sizeof expect, "expect %ld", h->expect_status);
	if (rc) {
		m->verdict = V_FAIL;
		snprintf(m->value, sizeof m->value, "error");
		snprintf(m->line, sizeof m->line, "http %s = error (%s): fail", shown, msg);
		snprintf(m->reason, sizeof m->reason, "http %s: %s", shown, msg);
		return;
	}
	snprintf(m->value, sizeof m->value, "%ld", status);
	if (status != h->expect_status) {
		m->verdict = V_FAIL;
		snprintf(m->line, sizeof m->line, "http %s = %ld (%s) fail", shown, status, expect);
		snprintf(m->reason, sizeof m->reason, "http %s = %ld, expected %ld", shown, status,
			 h->expect_status);
	} else if (body_contains && !strstr(body, body_contains)) {
		m->verdict = V_FAIL;
		snprintf(m->line, sizeof m->line, "http %s = %ld (%s) fail: the body does not "
			 "contain it", shown, status, expect);
		snprintf(m->reason, sizeof m->reason, "http %s = %ld but the body does not "
			 "contain \"%.120s\"", shown, status, body_contains);
	} else {
		m->verdict = V_PASS;
		snprintf(m->line, sizeof m->line, "http %s = %ld (%s) pass", shown, status, expect);
	}
}

/*
 * Counts a finished round into p and says whether the analysis ends: 1
 * with *state and msg set, or 0 to go on.
 */
static int decide(const struct verify_config *cfg, struct verify_progress *p,
		  const struct measure *m, size_t n, Kpl__V1__StageState *state,
		  char *msg, size_t msg_n)
{
	const struct measure *err = NULL, *fail = NULL, *inc = NULL;

	for (size_t i = 0; i < n; i++) {
		if (m[i].verdict == V_ERROR && !err)
			err = &m[i];
		if (m[i].verdict == V_FAIL && !fail)
			fail = &m[i];
		if (m[i].verdict == V_INCONCLUSIVE && !inc)
			inc = &m[i];
	}
	p->round++;
	*state = KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
	if (err) {
		snprintf(msg, msg_n, "verify failed: %s", err->reason);
		return 1;
	}
	if (fail) {
		if (++p->failures > cfg->failure_limit) {
			snprintf(msg, msg_n, "verify failed: %s (%u failed round%s, limit %u)",
				 fail->reason, p->failures, p->failures == 1 ? "" : "s",
				 cfg->failure_limit);
			return 1;
		}
	} else if (inc) {
		if (++p->inconclusive > cfg->inconclusive_limit) {
			snprintf(msg, msg_n, "inconclusive: %s; %u inconclusive round%s, limit %u",
				 inc->reason, p->inconclusive, p->inconclusive == 1 ? "" : "s",
				 cfg->inconclusive_limit);
			return 1;
		}
	}
	if (p->round >= cfg->count) {
		*state = KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED;
		snprintf(msg, msg_n, "verify passed: %u round%s, %u failed, %u inconclusive",
			 p->round, p->round == 1 ? "" : "s", p->failures, p->inconclusive);
		return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The analysis on the loop */

struct slot {
	struct verify_run *r;
	size_t i;                 /* query index; n_queries: the http check */
	struct http_request *req; /* in flight, else NULL */
	struct measure m;
};

struct verify_run {
	struct stage *st;
	struct verify_config cfg;
	struct stage_endpoint prom;
	char **queries;       /* cfg's queries with canary.version filled in */
	char *http_url;       /* the same for http */
	char *http_body;
	char *http_shown;     /* "GET URL", redacted */
	const char **names;   /* per slot: the query's name, or "http" */
	struct verify_progress p;
	struct slot *slots;
	size_t n_slots;
	size_t pending;       /* requests in flight */
	int64_t round_start_ms;
	uv_timer_t timer;
	bool ending;          /* no more rounds */
	bool reported;        /* on_done ran (or never will: abandoned) */
	bool closing;
	Kpl__V1__StageState end_state;
	char end_msg[1400];
	void (*on_round)(struct verify_run *, const struct verify_progress *, void *);
	void (*on_done)(struct verify_run *, const struct verify_result *, void *);
	void *data;
};

static void vr_closed(uv_handle_t *h)
{
	struct verify_run *r = h->data;

	for (size_t i = 0; i < r->cfg.n_queries; i++)
		free(r->queries ? r->queries[i] : NULL);
	free(r->queries);
	free(r->http_url);
	free(r->http_body);
	free(r->http_shown);
	verify_config_release(&r->cfg);
	stage_endpoint_release(&r->prom);
	verify_progress_release(&r->p);
	free(r->slots);
	free(r->names);
	free(r);
}

static void vr_maybe_free(struct verify_run *r)
{
	if (!r->ending || !r->reported || r->pending || r->closing)
		return;
	r->closing = true;
	uv_close((uv_handle_t *)&r->timer, vr_closed);
}

static void vr_report(struct verify_run *r)
{
	if (!r->reported) {
		struct verify_result res = { r->end_state, r->end_msg, &r->p, r->names };
		r->reported = true;
		if (r->on_done)
			r->on_done(r, &res, r->data);
	}
	vr_maybe_free(r);
}

static void vr_stop_requests(struct verify_run *r)
{
	for (size_t i = 0; i < r->n_slots; i++)
		if (r->slots[i].req)
			http_request_cancel(r->slots[i].req);
	uv_timer_stop(&r->timer);
}

static void round_start(struct verify_run *r);

static void on_timer(uv_timer_t *t)
{
	struct verify_run *r = t->data;

	if (r->ending)
		vr_report(r);
	else
		round_start(r);
}

static void round_end(struct verify_run *r)
{
	struct measure *m = kpl_calloc(r->n_slots, sizeof *m);
	char line[1300];
	int64_t next;
	int ended;

	for (size_t i = 0; i < r->n_slots; i++) {
		int n = snprintf(line, sizeof line, "%s, round %u/%u", r->slots[i].m.line,
				 r->p.round + 1, r->cfg.count);
		char *safe = stage_redact(r->st, line);
		(void)n;
		stage_log_staged(r->st, KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, safe,
				 strlen(safe));
		free(safe);
		m[i] = r->slots[i].m;
		free(r->p.last[i]);
		r->p.last[i] = kpl_strdup(m[i].value);
	}
	ended = decide(&r->cfg, &r->p, m, r->n_slots, &r->end_state, r->end_msg,
		       sizeof r->end_msg);
	free(m);
	r->p.last_round_ms = kpl_now_ms();
	if (ended) {
		char *safe = stage_redact(r->st, r->end_msg);
		snprintf(r->end_msg, sizeof r->end_msg, "%s", safe);
		free(safe);
		r->ending = true;
	}
	if (r->on_round)
		r->on_round(r, &r->p, r->data);
	if (ended) {
		vr_report(r);
		return;
	}
	/* Rounds keep their cadence: the next starts an interval after this
	 * one started, or at once if this one took longer. */
	next = r->round_start_ms + r->cfg.interval_ms - kpl_now_ms();
	uv_timer_start(&r->timer, on_timer, next > 0 ? (uint64_t)next : 0, 0);
}

static void slot_done(struct slot *s)
{
	struct verify_run *r = s->r;

	s->req = NULL;
	r->pending--;
	if (r->ending) {
		vr_maybe_free(r);
		return;
	}
	if (r->pending == 0)
		round_end(r);
}

static void on_query_done(struct http_response *resp, int status, void *data)
{
	struct slot *s = data;
	struct verify_run *r = s->r;
	struct prom_sample sample;
	struct kpl_err err = { 0 };
	int rc;

	if (!r->ending) {
		if (status)
			rc = kpl_errf(&err, status == KPL_EINVAL ? KPL_EINVAL : status, "prometheus: %s",
				      resp->err.msg);
		else
			rc = prom_parse_reply(resp->status, resp->body, resp->body_len, &sample,
					      &err);
		judge_query(&r->cfg.queries[s->i], rc, &sample, err.msg, &s->m);
		if (!rc && sample.warnings[0])
			stage_logf(r->st, "%s: prometheus warns: %s", r->cfg.queries[s->i].name,
				   sample.warnings);
	}
	slot_done(s);
}

static void on_http_done(struct http_response *resp, int status, void *data)
{
	struct slot *s = data;
	struct verify_run *r = s->r;

	if (!r->ending)
		judge_http(r->cfg.http, r->http_body, r->http_shown, status, resp->status,
			   resp->body, resp->err.msg, &s->m);
	slot_done(s);
}

static int64_t request_timeout(const struct verify_run *r)
{
	int64_t t = r->cfg.interval_ms;

	return t < VERIFY_REQUEST_MIN_MS ? VERIFY_REQUEST_MIN_MS
	     : t > VERIFY_REQUEST_MAX_MS ? VERIFY_REQUEST_MAX_MS : t;
}

static void start_query(struct verify_run *r, struct slot *s)
{
	struct http_request_options o = { 0 };
	const struct cfg_endpoint *ep = r->prom.ep;
	struct http_header accept = { "Accept", "application/json" };
	struct kpl_err err = { 0 };
	struct prom_sample none = { 0 };
	char *url = prom_query_url(r->prom.url, r->queries[s->i], r->round_start_ms);

	o.url = url;
	o.headers = &accept;
	o.n_headers = 1;
	o.timeout_ms = request_timeout(r);
	if (r->prom.token) {
		o.auth.kind = HTTP_AUTH_BEARER;
		o.auth.token = r->prom.token;
	} else if (r->prom.username) {
		o.auth.kind = HTTP_AUTH_BASIC;
		o.auth.user = r->prom.username;
		o.auth.password = r->prom.password ? r->prom.password : "";
	}
	if (ep) {
		o.tls.ca_file = ep->ca_file;
		o.tls.client_cert = ep->client_cert;
		o.tls.client_key = ep->client_key;
		o.tls.insecure = ep->insecure;
	}
	o.on_done = on_query_done;
	o.data = s;
	if (http_request_start(stage_http(r->st), &o, &s->req, &err) == 0)
		r->pending++;
	else
		judge_query(&r->cfg.queries[s->i], err.code == KPL_EINVAL ? KPL_EINVAL : err.code,
			    &none, err.msg, &s->m);
	free(url);
}

static void start_http(struct verify_run *r, struct slot *s)
{
	struct http_request_options o = { 0 };
	struct kpl_err err = { 0 };

	o.url = r->http_url;
	o.timeout_ms = request_timeout(r);
	o.retry.max_attempts = 1; /* a check measures; it does not insist */
	o.max_body = VERIFY_MAX_HTTP_BODY;
	o.on_done = on_http_done;
	o.data = s;
	if (http_request_start(stage_http(r->st), &o, &s->req, &err) == 0)
		r->pending++;
	else
		judge_http(r->cfg.http, r->http_body, r->http_shown, err.code, 0, "", err.msg,
			   &s->m);
}

static void round_start(struct verify_run *r)
{
	r->round_start_ms = kpl_now_ms();
	for (size_t i = 0; i < r->n_slots; i++) {
		memset(&r->slots[i].m, 0, sizeof r->slots[i].m);
		if (i < r->cfg.n_queries)
			start_query(r, &r->slots[i]);
		else
			start_http(r, &r->slots[i]);
	}
	if (r->pending == 0)
		round_end(r); /* nothing could start: each slot says why */
}

static int canary_lookup(void *data, const struct expr *ref, const char **value)
{
	const char *version = data;

	if (!version || strcmp(ref->part[0], "canary") || ref->n_part != 2 ||
	    strcmp(ref->part[1], "version"))
		return KPL_ENOTFOUND;
	*value = version;
	return 0;
}

/* text with ${{ canary.version }} filled in (what the engine left). */
static int fill_canary(const char *text, const char *version, const char *what,
		       char **out, struct kpl_err *err)
{
	struct kpl_err e = { 0 };

	*out = NULL;
	if (!text)
		return 0;
	if (!tpl_has_template(text)) {
		*out = kpl_strdup(text);
		return 0;
	}
	if (tpl_expand_str(text, EXPR_ROOT_CANARY, canary_lookup, (void *)version, out, &e))
		return kpl_errf(err, KPL_EINVAL, "%s: %s%s", what, e.msg,
				version ? "" : " (no canary version given)");
	return 0;
}

int verify_run_start(const struct verify_run_options *o, struct verify_run **out,
		     struct kpl_err *err)
{
	struct verify_run *r = kpl_calloc(1, sizeof *r);
	const char *v;
	char what[120];
	int rc;

	r->st = o->st;
	r->cfg = *o->cfg;
	memset(o->cfg, 0, sizeof *o->cfg);
	if (o->prom) {
		r->prom = *o->prom;
		memset(o->prom, 0, sizeof *o->prom);
	}
	r->on_round = o->on_round;
	r->on_done = o->on_done;
	r->data = o->data;
	r->n_slots = n_slots(&r->cfg);
	r->slots = kpl_calloc(r->n_slots ? r->n_slots : 1, sizeof *r->slots);
	r->queries = kpl_calloc(r->cfg.n_queries ? r->cfg.n_queries : 1, sizeof *r->queries);
	uv_timer_init(stage_loop(r->st), &r->timer);
	r->timer.data = r;

	if ((v = r->cfg.canary_version) && (strpbrk(v, "\"'`\\\n\r") || !*v)) {
		rc = kpl_errf(err, KPL_EINVAL, "canary version \"%.60s\": must be non-empty, "
			      "without quotes, backslashes or newlines (it goes into PromQL "
			      "strings)", v);
		goto fail;
	}
	if (r->n_slots == 0) {
		rc = kpl_errf(err, KPL_EINVAL, "nothing to verify: no queries and no http check");
		goto fail;
	}
	if (r->cfg.n_queries && (!r->prom.url || !*r->prom.url)) {
		rc = kpl_errf(err, KPL_EINVAL, "queries need a prometheus endpoint with a url");
		goto fail;
	}
	for (size_t i = 0; i < r->cfg.n_queries; i++) {
		snprintf(what, sizeof what, "queries[%zu].query", i);
		if ((rc = fill_canary(r->cfg.queries[i].query, v, what, &r->queries[i], err)))
			goto fail;
		if (strlen(r->queries[i]) > PROM_MAX_QUERY) {
			rc = kpl_errf(err, KPL_EINVAL, "%s: longer than %d bytes", what,
				      PROM_MAX_QUERY);
			goto fail;
		}
	}
	if (r->cfg.http) {
		char *shown;
		if ((rc = fill_canary(r->cfg.http->url, v, "http.url", &r->http_url, err)) ||
		    (rc = fill_canary(r->cfg.http->body_contains, v, "http.body_contains",
				      &r->http_body, err)))
			goto fail;
		if (strncmp(r->http_url, "http://", 7) && strncmp(r->http_url, "https://", 8)) {
			rc = kpl_errf(err, KPL_EINVAL, "http.url: must be an http:// or https:// "
				      "URL");
			goto fail;
		}
		shown = http_redact_url(r->http_url);
		r->http_shown = kpl_asprintf("GET %s", shown);
		free(shown);
	}
	r->names = kpl_calloc(r->n_slots, sizeof *r->names);
	for (size_t i = 0; i < r->n_slots; i++) {
		r->slots[i].r = r;
		r->slots[i].i = i;
		r->names[i] = i < r->cfg.n_queries ? r->cfg.queries[i].name : "http";
	}
	if (o->from) {
		r->p = *o->from;
		r->p.last = kpl_calloc(r->n_slots, sizeof *r->p.last);
		r->p.n_last = r->n_slots;
		for (size_t i = 0; i < r->n_slots && i < o->from->n_last; i++)
			r->p.last[i] = o->from->last[i] ? kpl_strdup(o->from->last[i]) : NULL;
	} else {
		r->p.last = kpl_calloc(r->n_slots, sizeof *r->p.last);
		r->p.n_last = r->n_slots;
	}
	if (r->p.failures > r->cfg.failure_limit || r->p.inconclusive > r->cfg.inconclusive_limit ||
	    r->p.round >= r->cfg.count) {
		/* The last round decided, and kpld stopped before it could say so. */
		r->ending = true;
		if (r->p.failures > r->cfg.failure_limit || r->p.inconclusive > r->cfg.inconclusive_limit) {
			r->end_state = KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
			snprintf(r->end_msg, sizeof r->end_msg, "verify failed: %u failed and %u "
				 "inconclusive rounds (limits %u and %u)", r->p.failures,
				 r->p.inconclusive, r->cfg.failure_limit, r->cfg.inconclusive_limit);
		} else {
			r->end_state = KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED;
			snprintf(r->end_msg, sizeof r->end_msg, "verify passed: %u rounds, %u failed, "
				 "%u inconclusive", r->p.round, r->p.failures, r->p.inconclusive);
		}
		uv_timer_start(&r->timer, on_timer, 0, 0);
	} else {
		int64_t now = kpl_now_ms(), due = r->p.last_round_ms
			? r->p.last_round_ms + r->cfg.interval_ms : now + r->cfg.interval_ms;
		/* A round_start_ms for the cadence of the first round. */
		r->round_start_ms = due - r->cfg.interval_ms;
		uv_timer_start(&r->timer, on_timer, due > now ? (uint64_t)(due - now) : 0, 0);
	}
	*out = r;
	return 0;
fail:
	r->ending = r->reported = true;
	vr_maybe_free(r);
	return rc;
}

void verify_run_cancel(struct verify_run *r)
{
	if (r->reported)
		BUG("verify_run_cancel after on_done");
	if (r->ending)
		return; /* on_done is already on its way */
	r->ending = true;
	r->end_state = KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
	snprintf(r->end_msg, sizeof r->end_msg, "cancelled");
	vr_stop_requests(r);
	/* on_done never runs inside a verify_run_* call. */
	uv_timer_start(&r->timer, on_timer, 0, 0);
}

void verify_run_abandon(struct verify_run *r)
{
	r->ending = true;
	r->reported = true;
	vr_stop_requests(r);
	vr_maybe_free(r);
}

/* ---------------------------------------------------------------------- */
/* The kind */

struct verify_stage {
	struct stage *st;
	struct verify_run *run;
};

static void vs_round(struct verify_run *run, const struct verify_progress *p, void *data)
{
	struct verify_stage *vs = data;
	char *text = verify_progress_format(p, NULL);

	(void)run;
	/* The round's lines and its progress in one commit. */
	stage_save_resume(vs->st, text);
	free(text);
}

static void vs_done(struct verify_run *run, const struct verify_result *res, void *data)
{
	struct verify_stage *vs = data;
	struct stage *st = vs->st;

	(void)run;
	/* The last value of each check is an output named after it. */
	for (size_t i = 0; i < res->progress->n_last; i++)
		if (res->progress->last[i])
			stage_set_output(st, res->names[i], res->progress->last[i]);
	stage_set_impl(st, NULL);
	free(vs);
	stage_done(st, res->state, res->msg);
}

/* Loads the stage's analysis and starts it from `from` (NULL: afresh). */
static int vs_start(struct stage *st, const struct verify_progress *from,
		    struct kpl_err *err)
{
	struct verify_stage *vs;
	struct verify_config cfg;
	struct stage_endpoint prom = { 0 };
	struct verify_run_options o = { 0 };
	char path[200];
	int rc;

	snprintf(path, sizeof path, "stages.%s.with", stage_name(st));
	if ((rc = verify_config_load(st, stage_spec(st)->with, path, NULL, &cfg, err)))
		return rc;
	if (cfg.n_queries &&
	    (rc = stage_endpoint(st, CFG_PROMETHEUS, "prometheus", &prom, err))) {
		verify_config_release(&cfg);
		return rc;
	}
	vs = kpl_calloc(1, sizeof *vs);
	vs->st = st;
	o.st = st;
	o.cfg = &cfg;
	o.prom = &prom;
	o.from = from;
	o.on_round = vs_round;
	o.on_done = vs_done;
	o.data = vs;
	if ((rc = verify_run_start(&o, &vs->run, err))) {
		free(vs);
		return rc;
	}
	stage_set_impl(st, vs);
	return 0;
}

static int verify_start(struct stage *st, struct kpl_err *err)
{
	return vs_start(st, NULL, err);
}

static void verify_cancel(struct stage *st)
{
	struct verify_stage *vs = stage_impl(st);

	if (vs)
		verify_run_cancel(vs->run);
}

static void verify_abandon(struct stage *st)
{
	struct verify_stage *vs = stage_impl(st);

	if (!vs)
		return;
	verify_run_abandon(vs->run);
	stage_set_impl(st, NULL);
	free(vs);
}

/* Nothing outside kpld to find again: carry on from the recorded round. */
static int verify_resume(struct stage *st, struct kpl_err *err)
{
	struct verify_progress p;
	struct verify_config cfg;
	const char *resume = NULL;
	int64_t pid;
	uint64_t pid_start;
	char path[200];
	int rc;

	stage_resume_info(st, &pid, &pid_start, &resume);
	snprintf(path, sizeof path, "stages.%s.with", stage_name(st));
	/* The slots' count, to read the last values with. */
	if ((rc = verify_config_load(st, stage_spec(st)->with, path, NULL, &cfg, err)))
		return rc;
	if (verify_progress_parse(resume, &cfg, &p)) {
		verify_config_release(&cfg);
		/* No round ended before the restart: begin again; it repeats
		 * nothing anyone saw, so it is not a retry. */
		return kpl_errf(err, KPL_ENOTFOUND, "no round had ended");
	}
	verify_config_release(&cfg);
	kpl_info(LOG, "run %s stage %s: carrying on after round %u (%u failed, %u "
		 "inconclusive)", stage_run_id(st), stage_name(st), p.round, p.failures,
		 p.inconclusive);
	rc = vs_start(st, &p, err);
	verify_progress_release(&p);
	return rc;
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const verify_with_keys[] = {
	"prometheus", "queries", "interval", "count", "failure_limit", "inconclusive_limit",
	"http", "canary_version", NULL
};

const struct stage_kind verify_kind = {
	.name = "verify",
	.with_keys = verify_with_keys,
	.check_with = verify_check_with,
	.start = verify_start,
	.cancel = verify_cancel,
	.resume = verify_resume,
	.abandon = verify_abandon,
	.with_roots = EXPR_ROOT_CANARY,
};
