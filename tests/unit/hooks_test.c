/*
 * hooks_test.c - the pure parts of engine/hooks.c (repository URL forms,
 * branch globs, GitHub and GitLab verification, push payloads) and the
 * Prometheus text of engine/metrics.c, without sockets or a loop.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/hooks.h"
#include "engine/metrics.h"

static void test_repo_key(void **state)
{
	static const char *const same[] = {
		"https://github.com/Acme/App.git",
		"https://user@GitHub.com:443/acme/app.git/",
		"http://github.com/acme/app",
		"ssh://git@github.com/acme/app.git",
		"ssh://git@github.com:22/acme/app",
		"git@github.com:acme/app.git",
		"github.com:acme/app",
		"git://github.com/acme/app",
	};
	char key[256];

	(void)state;
	for (size_t i = 0; i < sizeof same / sizeof *same; i++) {
		assert_int_equal(hooks_repo_key(same[i], key, sizeof key), 0);
		assert_string_equal(key, "github.com/acme/app");
	}
	assert_int_equal(hooks_repo_key("file:///srv/Git/app.git", key, sizeof key), 0);
	assert_string_equal(key, "/srv/Git/app");
	assert_int_equal(hooks_repo_key("/srv/Git/app/", key, sizeof key), 0);
	assert_string_equal(key, "/srv/Git/app");
	assert_int_equal(hooks_repo_key("/srv/git/app/.git", key, sizeof key), 0);
	assert_string_equal(key, "/srv/git/app");
	/* Other repositories stay apart. */
	assert_int_equal(hooks_repo_key("https://github.com/acme/app2", key, sizeof key), 0);
	assert_string_equal(key, "github.com/acme/app2");
	assert_int_equal(hooks_repo_key("https://gitlab.com/acme/app", key, sizeof key), 0);
	assert_string_equal(key, "gitlab.com/acme/app");
	/* Not URLs. */
	assert_int_equal(hooks_repo_key("", key, sizeof key), KPL_EINVAL);
	assert_int_equal(hooks_repo_key("app", key, sizeof key), KPL_EINVAL);
	assert_int_equal(hooks_repo_key("https://github.com", key, sizeof key), KPL_EINVAL);
	assert_int_equal(hooks_repo_key("file://host/x", key, sizeof key), KPL_EINVAL);
	assert_int_equal(hooks_repo_key("https://a b/c", key, sizeof key), KPL_EINVAL);
	assert_int_equal(hooks_repo_key("https://github.com/acme/app", key, 8), KPL_EINVAL);
}

static void test_branch_match(void **state)
{
	(void)state;
	assert_true(hooks_branch_match("main", "main"));
	assert_false(hooks_branch_match("main", "main2"));
	assert_true(hooks_branch_match("release/*", "release/1.2"));
	assert_true(hooks_branch_match("rel*", "release/1.2"));
	assert_false(hooks_branch_match("release/*", "hotfix/1"));
	assert_true(hooks_branch_match("v[0-9]", "v7"));
	assert_false(hooks_branch_match(NULL, "main"));
}

static void test_github_verify(void **state)
{
	const char *key = "It's a Secret to Everybody", *body = "Hello, World!";
	const char *good =
		"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
	char bad[80];

	(void)state;
	/* GitHub's documented example. */
	assert_true(hooks_github_verify(key, body, strlen(body), good));
	assert_false(hooks_github_verify("another key", body, strlen(body), good));
	assert_false(hooks_github_verify(key, "Hello, World?", 13, good));
	snprintf(bad, sizeof bad, "%s", good);
	bad[strlen(bad) - 1] = '0';
	assert_false(hooks_github_verify(key, body, strlen(body), bad));
	/* Uppercase hex, no prefix, sha1=, a truncated one, none. */
	assert_false(hooks_github_verify(key, body, strlen(body),
		"sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17"));
	assert_false(hooks_github_verify(key, body, strlen(body), good + 7));
	assert_false(hooks_github_verify(key, body, strlen(body),
		"sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"));
	assert_false(hooks_github_verify(key, body, strlen(body), "sha256=757107ea"));
	assert_false(hooks_github_verify(key, body, strlen(body), NULL));
}

static void test_gitlab_verify(void **state)
{
	(void)state;
	assert_true(hooks_gitlab_verify("s3cr3t-token", "s3cr3t-token"));
	assert_false(hooks_gitlab_verify("s3cr3t-token", "s3cr3t-toke"));
	assert_false(hooks_gitlab_verify("s3cr3t-token", "s3cr3t-tokeN"));
	assert_false(hooks_gitlab_verify("s3cr3t-token", ""));
	assert_false(hooks_gitlab_verify("s3cr3t-token", NULL));
}

