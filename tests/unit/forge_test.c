/*
 * forge_test.c - the pure parts of engine/forge.c: GitHub's and GitLab's
 * documented pull (merge) request payloads (tests/e2e/fixtures/forge), the
 * actions that start runs and those that do not, fork detection, the
 * idempotency key, the status requests and how replies are judged.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "engine/forge.h"

static char *fixture(const char *name, size_t *len)
{
	const char *src = getenv("TEST_SRCDIR");
	char *p = kpl_asprintf("%s/kpl/tests/e2e/fixtures/forge/%s", src ? src : ".", name);
	FILE *f = fopen(p, "rb");
	char *buf;
	long n;

	if (!f)
		fail_msg("cannot open %s", p);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	buf = kpl_malloc((size_t)n + 1);
	assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	free(p);
	*len = (size_t)n;
	return buf;
}

/* The fixture with one JSON edit: path "a.b.c" set to v (stolen). */
static char *edited(const char *name, const char *path, json_t *v, size_t *len)
{
	size_t n;
	char *text = fixture(name, &n), *out, *dup = kpl_strdup(path), *key, *next;
	json_t *root = json_loadb(text, n, 0, NULL), *obj = root;

	assert_non_null(root);
	for (key = dup; (next = strchr(key, '.')); key = next + 1) {
		*next = '\0';
		obj = json_object_get(obj, key);
		assert_non_null(obj);
	}
	json_object_set_new(obj, key, v);
	out = json_dumps(root, JSON_COMPACT);
	*len = strlen(out);
	json_decref(root);
	free(dup);
	free(text);
	return out;
}

static void test_github_opened(void **state)
{
	struct forge_pr pr;
	struct kpl_err err = { 0 };
	char why[200];
	size_t len;
	char *body = fixture("github_pull_request_opened.json", &len);

	(void)state;
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 0);
	assert_string_equal(pr.action, "opened");
	assert_int_equal(pr.number, 2);
	assert_string_equal(pr.head_sha, "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
	assert_string_equal(pr.head_branch, "changes");
	assert_string_equal(pr.base_branch, "master");
	assert_string_equal(pr.status_repo, "Codertocat/Hello-World");
	assert_string_equal(pr.ref, "refs/pull/2/head");
	assert_false(pr.fork);
	assert_string_equal(pr.urls[0], "https://github.com/Codertocat/Hello-World.git");
	forge_pr_free(&pr);
	free(body);
}

static void test_github_actions(void **state)
{
	static const char *const starts[] = { "synchronize", "reopened" };
	struct forge_pr pr;
	struct kpl_err err = { 0 };
	char why[200];
	size_t len;
	char *body;

	(void)state;
	for (size_t i = 0; i < 2; i++) {
		char name[80];
		snprintf(name, sizeof name, "github_pull_request_%s.json", starts[i]);
		body = fixture(name, &len);
		assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why,
						&err), 0);
		assert_string_equal(pr.action, starts[i]);
		if (i == 0) /* synchronize says where the head was */
			assert_string_equal(pr.before, "f95f852bd8fca8fcc58a9a2d6c842781e32a215e");
		forge_pr_free(&pr);
		free(body);
	}
	body = fixture("github_pull_request_closed.json", &len);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 1);
	assert_non_null(strstr(why, "action closed starts no run"));
	assert_null(pr.action);
	free(body);
	body = edited("github_pull_request_opened.json", "action", json_string("labeled"), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 1);
	free(body);
}

static void test_github_fork_and_bad_payloads(void **state)
{
	struct forge_pr pr;
	struct kpl_err err = { 0 };
	char why[200];
	size_t len;
	char *body;

	(void)state;
	/* Another repository's id: a fork, whatever its name. */
	body = edited("github_pull_request_opened.json", "pull_request.head.repo.id",
		      json_integer(77), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 0);
	assert_true(pr.fork);
	forge_pr_free(&pr);
	free(body);
	/* A deleted fork: head.repo is null. */
	body = edited("github_pull_request_opened.json", "pull_request.head.repo", json_null(),
		      &len);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 0);
	assert_true(pr.fork);
	forge_pr_free(&pr);
	free(body);
	body = edited("github_pull_request_opened.json", "pull_request.head.sha",
		      json_string("nope"), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "pull_request.head.sha"));
	free(body);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, "[1]", 3, &pr, why, sizeof why, &err),
			 KPL_EINVAL);
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, "{\"action\":\"opened\"}", 19, &pr, why,
					sizeof why, &err),
			 KPL_EINVAL);
}

