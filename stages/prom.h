/*
 * prom.h - the Prometheus HTTP API client's protocol logic: instant queries
 * (`GET /api/v1/query`), their URL, and what a reply means.
 *
 * No I/O here (style.md practice 2): the caller sends the request through
 * base/http.h and feeds the status and body to prom_parse_reply, which
 * turns them into one number, "no data", or an error that says whether
 * asking again could help. tests/unit/prom_test.c runs it over fixture
 * replies.
 *
 * What a reply means (the wire format is docs/querying/api.md):
 *   - a vector with one sample, or a scalar: that value. Sample values are
 *     strings so they can carry "NaN", "+Inf" and "-Inf"; the infinities
 *     are values (a ratio over zero traffic in the denominator's place);
 *   - an empty vector, or NaN (0/0: a success rate with no traffic at all):
 *     no data. Flagger reads it the same way ("no values found");
 *   - a vector of several series, a range vector (matrix), a string or a
 *     native histogram: the query is wrong for a check (KPL_EINVAL, saying
 *     to aggregate it to one number);
 *   - status "error": Prometheus's errorType and error, as it wrote them.
 *
 * Threads: any; nothing here keeps state.
 */
#ifndef KPL_PROM_H
#define KPL_PROM_H

#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

/* Largest query text kpl sends in a GET (it is URL-encoded into the URL;
 * servers and proxies commonly cap a request line at 8 KiB or more). */
#define PROM_MAX_QUERY 6000

/*
 * The instant-query URL: base (the endpoint's url, with or without a
 * trailing '/', possibly with a path prefix such as
 * https://host/prometheus) + "/api/v1/query?query=" + the query
 * percent-encoded + "&time=" + time_ms as seconds with milliseconds
 * ("1732500000.123"). time_ms 0 leaves time out (the server's now).
 * Returns a malloc'd string; caller frees.
 */
char *prom_query_url(const char *base, const char *query, int64_t time_ms);

/* s percent-encoded for a query component: everything but RFC 3986's
 * unreserved characters (A-Z a-z 0-9 - . _ ~) becomes %XX. Malloc'd. */
char *prom_urlencode(const char *s);

enum prom_outcome {
	PROM_VALUE,   /* value holds the number (possibly +-Inf) */
	PROM_NO_DATA, /* no sample, or NaN; why says which */
	PROM_OUTCOME_LAST_
};

struct prom_sample {
	enum prom_outcome outcome;
	double value;
	/* PROM_NO_DATA: "empty result" or "NaN"; "" otherwise. */
	char why[32];
	/* Prometheus's warnings joined with "; " (they do not change the
	 * outcome; a caller may log them), "" if none. */
	char warnings[256];
};

/*
 * What an instant query's reply says. status is the HTTP status; body (len
 * bytes, need not be NUL-terminated) its body. Returns 0 and fills *out, or
 * a negative code with err->msg for a person, starting "prometheus: ":
 *   KPL_EINVAL       the query is wrong and asking again will not help:
 *                    Prometheus refused it (400 bad_data, 422 execution,
 *                    404 not_found, ...: "prometheus: bad_data: invalid
 *                    parameter \"query\": 1:9: parse error: ..."), or its
 *                    result is not one number; also a 4xx without a JSON
 *                    body (a wrong URL or credentials: "prometheus: HTTP
 *                    401: ..."), or a 2xx that is not an API reply
 *   KPL_ETIMEOUT     Prometheus ran out of time (503 timeout)
 *   KPL_EUNAVAILABLE it could not answer now: 5xx (internal, unavailable,
 *                    canceled), or a proxy's non-JSON error page
 * (KPL_ETIMEOUT and KPL_EUNAVAILABLE are worth asking again later.)
 */
int prom_parse_reply(long status, const char *body, size_t len,
		     struct prom_sample *out, struct kpl_err *err);

/* Parses a sample value as Prometheus writes it: a decimal or exponent
 * number, "NaN", "+Inf", "-Inf" (also "Inf"). Returns 0, or KPL_EINVAL if s
 * is anything else. */
int prom_parse_value(const char *s, double *out);

/*
 * A number as kpl shows it in measurements: at most two decimals with
 * trailing zeros dropped (99.2, 100, 245.37), %.6g for very small or large
 * magnitudes (0.000123, 1.5e+12), and "NaN", "+Inf", "-Inf". Writes into
 * buf (32 bytes are always enough) and returns it.
 */
const char *prom_format_value(double v, char *buf, size_t n);

#endif