static void test_parse_github(void **state)
{
	const char *body =
		"{\"ref\":\"refs/heads/release/1\",\"before\":\"0000000000000000000000000000000000000000\","
		"\"after\":\"ABCDEF0123456789abcdef0123456789abcdef01\",\"deleted\":false,"
		"\"repository\":{\"clone_url\":\"https://github.com/acme/app.git\","
		"\"ssh_url\":\"git@github.com:acme/app.git\",\"html_url\":\"https://github.com/acme/app\"}}";
	struct hooks_push p;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(hooks_parse_push(HOOKS_GITHUB, body, strlen(body), &p, &err), 0);
	assert_string_equal(p.ref, "refs/heads/release/1");
	assert_string_equal(p.branch, "release/1");
	assert_string_equal(p.sha, "abcdef0123456789abcdef0123456789abcdef01");
	assert_string_equal(p.before, "0000000000000000000000000000000000000000");
	assert_false(p.deleted);
	assert_int_equal(p.n_urls, 3);
	assert_string_equal(p.urls[0], "https://github.com/acme/app.git");
	hooks_push_free(&p);
}

static void test_parse_gitlab_and_errors(void **state)
{
	const char *tag =
		"{\"ref\":\"refs/tags/v1\",\"after\":\"abcdef0123456789abcdef0123456789abcdef01\","
		"\"project\":{\"git_http_url\":\"https://gitlab.com/g/app.git\"},"
		"\"repository\":{\"url\":\"git@gitlab.com:g/app.git\"}}";
	const char *del =
		"{\"ref\":\"refs/heads/x\",\"after\":\"0000000000000000000000000000000000000000\","
		"\"project\":{\"web_url\":\"https://gitlab.com/g/app\"}}";
	struct hooks_push p;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(hooks_parse_push(HOOKS_GITLAB, tag, strlen(tag), &p, &err), 0);
	assert_null(p.branch);
	assert_int_equal(p.n_urls, 2);
	hooks_push_free(&p);
	assert_int_equal(hooks_parse_push(HOOKS_GITLAB, del, strlen(del), &p, &err), 0);
	assert_true(p.deleted);
	hooks_push_free(&p);

	assert_int_equal(hooks_parse_push(HOOKS_GITHUB, "[1]", 3, &p, &err), KPL_EINVAL);
	assert_int_equal(hooks_parse_push(HOOKS_GITHUB, "{", 1, &p, &err), KPL_EINVAL);
	const char *badsha = "{\"ref\":\"refs/heads/a\",\"after\":\"xyz\"}";
	assert_int_equal(hooks_parse_push(HOOKS_GITHUB, badsha, strlen(badsha), &p, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "after"));
	const char *nourl = "{\"ref\":\"refs/heads/a\","
			    "\"after\":\"abcdef0123456789abcdef0123456789abcdef01\"}";
	assert_int_equal(hooks_parse_push(HOOKS_GITHUB, nourl, strlen(nourl), &p, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "repository"));
}

/* The idempotency key of a push: what the signature covers decides it, not
 * the delivery id (a replay with a new id is the same push). */
static void test_push_key(void **state)
{
	struct hooks_push p = { .ref = "refs/heads/main", .sha = "ab12", .before = "00" };
	struct hooks_push q;
	char k1[HOOKS_PUSH_KEY_LEN + 1], k2[HOOKS_PUSH_KEY_LEN + 1];

	(void)state;
	assert_int_equal(hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &p, "app",
					k1, sizeof k1), 0);
	assert_int_equal(strlen(k1), HOOKS_PUSH_KEY_LEN);
	assert_memory_equal(k1, "hook:github:", 12);
	/* The same repository written another way: the same key. */
	assert_int_equal(hooks_push_key(HOOKS_GITHUB, "git@github.com:Acme/app.git", &p, "app",
					k2, sizeof k2), 0);
	assert_string_equal(k1, k2);
	/* Any part changed: another key. */
	q = p;
	q.sha = "ab13";
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &q, "app", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	q = p;
	q.before = "01";
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &q, "app", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	q = p;
	q.ref = "refs/heads/mainx";
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &q, "app", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &p, "app2", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/ap", &p, "app", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	hooks_push_key(HOOKS_GITLAB, "https://github.com/acme/app", &p, "app", k2, sizeof k2);
	assert_memory_equal(k2, "hook:gitlab:", 12);
	assert_string_not_equal(k1 + 12, k2 + 12);
	/* Parts run together differently: another key (NUL-separated). */
	q = p;
	q.ref = "refs/heads/main0";
	q.before = "0";
	hooks_push_key(HOOKS_GITHUB, "https://github.com/acme/app", &q, "app", k2, sizeof k2);
	assert_string_not_equal(k1, k2);
	assert_int_equal(hooks_push_key(HOOKS_GITHUB, "app", &p, "app", k2, sizeof k2),
			 KPL_EINVAL);
}