static void test_gitlab(void **state)
{
	struct forge_pr pr;
	struct kpl_err err = { 0 };
	char why[200];
	size_t len;
	char *body = fixture("gitlab_merge_request_open.json", &len);

	(void)state;
	assert_int_equal(forge_parse_pr(FORGE_GITLAB, body, len, &pr, why, sizeof why, &err), 0);
	assert_string_equal(pr.action, "open");
	assert_int_equal(pr.number, 1);
	assert_string_equal(pr.head_sha, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
	assert_string_equal(pr.head_branch, "ms-viewport");
	assert_string_equal(pr.base_branch, "master");
	assert_string_equal(pr.status_repo, "1");
	assert_string_equal(pr.ref, "refs/merge-requests/1/head");
	assert_false(pr.fork); /* source_project_id == target_project_id */
	assert_string_equal(pr.urls[0], "http://example.com/gitlabhq/gitlab-test.git");
	forge_pr_free(&pr);
	free(body);
	/* update without oldrev: only the request was edited. */
	body = edited("gitlab_merge_request_open.json", "object_attributes.action",
		      json_string("update"), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITLAB, body, len, &pr, why, sizeof why, &err), 1);
	assert_non_null(strstr(why, "oldrev"));
	free(body);
	body = edited("gitlab_merge_request_open.json", "object_attributes.action",
		      json_string("merge"), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITLAB, body, len, &pr, why, sizeof why, &err), 1);
	free(body);
	body = edited("gitlab_merge_request_open.json", "object_attributes.source_project_id",
		      json_integer(99), &len);
	assert_int_equal(forge_parse_pr(FORGE_GITLAB, body, len, &pr, why, sizeof why, &err), 0);
	assert_true(pr.fork);
	forge_pr_free(&pr);
	free(body);
}

static void test_key(void **state)
{
	struct forge_pr pr;
	struct kpl_err err = { 0 };
	char why[200], k1[FORGE_PR_KEY_LEN + 1], k2[FORGE_PR_KEY_LEN + 1], k3[FORGE_PR_KEY_LEN + 1];
	size_t len;
	char *body = fixture("github_pull_request_opened.json", &len);

	(void)state;
	assert_int_equal(forge_parse_pr(FORGE_GITHUB, body, len, &pr, why, sizeof why, &err), 0);
	assert_int_equal(forge_pr_key(FORGE_GITHUB, "git@github.com:codertocat/hello-world.git",
				      &pr, "app", k1, sizeof k1), 0);
	assert_int_equal(strlen(k1), FORGE_PR_KEY_LEN);
	assert_memory_equal(k1, "hook:github:", 12);
	/* The same repository however written: the same key. */
	assert_int_equal(forge_pr_key(FORGE_GITHUB, "https://github.com/Codertocat/Hello-World",
				      &pr, "app", k2, sizeof k2), 0);
	assert_string_equal(k1, k2);
	/* Another pipeline, or a new head: another key. */
	assert_int_equal(forge_pr_key(FORGE_GITHUB, "https://github.com/Codertocat/Hello-World",
				      &pr, "app2", k3, sizeof k3), 0);
	assert_string_not_equal(k1, k3);
	pr.head_sha[0] = pr.head_sha[0] == 'a' ? 'b' : 'a';
	assert_int_equal(forge_pr_key(FORGE_GITHUB, "https://github.com/Codertocat/Hello-World",
				      &pr, "app", k3, sizeof k3), 0);
	assert_string_not_equal(k1, k3);
	assert_int_equal(forge_pr_key(FORGE_GITHUB, "not a url", &pr, "app", k3, sizeof k3),
			 KPL_EINVAL);
	forge_pr_free(&pr);
	free(body);
}

static const char *header(const struct forge_request *r, const char *name)
{
	for (size_t i = 0; i < r->n_headers; i++)
		if (strcmp(r->headers[i].name, name) == 0)
			return r->headers[i].value;
	return NULL;
}

