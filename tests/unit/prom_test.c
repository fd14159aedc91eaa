/*
 * prom_test.c - stages/prom.c over fixture replies (what Prometheus 2.x and
 * a proxy in front of it send), no sockets.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "stages/prom.h"

struct reply {
	long status;
	const char *body;
};

static int parse(const struct reply *r, struct prom_sample *s, struct kpl_err *e)
{
	memset(e, 0, sizeof *e);
	return prom_parse_reply(r->status, r->body, strlen(r->body), s, e);
}

static void test_url(void **state)
{
	char *u;

	(void)state;
	u = prom_query_url("http://127.0.0.1:9090/", "sum(rate(x{a=\"b\",c=~\"5.*\"}[1m])) / 2 * 100",
			   1732500000123LL);
	assert_string_equal(u, "http://127.0.0.1:9090/api/v1/query?query="
			       "sum%28rate%28x%7Ba%3D%22b%22%2Cc%3D~%225.%2A%22%7D%5B1m%5D%29%29"
			       "%20%2F%202%20%2A%20100&time=1732500000.123");
	free(u);
	u = prom_query_url("https://h/prometheus", "up", 0);
	assert_string_equal(u, "https://h/prometheus/api/v1/query?query=up");
	free(u);
	u = prom_query_url("http://h", "a+b&c", 5007);
	assert_string_equal(u, "http://h/api/v1/query?query=a%2Bb%26c&time=5.007");
	free(u);
}

static void test_vector_one_sample(void **state)
{
	struct reply r = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\","
				"\"result\":[{\"metric\":{},\"value\":[1732500000.123,\"99.2\"]}]}}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&r, &s, &e), 0);
	assert_int_equal(s.outcome, PROM_VALUE);
	assert_true(fabs(s.value - 99.2) < 1e-9);
	assert_string_equal(s.warnings, "");
}

static void test_vector_empty(void **state)
{
	struct reply r = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\","
				"\"result\":[]}}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&r, &s, &e), 0);
	assert_int_equal(s.outcome, PROM_NO_DATA);
	assert_string_equal(s.why, "empty result");
}

static void test_scalar(void **state)
{
	struct reply r = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\","
				"\"result\":[1732500000,\"1e3\"]},\"warnings\":[\"w1\",\"w2\"]}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&r, &s, &e), 0);
	assert_int_equal(s.outcome, PROM_VALUE);
	assert_true(s.value == 1000.0);
	assert_string_equal(s.warnings, "w1; w2");
}

static void test_nan_is_no_data(void **state)
{
	struct reply r = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\","
				"\"result\":[{\"metric\":{},\"value\":[1,\"NaN\"]}]}}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&r, &s, &e), 0);
	assert_int_equal(s.outcome, PROM_NO_DATA);
	assert_string_equal(s.why, "NaN");
}

static void test_inf(void **state)
{
	struct reply r = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\","
				"\"result\":[1,\"+Inf\"]}}" };
	struct reply n = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\","
				"\"result\":[1,\"-Inf\"]}}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&r, &s, &e), 0);
	assert_int_equal(s.outcome, PROM_VALUE);
	assert_true(isinf(s.value) && s.value > 0);
	assert_int_equal(parse(&n, &s, &e), 0);
	assert_true(isinf(s.value) && s.value < 0);
}

static void test_error_bodies(void **state)
{
	/* What Prometheus 2.42 answers to `sum(rate(x[1m]` and to a
	 * many-to-many match, and a query that ran out of time. */
	struct reply bad = { 400, "{\"status\":\"error\",\"errorType\":\"bad_data\",\"error\":"
				  "\"invalid parameter \\\"query\\\": 1:16: parse error: "
				  "unclosed left parenthesis\"}" };
	struct reply exec = { 422, "{\"status\":\"error\",\"errorType\":\"execution\",\"error\":"
				   "\"found duplicate series for the match group\"}" };
	struct reply timeout = { 503, "{\"status\":\"error\",\"errorType\":\"timeout\",\"error\":"
				      "\"query timed out in expression evaluation\"}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&bad, &s, &e), KPL_EINVAL);
	assert_string_equal(e.msg, "prometheus: bad_data: invalid parameter \"query\": 1:16: "
				   "parse error: unclosed left parenthesis");
	assert_int_equal(parse(&exec, &s, &e), KPL_EINVAL);
	assert_string_equal(e.msg, "prometheus: execution: found duplicate series for the "
				   "match group");
	assert_int_equal(parse(&timeout, &s, &e), KPL_ETIMEOUT);
	assert_string_equal(e.msg, "prometheus: timeout: query timed out in expression "
				   "evaluation");
}