/* Which repository URLs kpld takes, and how a stored one with a token shows. */
static void test_repo_url_problem(void **state)
{
	static const char *const ok[] = {
		"https://github.com/acme/app.git", "ssh://git@github.com/acme/app.git",
		"git+ssh://git@github.com/acme/app", "git@github.com:acme/app.git",
		"/srv/git/app", "file:///srv/git/app", "http://host/a@b", "https://host/x?u=a@b",
	};
	static const char *const creds[] = {
		"https://TOKEN@github.com/acme/app.git", "https://u:p@github.com/a/b",
		"git://t@host/a", "ssh://git:pw@host/a", "HTTPS://t@host/a", "file://u@/srv/x",
	};
	static const char *const helpers[] = { "ext::sh -c true", "fd::3", "git-remote::x" };
	char out[256];

	(void)state;
	for (size_t i = 0; i < sizeof ok / sizeof *ok; i++)
		if (hooks_repo_url_problem(ok[i]))
			fail_msg("%s refused: %s", ok[i], hooks_repo_url_problem(ok[i]));
	for (size_t i = 0; i < sizeof creds / sizeof *creds; i++) {
		const char *why = hooks_repo_url_problem(creds[i]);
		assert_non_null(why);
		assert_non_null(strstr(why, "credentials"));
	}
	for (size_t i = 0; i < sizeof helpers / sizeof *helpers; i++) {
		const char *why = hooks_repo_url_problem(helpers[i]);
		assert_non_null(why);
		assert_non_null(strstr(why, "remote helper"));
	}
	hooks_url_for_display("https://TOKEN@github.com/acme/app", out, sizeof out);
	assert_string_equal(out, "https://***@github.com/acme/app");
	hooks_url_for_display("ssh://git@github.com/acme/app", out, sizeof out);
	assert_string_equal(out, "ssh://git@github.com/acme/app");
	hooks_url_for_display("/srv/git/a@b", out, sizeof out);
	assert_string_equal(out, "/srv/git/a@b");
}

static void test_metrics_text(void **state)
{
	size_t len;
	char *t;

	(void)state;
	metrics_reset();
	metrics_seed_run(2);          /* a recovered RUNNING run */
	metrics_run_state(0, 1);      /* submitted */
	metrics_run_state(1, 2);
	metrics_run_state(2, 3);      /* succeeded */
	metrics_run_state(2, 4);      /* the recovered one failed */
	metrics_run_state(4, 1);      /* ... and is retried */
	metrics_stage_done("script", 0.3);
	metrics_stage_done("script", 42);
	metrics_grpc_call("/kpl.v1.Pipelines/GetRun", 5);
	metrics_grpc_call("/kpl.v1.Pipelines/GetRun", 5);
	metrics_grpc_call("/kpl.v1.Pipelines/GetRun", 0);
	metrics_webhook("github", "accepted");
	t = metrics_render(1, &len);
	assert_int_equal(strlen(t), len);
	assert_non_null(strstr(t, "# TYPE kpl_runs gauge\n"));
	assert_non_null(strstr(t, "kpl_runs{state=\"queued\"} 1\n"));
	assert_non_null(strstr(t, "kpl_runs{state=\"running\"} 0\n"));
	assert_non_null(strstr(t, "kpl_runs{state=\"succeeded\"} 1\n"));
	assert_non_null(strstr(t, "kpl_runs{state=\"failed\"} 1\n"));
	assert_non_null(strstr(t, "kpl_runs_active 1\n"));
	assert_non_null(strstr(t, "kpl_queue_depth 1\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_bucket{kind=\"script\",le=\"0.1\"} 0\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_bucket{kind=\"script\",le=\"0.5\"} 1\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_bucket{kind=\"script\",le=\"30\"} 1\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_bucket{kind=\"script\",le=\"60\"} 2\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_bucket{kind=\"script\",le=\"+Inf\"} 2\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_sum{kind=\"script\"} 42.3\n"));
	assert_non_null(strstr(t, "kpl_stage_duration_seconds_count{kind=\"script\"} 2\n"));
	assert_non_null(strstr(t, "kpl_grpc_calls_total{method=\"/kpl.v1.Pipelines/GetRun\","
				  "code=\"NOT_FOUND\"} 2\n"));
	assert_non_null(strstr(t, "kpl_grpc_calls_total{method=\"/kpl.v1.Pipelines/GetRun\","
				  "code=\"OK\"} 1\n"));
	assert_non_null(strstr(t, "kpl_webhook_deliveries_total{source=\"github\","
				  "result=\"accepted\"} 1\n"));
	assert_int_equal(t[len - 1], '\n');
	free(t);
	metrics_reset();
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_repo_key),
		cmocka_unit_test(test_branch_match),
		cmocka_unit_test(test_github_verify),
		cmocka_unit_test(test_gitlab_verify),
		cmocka_unit_test(test_parse_github),
		cmocka_unit_test(test_parse_gitlab_and_errors),
		cmocka_unit_test(test_metrics_text),
		cmocka_unit_test(test_push_key),
		cmocka_unit_test(test_repo_url_problem),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
