/*
 * secrets_test.c - engine/secrets.c's changes in two steps (staged, then
 * visible only once their commit ended well), pipelines a secret is limited
 * to (sealed with it, read back after a reopen), on a real store in a
 * temporary directory; no loop, no sockets.
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
#include "engine/secrets.h"
#include "store/store.h"

struct fx {
	char dir[PATH_MAX];
	struct store *store;
	struct secrets *sec;
};

static void open_all(struct fx *fx)
{
	struct store_options opt = { 0 };
	struct kpl_err err = { 0 };

	if (store_open(NULL, fx->dir, &opt, &fx->store, &err))
		fail_msg("store_open: %s", err.msg);
	if (secrets_open(fx->store, fx->dir, &fx->sec, &err))
		fail_msg("secrets_open: %s", err.msg);
}

static void close_all(struct fx *fx)
{
	secrets_free(fx->sec);
	store_close(fx->store);
	fx->sec = NULL;
	fx->store = NULL;
}

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof *fx);

	snprintf(fx->dir, sizeof fx->dir, "%s/secrets-XXXXXX",
		 getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp");
	assert_non_null(mkdtemp(fx->dir));
	open_all(fx);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fx *fx = *state;
	char cmd[PATH_MAX + 16];

	close_all(fx);
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
	assert_int_equal(system(cmd), 0);
	free(fx);
	return 0;
}

/* Nothing of a change is seen before its commit ended; a failed commit
 * changes nothing. */
static void test_visible_after_commit(void **state)
{
	struct fx *fx = *state;
	struct secrets_change *ch;
	struct kpl_err err = { 0 };
	const char *const *names;
	size_t n = 0;
	char *red;

	assert_int_equal(secrets_stage_set(fx->sec, "DB", "db-value-1", 10, NULL, 0, &ch, &err),
			 0);
	assert_null(secrets_get(fx->sec, "DB"));
	assert_int_equal(secrets_names(fx->sec, &names), 0);
	assert_false(secrets_allowed(fx->sec, "DB", "any"));
	assert_null(secrets_redact(fx->sec, "x db-value-1", 12, &n));
	assert_int_equal(store_commit_sync(fx->store), 0);
	assert_null(secrets_get(fx->sec, "DB")); /* the callback has not run */
	secrets_change_end(fx->sec, ch, 0);
	assert_string_equal(secrets_get(fx->sec, "DB"), "db-value-1");
	red = secrets_redact(fx->sec, "x db-value-1", 12, &n);
	assert_string_equal(red, "x ***");
	free(red);

	/* A new value whose commit failed: the old one stays. */
	assert_int_equal(secrets_stage_set(fx->sec, "DB", "db-value-2", 10, NULL, 0, &ch, &err),
			 0);
	secrets_change_end(fx->sec, ch, KPL_ESTORE);
	assert_string_equal(secrets_get(fx->sec, "DB"), "db-value-1");

	/* A delete: seen only once it ended well. */
	assert_int_equal(secrets_stage_delete(fx->sec, "DB", &ch, &err), 0);
	assert_non_null(secrets_get(fx->sec, "DB"));
	secrets_change_end(fx->sec, ch, KPL_ESTORE);
	assert_non_null(secrets_get(fx->sec, "DB"));
	assert_int_equal(secrets_stage_delete(fx->sec, "DB", &ch, &err), 0);
	secrets_change_end(fx->sec, ch, 0);
	assert_null(secrets_get(fx->sec, "DB"));
	assert_int_equal(secrets_stage_delete(fx->sec, "DB", &ch, &err), KPL_ENOTFOUND);
}

static void set(struct fx *fx, const char *name, const char *value,
		const char *const *pipelines, size_t n)
{
	struct secrets_change *ch;
	struct kpl_err err = { 0 };

	if (secrets_stage_set(fx->sec, name, value, strlen(value), pipelines, n, &ch, &err))
		fail_msg("secrets_stage_set %s: %s", name, err.msg);
	assert_int_equal(store_commit_sync(fx->store), 0);
	secrets_change_end(fx->sec, ch, 0);
}

/* The pipelines a secret is for: checked, kept across a reopen (sealed
 * with the value), a secret without them is for every pipeline. */
static void test_pipelines(void **state)
{
	struct fx *fx = *state;
	static const char *const two[] = { "web", "api", "web" };
	static const char *const bad[] = { "Web" };
	static const char *const bad2[] = { "-web" };
	struct secrets_change *ch;
	struct kpl_err err = { 0 };

	set(fx, "LIMITED", "limited-1", two, 3);
	set(fx, "OPEN", "open-value", NULL, 0);
	for (int round = 0; round < 2; round++) {
		assert_string_equal(secrets_pipelines(fx->sec, "LIMITED"), "web\napi");
		assert_string_equal(secrets_pipelines(fx->sec, "OPEN"), "");
		assert_null(secrets_pipelines(fx->sec, "NONE"));
		assert_true(secrets_allowed(fx->sec, "LIMITED", "web"));
		assert_true(secrets_allowed(fx->sec, "LIMITED", "api"));
		assert_false(secrets_allowed(fx->sec, "LIMITED", "we"));
		assert_false(secrets_allowed(fx->sec, "LIMITED", "webx"));
		assert_false(secrets_allowed(fx->sec, "LIMITED", "web\napi"));
		assert_true(secrets_allowed(fx->sec, "OPEN", "anything"));
		assert_false(secrets_allowed(fx->sec, "NONE", "web"));
		assert_string_equal(secrets_get(fx->sec, "LIMITED"), "limited-1");
		close_all(fx);
		open_all(fx);
	}
	assert_int_equal(secrets_stage_set(fx->sec, "X", "x-value", 7, bad, 1, &ch, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "not a pipeline name"));
	assert_int_equal(secrets_stage_set(fx->sec, "X", "x-value", 7, bad2, 1, &ch, &err),
			 KPL_EINVAL);
	assert_int_equal(store_staged(fx->store), 0);
	/* Set again without pipelines: for every pipeline again. */
	set(fx, "LIMITED", "limited-1", NULL, 0);
	assert_true(secrets_allowed(fx->sec, "LIMITED", "other"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_visible_after_commit, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pipelines, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