static void test_non_json(void **state)
{
	struct reply gw = { 502, "<html>\r\n<head><title>502 Bad Gateway</title></head>\n"
				 "<body>nginx</body></html>" };
	struct reply auth = { 401, "Unauthorized\n" };
	struct reply html200 = { 200, "<!doctype html><title>Grafana</title>" };
	struct reply empty = { 504, "" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&gw, &s, &e), KPL_EUNAVAILABLE);
	assert_string_equal(e.msg, "prometheus: HTTP 502: <html> <head><title>502 Bad Gateway"
				   "</title></head> <body>nginx</body></html>");
	assert_int_equal(parse(&auth, &s, &e), KPL_EINVAL);
	assert_string_equal(e.msg, "prometheus: HTTP 401: Unauthorized");
	assert_int_equal(parse(&html200, &s, &e), KPL_EINVAL);
	assert_non_null(strstr(e.msg, "not an API reply"));
	assert_int_equal(parse(&empty, &s, &e), KPL_EUNAVAILABLE);
	assert_string_equal(e.msg, "prometheus: HTTP 504: (empty body)");
}

static void test_not_one_number(void **state)
{
	struct reply two = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\","
				  "\"result\":[{\"metric\":{\"v\":\"1\"},\"value\":[1,\"1\"]},"
				  "{\"metric\":{\"v\":\"2\"},\"value\":[1,\"2\"]}]}}" };
	struct reply matrix = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"matrix\","
				     "\"result\":[{\"metric\":{},\"values\":[[1,\"1\"]]}]}}" };
	struct reply junk = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\","
				   "\"result\":[1,\"abc\"]}}" };
	struct reply hist = { 200, "{\"status\":\"success\",\"data\":{\"resultType\":\"vector\","
				   "\"result\":[{\"metric\":{},\"histogram\":[1,{}]}]}}" };
	struct prom_sample s;
	struct kpl_err e;

	(void)state;
	assert_int_equal(parse(&two, &s, &e), KPL_EINVAL);
	assert_non_null(strstr(e.msg, "returned 2 series"));
	assert_int_equal(parse(&matrix, &s, &e), KPL_EINVAL);
	assert_non_null(strstr(e.msg, "range vector"));
	assert_int_equal(parse(&junk, &s, &e), KPL_EINVAL);
	assert_string_equal(e.msg, "prometheus: bad sample value \"abc\"");
	assert_int_equal(parse(&hist, &s, &e), KPL_EINVAL);
	assert_non_null(strstr(e.msg, "native histogram"));
}

static void test_values(void **state)
{
	double v;
	char buf[32];

	(void)state;
	assert_int_equal(prom_parse_value("-1.5e-3", &v), 0);
	assert_true(v == -1.5e-3);
	assert_int_equal(prom_parse_value("nan", &v), KPL_EINVAL);
	assert_int_equal(prom_parse_value("0x10", &v), KPL_EINVAL);
	assert_int_equal(prom_parse_value("", &v), KPL_EINVAL);
	assert_string_equal(prom_format_value(99.2, buf, sizeof buf), "99.2");
	assert_string_equal(prom_format_value(69.78723, buf, sizeof buf), "69.79");
	assert_string_equal(prom_format_value(100, buf, sizeof buf), "100");
	assert_string_equal(prom_format_value(0, buf, sizeof buf), "0");
	assert_string_equal(prom_format_value(0.000123, buf, sizeof buf), "0.000123");
	assert_string_equal(prom_format_value(INFINITY, buf, sizeof buf), "+Inf");
	assert_string_equal(prom_format_value(-0.001, buf, sizeof buf), "-0.001");
	assert_string_equal(prom_format_value(250.5, buf, sizeof buf), "250.5");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_url),
		cmocka_unit_test(test_vector_one_sample),
		cmocka_unit_test(test_vector_empty),
		cmocka_unit_test(test_scalar),
		cmocka_unit_test(test_nan_is_no_data),
		cmocka_unit_test(test_inf),
		cmocka_unit_test(test_error_bodies),
		cmocka_unit_test(test_non_json),
		cmocka_unit_test(test_not_one_number),
		cmocka_unit_test(test_values),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
