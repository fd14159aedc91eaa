/*
 * prom.c - the Prometheus instant-query protocol logic (see prom.h). No
 * I/O: URLs out, replies in.
 */
#include <ctype.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "stages/prom.h"

char *prom_urlencode(const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t n = strlen(s);
	char *out = kpl_malloc(3 * n + 1), *p = out;

	for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
		if (isalnum(*c) || *c == '-' || *c == '.' || *c == '_' || *c == '~') {
			*p++ = (char)*c;
		} else {
			*p++ = '%';
			*p++ = hex[*c >> 4];
			*p++ = hex[*c & 15];
		}
	}
	*p = '\0';
	return out;
}

char *prom_query_url(const char *base, const char *query, int64_t time_ms)
{
	size_t blen = strlen(base);
	char *q = prom_urlencode(query), *url;

	while (blen && base[blen - 1] == '/')
		blen--;
	if (time_ms > 0)
		url = kpl_asprintf("%.*s/api/v1/query?query=%s&time=%lld.%03lld", (int)blen,
				   base, q, (long long)(time_ms / 1000),
				   (long long)(time_ms % 1000));
	else
		url = kpl_asprintf("%.*s/api/v1/query?query=%s", (int)blen, base, q);
	free(q);
	return url;
}

int prom_parse_value(const char *s, double *out)
{
	char *end;

	if (!s || !*s)
		return KPL_EINVAL;
	if (!strcmp(s, "NaN")) {
		*out = NAN;
		return 0;
	}
	if (!strcmp(s, "+Inf") || !strcmp(s, "Inf")) {
		*out = INFINITY;
		return 0;
	}
	if (!strcmp(s, "-Inf")) {
		*out = -INFINITY;
		return 0;
	}
	/* strtod would also take "nan(...)", "infinity" and hex: Prometheus
	 * writes none of those, so they mean a reply we do not understand. */
	for (const char *c = s; *c; c++)
		if (!isdigit((unsigned char)*c) && !strchr("+-.eE", *c))
			return KPL_EINVAL;
	*out = strtod(s, &end);
	return *end ? KPL_EINVAL : 0;
}

const char *prom_format_value(double v, char *buf, size_t n)
{
	if (isnan(v)) {
		snprintf(buf, n, "NaN");
	} else if (isinf(v)) {
		snprintf(buf, n, "%sInf", v > 0 ? "+" : "-");
	} else if (v == 0 || (fabs(v) >= 0.01 && fabs(v) < 1e9)) {
		char *dot;
		snprintf(buf, n, "%.2f", v);
		if ((dot = strchr(buf, '.'))) {
			char *e = buf + strlen(buf);
			while (e > dot && (e[-1] == '0' || e[-1] == '.')) {
				bool was_dot = e[-1] == '.';
				*--e = '\0';
				if (was_dot)
					break;
			}
		}
		if (!strcmp(buf, "-0"))
			snprintf(buf, n, "0");
	} else {
		snprintf(buf, n, "%.6g", v);
	}
	return buf;
}

/* The body's start, for a message about a reply that is not JSON: one line,
 * printable characters only, at most 120 bytes. */
static void snippet(const char *body, size_t len, char *out, size_t n)
{
	size_t j = 0;

	for (size_t i = 0; i < len && j + 4 < n && j < 120; i++) {
		unsigned char c = (unsigned char)body[i];
		if (c == '\n' || c == '\r' || c == '\t')
			c = ' ';
		if (c < 0x20 || c == 0x7f)
			continue;
		if (c == ' ' && j && out[j - 1] == ' ')
			continue;
		out[j++] = (char)c;
	}
	while (j && out[j - 1] == ' ')
		j--;
	if (j >= 120 && j + 4 < n) {
		memcpy(out + j, "...", 3);
		j += 3;
	}
	out[j] = '\0';
}

/* A refusal that asking again will not change, by errorType (and status). */
static int error_code(long status, const char *type)
{
	if (type && !strcmp(type, "timeout"))
		return KPL_ETIMEOUT;
	if (type && (!strcmp(type, "bad_data") || !strcmp(type, "execution") ||
		     !strcmp(type, "not_found") || !strcmp(type, "not_acceptable")))
		return KPL_EINVAL;
	if (status >= 500 || status == 429 || status == 499)
		return KPL_EUNAVAILABLE;
	if (status >= 400)
		return KPL_EINVAL;
	return KPL_EUNAVAILABLE; /* "internal", "unavailable", "canceled" */
}

