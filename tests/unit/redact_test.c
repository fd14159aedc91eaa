/*
 * redact_test.c - engine/secrets.c's redaction (multi-line values line by
 * line, a secret inside another, pieces of a line cut at 8 KiB, the size
 * bounds secrets_set keeps) and base/logline.c (UTF-8 repair and cuts),
 * on a real store in a temporary directory; no loop, no sockets.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/kpl.h"
#include "base/logline.h"
#include "engine/secrets.h"
#include "store/store.h"

#define PEM "-----BEGIN PRIVATE KEY-----\n" \
	    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n" \
	    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n" \
	    "-----END PRIVATE KEY-----\n"

struct fx {
	char dir[PATH_MAX];
	struct store *store;
	struct secrets *sec;
};

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof *fx);
	struct store_options opt = { 0 };
	struct kpl_err err = { 0 };

	snprintf(fx->dir, sizeof fx->dir, "%s/redact-XXXXXX",
		 getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp");
	assert_non_null(mkdtemp(fx->dir));
	if (store_open(NULL, fx->dir, &opt, &fx->store, &err))
		fail_msg("store_open: %s", err.msg);
	if (secrets_open(fx->store, fx->dir, &fx->sec, &err))
		fail_msg("secrets_open: %s", err.msg);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fx *fx = *state;
	char cmd[PATH_MAX + 16];

	secrets_free(fx->sec);
	store_close(fx->store);
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
	assert_int_equal(system(cmd), 0);
	free(fx);
	return 0;
}

static void set(struct fx *fx, const char *name, const char *value)
{
	struct kpl_err err = { 0 };

	if (secrets_set(fx->sec, name, value, strlen(value), &err))
		fail_msg("secrets_set %s: %s", name, err.msg);
}

/* text redacted, as a malloc'd string (the text itself if nothing was). */
static char *red(struct fx *fx, const char *text, unsigned cut)
{
	size_t n;
	char *r = secrets_redact_cut(fx->sec, text, strlen(text), cut, &n);

	if (!r)
		return strdup(text);
	assert_int_equal(n, strlen(r));
	return r;
}

static void expect(struct fx *fx, const char *text, unsigned cut, const char *want)
{
	char *r = red(fx, text, cut);

	assert_string_equal(r, want);
	free(r);
}

/* A PEM key printed line by line: each line is its own log line. */
static void test_pem_line_by_line(void **state)
{
	struct fx *fx = *state;

	set(fx, "TLS_KEY", PEM);
	expect(fx, "-----BEGIN PRIVATE KEY-----", 0, "***");
	expect(fx, "key: MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj", 0,
	       "key: ***");
	expect(fx, "  MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\r", 0,
	       "  ***\r");
	/* The whole value in one text (a message, an output) too. */
	expect(fx, "got " PEM "done", 0, "got ***done");
	/* Lines under SECRETS_MIN_VALUE are not patterns of their own. */
	set(fx, "SHORT_LINES", "ab\ncd\nefghij");
	expect(fx, "ab cd efghij", 0, "ab cd ***");
}

/* A secret inside another: the longer one leaves nothing behind. */
static void test_secret_inside_another(void **state)
{
	struct fx *fx = *state;

	/* Sorted by name, "A_INNER" came first and used to leave "xx***yy". */
	set(fx, "A_INNER", "abcd1234");
	set(fx, "B_OUTER", "xxabcd1234yy");
	expect(fx, "v=xxabcd1234yy;", 0, "v=***;");
	expect(fx, "v=abcd1234;", 0, "v=***;");
	/* Two that overlap: both gone, as one mask. */
	set(fx, "C_LEFT", "hello-wor");
	set(fx, "D_RIGHT", "o-world!");
	expect(fx, "say hello-world!!", 0, "say ***!");
}