static void test_requests(void **state)
{
	Kpl__Store__V1__ForgeStatusRecord rec = KPL__STORE__V1__FORGE_STATUS_RECORD__INIT;
	struct forge_request r;
	struct kpl_err err = { 0 };
	char desc[300];

	(void)state;
	rec.forge = "github";
	rec.api_url = "https://ghe.example.com/api/v3/";
	rec.repo = "acme/app";
	rec.sha = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
	rec.context = "kpl/app";
	rec.target_url = "https://kpl.example.com/#/runs/01abc";
	memset(desc, 'x', 200);
	desc[200] = '\0';
	assert_int_equal(forge_status_request(&rec, "pending", "tok", desc, &r, &err), 0);
	assert_string_equal(r.url, "https://ghe.example.com/api/v3/repos/acme/app/statuses/"
				   "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
	assert_string_equal(header(&r, "Authorization"), "Bearer tok");
	assert_string_equal(header(&r, "Accept"), "application/vnd.github+json");
	assert_string_equal(header(&r, "X-GitHub-Api-Version"), "2022-11-28");
	{
		json_t *b = json_loads(r.body, 0, NULL);
		assert_string_equal(json_string_value(json_object_get(b, "state")), "pending");
		assert_string_equal(json_string_value(json_object_get(b, "context")), "kpl/app");
		assert_int_equal(strlen(json_string_value(json_object_get(b, "description"))),
				 FORGE_MAX_DESCRIPTION);
		json_decref(b);
	}
	forge_request_release(&r);
	rec.forge = "gitlab";
	rec.api_url = "https://gitlab.example.com/api/v4";
	rec.repo = "14";
	rec.ref = "feature";
	assert_int_equal(forge_status_request(&rec, "failed", "glpat", "d", &r, &err), 0);
	assert_string_equal(r.url, "https://gitlab.example.com/api/v4/projects/14/statuses/"
				   "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
	assert_string_equal(header(&r, "PRIVATE-TOKEN"), "glpat");
	assert_null(header(&r, "Authorization"));
	assert_non_null(strstr(r.body, "\"name\":\"kpl/app\""));
	assert_non_null(strstr(r.body, "\"ref\":\"feature\""));
	forge_request_release(&r);
	/* Nothing a record could hold changes the URL's path or a header. */
	rec.repo = "14/../../admin";
	assert_int_equal(forge_status_request(&rec, "failed", "t", "d", &r, &err), KPL_EINVAL);
	rec.repo = "14";
	assert_int_equal(forge_status_request(&rec, "failed", "t\r\nX: y", "d", &r, &err),
			 KPL_EINVAL);
	rec.forge = "github";
	rec.repo = "acme/app/x";
	assert_int_equal(forge_status_request(&rec, "failure", "t", "d", &r, &err), KPL_EINVAL);
	rec.repo = "acme/..";
	assert_int_equal(forge_status_request(&rec, "failure", "t", "d", &r, &err), KPL_EINVAL);
	rec.repo = "acme/app";
	rec.sha = "abc";
	assert_int_equal(forge_status_request(&rec, "failure", "t", "d", &r, &err), KPL_EINVAL);
}

static void test_states_and_judge(void **state)
{
	char why[200];

	(void)state;
	assert_null(forge_final_state(FORGE_GITHUB, KPL__V1__RUN_STATE__RUN_STATE_RUNNING));
	assert_string_equal(forge_final_state(FORGE_GITHUB, KPL__V1__RUN_STATE__RUN_STATE_FAILED),
			    "failure");
	assert_string_equal(forge_final_state(FORGE_GITLAB, KPL__V1__RUN_STATE__RUN_STATE_FAILED),
			    "failed");
	assert_string_equal(forge_final_state(FORGE_GITHUB,
					      KPL__V1__RUN_STATE__RUN_STATE_CANCELLED), "error");
	assert_string_equal(forge_final_state(FORGE_GITLAB,
					      KPL__V1__RUN_STATE__RUN_STATE_CANCELLED), "canceled");
	assert_int_equal(forge_judge(FORGE_GITHUB, 201, "{}", why, sizeof why), FORGE_DELIVERED);
	assert_int_equal(forge_judge(FORGE_GITHUB, 500, "", why, sizeof why), FORGE_RETRY);
	assert_int_equal(forge_judge(FORGE_GITHUB, 429, "", why, sizeof why), FORGE_RETRY);
	assert_int_equal(forge_judge(FORGE_GITHUB, 403,
				     "{\"message\":\"You have exceeded a secondary rate limit\"}",
				     why, sizeof why), FORGE_RETRY);
	assert_int_equal(forge_judge(FORGE_GITHUB, 401, "{\"message\":\"Bad credentials\"}", why,
				     sizeof why), FORGE_REJECTED);
	assert_non_null(strstr(why, "Bad credentials"));
	assert_int_equal(forge_judge(FORGE_GITHUB, 422, "", why, sizeof why), FORGE_REJECTED);
	assert_int_equal(forge_judge(FORGE_GITLAB, 400,
				     "{\"message\":\"Cannot transition status via :enqueue from "
				     ":pending\"}", why, sizeof why), FORGE_DELIVERED);
	assert_int_equal(forge_judge(FORGE_GITLAB, 400, "{\"error\":\"state is missing\"}", why,
				     sizeof why), FORGE_REJECTED);
}

static void test_retry_after(void **state)
{
	int64_t now = 1700000000000;

	(void)state;
	assert_int_equal(forge_retry_after_ms("7", NULL, NULL, now), 7000);
	/* GitHub's primary limit: wait for the reset, not the backoff. */
	assert_int_equal(forge_retry_after_ms(NULL, "0", "1700000042", now), 42000);
	assert_int_equal(forge_retry_after_ms(NULL, "0", "1699999999", now), 0);
	assert_int_equal(forge_retry_after_ms(NULL, "12", "1700000042", now), -1);
	assert_int_equal(forge_retry_after_ms(NULL, "0", "soon", now), -1);
	assert_int_equal(forge_retry_after_ms(NULL, NULL, NULL, now), -1);
	assert_int_equal(forge_retry_after_ms(NULL, "0", "1800000000", now),
			 FORGE_MAX_RATE_LIMIT_WAIT_MS);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_github_opened),
		cmocka_unit_test(test_github_actions),
		cmocka_unit_test(test_github_fork_and_bad_payloads),
		cmocka_unit_test(test_gitlab),
		cmocka_unit_test(test_key),
		cmocka_unit_test(test_requests),
		cmocka_unit_test(test_states_and_judge),
		cmocka_unit_test(test_retry_after),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