static void join_warnings(json_t *w, char *out, size_t n)
{
	size_t i, used = 0;
	json_t *v;

	out[0] = '\0';
	if (!json_is_array(w))
		return;
	json_array_foreach(w, i, v) {
		const char *s = json_string_value(v);
		int k;
		if (!s)
			continue;
		k = snprintf(out + used, n - used, "%s%s", used ? "; " : "", s);
		if (k < 0 || (size_t)k >= n - used)
			break;
		used += (size_t)k;
	}
}

/* One [time, "value"] pair into *out. */
static int read_pair(json_t *pair, struct prom_sample *out, struct kpl_err *err)
{
	const char *s = json_string_value(json_array_get(pair, 1));
	double v;

	if (!json_is_array(pair) || json_array_size(pair) != 2 || !s)
		return kpl_errf(err, KPL_EINVAL,
				"prometheus: a sample is not a [time, \"value\"] pair");
	if (prom_parse_value(s, &v))
		return kpl_errf(err, KPL_EINVAL, "prometheus: bad sample value \"%.40s\"", s);
	if (isnan(v)) {
		out->outcome = PROM_NO_DATA;
		snprintf(out->why, sizeof out->why, "NaN");
		return 0;
	}
	out->outcome = PROM_VALUE;
	out->value = v;
	return 0;
}

int prom_parse_reply(long status, const char *body, size_t len,
		     struct prom_sample *out, struct kpl_err *err)
{
	json_t *j = NULL, *data, *result;
	const char *st, *type;
	char snip[160];
	int rc;

	memset(out, 0, sizeof *out);
	if (body && len)
		j = json_loadb(body, len, 0, NULL);
	if (!json_is_object(j)) {
		snippet(body ? body : "", len, snip, sizeof snip);
		if (status >= 200 && status < 300)
			rc = kpl_errf(err, KPL_EINVAL, "prometheus: HTTP %ld but the body is not an API "
				      "reply (is the url a Prometheus server?): %s", status,
				      snip[0] ? snip : "(empty)");
		else
			rc = kpl_errf(err, error_code(status, NULL), "prometheus: HTTP %ld: %s",
				      status, snip[0] ? snip : "(empty body)");
		goto out;
	}
	join_warnings(json_object_get(j, "warnings"), out->warnings, sizeof out->warnings);
	st = json_string_value(json_object_get(j, "status"));
	if (!st || strcmp(st, "success") != 0 || status < 200 || status >= 300) {
		const char *et = json_string_value(json_object_get(j, "errorType"));
		const char *e = json_string_value(json_object_get(j, "error"));
		if (st && !strcmp(st, "error") && e)
			rc = kpl_errf(err, error_code(status, et), "prometheus: %s: %s",
				      et ? et : "error", e);
		else
			rc = kpl_errf(err, error_code(status, et), "prometheus: HTTP %ld, status %s",
				      status, st ? st : "missing");
		goto out;
	}
	data = json_object_get(j, "data");
	type = json_string_value(json_object_get(data, "resultType"));
	result = json_object_get(data, "result");
	if (!type || !result) {
		rc = kpl_errf(err, KPL_EINVAL, "prometheus: reply without data.resultType and "
			      "data.result");
		goto out;
	}
	if (!strcmp(type, "scalar")) {
		rc = read_pair(result, out, err);
	} else if (!strcmp(type, "vector")) {
		size_t n = json_array_size(result);
		json_t *s0 = json_array_get(result, 0);
		if (!json_is_array(result)) {
			rc = kpl_errf(err, KPL_EINVAL, "prometheus: data.result is not a list");
		} else if (n == 0) {
			out->outcome = PROM_NO_DATA;
			snprintf(out->why, sizeof out->why, "empty result");
			rc = 0;
		} else if (n > 1) {
			rc = kpl_errf(err, KPL_EINVAL, "prometheus: the query returned %zu series, "
				      "not one number; aggregate it (sum(...), max(...))", n);
		} else if (json_object_get(s0, "histogram")) {
			rc = kpl_errf(err, KPL_EINVAL, "prometheus: the query returned a native "
				      "histogram, not a number; use histogram_quantile(...)");
		} else {
			rc = read_pair(json_object_get(s0, "value"), out, err);
		}
	} else {
		rc = kpl_errf(err, KPL_EINVAL, "prometheus: the query returned a %s, not one number%s",
			      !strcmp(type, "matrix") ? "range vector (matrix)" : type,
			      !strcmp(type, "matrix") ? "; drop the [range] or wrap it in a function "
							"such as rate(...)" : "");
	}
out:
	json_decref(j);
	return rc;
}