/* A line the shim cut at 8 KiB with a secret across the cut. */
static void test_secret_at_the_split_point(void **state)
{
	struct fx *fx = *state;
	const char *secret = "S3cr3t-token-value";
	size_t big = KPL_MAX_LOG_LINE;
	char *line = malloc(2 * big + 1), *a, *b;

	set(fx, "TOKEN", secret);
	/* Line of 2 * 8 KiB with the secret straddling byte 8192. */
	memset(line, 'x', 2 * big);
	line[2 * big] = '\0';
	memcpy(line + big - 7, secret, strlen(secret));
	a = strndup(line, big);
	b = strdup(line + big);
	/* Before: neither piece held the whole secret, both kept a part. */
	{
		char *ra = red(fx, a, SECRETS_CUT_END), *rb = red(fx, b, SECRETS_CUT_START);
		assert_null(strstr(ra, "S3cr3t-"));
		assert_null(strstr(rb, "oken-value"));
		assert_null(strstr(rb, "value"));
		assert_string_equal(ra + big - 7, "***");
		assert_memory_equal(rb, "***xxx", 6);
		free(ra);
		free(rb);
	}
	/* Without a cut at that end, an edge is left alone. */
	expect(fx, "text ends with S3cr", 0, "text ends with S3cr");
	expect(fx, "text ends with S3cr", SECRETS_CUT_START, "text ends with S3cr");
	expect(fx, "-value starts it", SECRETS_CUT_END, "-value starts it");
	free(a);
	free(b);
	free(line);
}

/* secrets_set refuses what redaction could not cover, naming the limit. */
static void test_size_bounds(void **state)
{
	struct fx *fx = *state;
	struct kpl_err err = { 0 };
	size_t n = SECRETS_MAX_LINE + 1;
	char *v = malloc(n + 20);

	memset(v, 'k', n);
	assert_int_equal(secrets_set(fx->sec, "LONG", v, n, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "8000"));
	assert_non_null(strstr(err.msg, "line 1"));
	/* Many short lines are fine: only a line's length is bounded. */
	for (size_t i = 100; i < n; i += 100)
		v[i] = '\n';
	memset(&err, 0, sizeof err);
	if (secrets_set(fx->sec, "MANY_LINES", v, n, &err))
		fail_msg("many lines: %s", err.msg);
	memset(v, 'k', n + 6);
	memcpy(v, "short\n", 6);
	memset(&err, 0, sizeof err);
	assert_int_equal(secrets_set(fx->sec, "LONG2", v, n + 6, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "line 2"));
	free(v);
}

/* Invalid bytes become U+FFFD; valid text is kept byte for byte. */
static void test_utf8_clean(void **state)
{
	static const struct { const char *in; const char *out; } cases[] = {
		{ "plain", "plain" },
		{ "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80" },
		{ "\xff\xfe", "\xEF\xBF\xBD\xEF\xBF\xBD" },
		{ "a\x80z", "a\xEF\xBF\xBDz" },                 /* stray continuation */
		{ "\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD" },     /* overlong '/' */
		{ "\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" }, /* surrogate */
		{ "\xF4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" },
		{ "end\xE2\x82", "end\xEF\xBF\xBD\xEF\xBF\xBD" }, /* cut short */
	};
	(void)state;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		size_t n;
		char *r = logline_utf8_clean(cases[i].in, strlen(cases[i].in), &n);
		assert_string_equal(r, cases[i].out);
		assert_int_equal(n, strlen(cases[i].out));
		free(r);
	}
}

/* Cuts fall between characters, for the shim and for events. */
static void test_utf8_cuts(void **state)
{
	const char *euro = "\xE2\x82\xAC"; /* 3 bytes */
	char buf[64];
	size_t off, n;

	(void)state;
	assert_int_equal(logline_utf8_cut("ab", 2), 2);
	assert_int_equal(logline_utf8_cut("a\xE2\x82", 3), 1);
	assert_int_equal(logline_utf8_cut("a\xE2", 2), 1);
	assert_int_equal(logline_utf8_cut("a\xE2\x82\xAC", 4), 4);
	assert_int_equal(logline_utf8_cut("a\xF0\x9F\x98", 4), 1);
	assert_int_equal(logline_utf8_cut("a\xC3", 2), 1);
	assert_int_equal(logline_utf8_cut("a\xff", 2), 2); /* invalid anyway: kept */
	/* 7 euros (21 bytes) in pieces of at most 8: 6, 6, 6, 3. */
	buf[0] = '\0';
	for (int i = 0; i < 7; i++)
		strcat(buf, euro);
	for (off = 0; off < 21; off += n) {
		n = logline_split(buf + off, 21 - off, 8);
		assert_true(n > 0 && n <= 8);
		assert_int_equal(n % 3, 0);
	}
	assert_int_equal(logline_split(buf, 21, 100), 21);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_pem_line_by_line, setup, teardown),
		cmocka_unit_test_setup_teardown(test_secret_inside_another, setup, teardown),
		cmocka_unit_test_setup_teardown(test_secret_at_the_split_point, setup, teardown),
		cmocka_unit_test_setup_teardown(test_size_bounds, setup, teardown),
		cmocka_unit_test(test_utf8_clean),
		cmocka_unit_test(test_utf8_cuts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
