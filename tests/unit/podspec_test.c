/*
 * podspec_test.c - a pod stage without I/O (stages/podspec.h): pod names,
 * the Pod and Secret objects, what Pod statuses mean, the log stream's
 * timestamps and where a resumed stream picks up, outputs from a
 * termination message, the stored state.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "stages/podspec.h"

/* ---- names ---- */

static bool dns_label(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 63 || s[0] == '-' || s[n - 1] == '-')
		return false;
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-'))
			return false;
	return true;
}

static void test_name_plain(void **state)
{
	char *n = podspec_name("r20261204abc", "compile", 2);

	(void)state;
	assert_string_equal(n, "kpl-r20261204abc-compile-2");
	free(n);
}

static void test_name_made_fit(void **state)
{
	char long_stage[200];
	char *a, *b, *c, *d;

	(void)state;
	memset(long_stage, 'x', sizeof long_stage - 1);
	long_stage[sizeof long_stage - 1] = '\0';
	/* Upper case and '_' are not DNS: fitted, with a hash of the exact
	 * names, so "Build_1" and "build-1" never share a pod. */
	a = podspec_name("r1", "Build_1", 1);
	b = podspec_name("r1", "build-1", 1);
	c = podspec_name("r1", long_stage, 10);
	d = podspec_name("r1", "Build_1", 1);
	assert_true(dns_label(a));
	assert_true(dns_label(b));
	assert_true(dns_label(c));
	assert_string_not_equal(a, b);
	assert_string_equal(a, d); /* deterministic */
	assert_true(strlen(c) <= 63);
	assert_non_null(strstr(c, "-10"));
	assert_int_equal(strncmp(a, "kpl-r1-build-1-", 15), 0);
	/* Attempts differ. */
	free(d);
	d = podspec_name("r1", "Build_1", 2);
	assert_string_not_equal(a, d);
	free(a);
	free(b);
	free(c);
	free(d);
}

static void test_label_value(void **state)
{
	char *a = podspec_label_value("compile");
	char *b = podspec_label_value("-odd name-");

	(void)state;
	assert_string_equal(a, "compile");
	assert_true(strlen(b) <= 63);
	assert_true(b[0] != '-' && b[strlen(b) - 1] != '-');
	assert_null(strchr(b, ' '));
	free(a);
	free(b);
}

static void test_escape_expansion(void **state)
{
	char *a = podspec_escape_expansion("echo $(date) $HOME $$ $(X");
	char *b = podspec_escape_expansion("no dollar");

	(void)state;
	assert_string_equal(a, "echo $$(date) $HOME $$$ $$(X");
	assert_string_equal(b, "no dollar");
	free(a);
	free(b);
}

/* ---- objects ---- */

static const struct podspec_env envs[] = {
	{ "KPL_OUTPUTS", PODSPEC_OUTPUTS_PATH, false },
	{ "TOKEN", "s3cr3t-value", true },
	{ "GREETING", "hello $(NAME)", false },
};

static void input(struct podspec_input *in, char **argv)
{
	memset(in, 0, sizeof *in);
	in->name = "kpl-r1-compile-1";
	in->namespace = "ci";
	in->image = "golang:1.22";
	in->run_id = "r1";
	in->stage = "compile";
	in->attempt = 1;
	in->argv = argv;
	in->n_argv = 3;
	in->env = envs;
	in->n_env = 3;
	in->secret_name = "kpl-r1-compile-1-env";
	in->grace_seconds = 10;
}

static void test_pod_object(void **state)
{
	char *argv[] = { "/bin/sh", "-c", "make && echo $(git rev-parse HEAD)", NULL };
	struct podspec_input in;
	json_t *res = json_pack("{s:{s:s}}", "limits", "memory", "1Gi");
	json_t *pod, *spec, *c, *env;
	char *text;

	(void)state;
	input(&in, argv);
	in.resources = res;
	in.workdir = "src";
	pod = podspec_pod(&in);
	text = json_dumps(pod, 0);
	/* The secret's value is never in the Pod. */
	assert_null(strstr(text, "s3cr3t-value"));
	free(text);
	spec = json_object_get(pod, "spec");
	assert_string_equal(json_string_value(json_object_get(spec, "restartPolicy")), "Never");
	assert_true(json_is_false(json_object_get(spec, "automountServiceAccountToken")));
	assert_int_equal(json_integer_value(json_object_get(spec,
							     "terminationGracePeriodSeconds")), 10);
	assert_string_equal(json_string_value(json_object_get(
		json_object_get(json_object_get(pod, "metadata"), "labels"), PODSPEC_LABEL_STAGE)),
		"compile");
	assert_string_equal(json_string_value(json_object_get(
		json_object_get(json_object_get(pod, "metadata"), "labels"), PODSPEC_LABEL_ATTEMPT)),
		"1");
	c = json_array_get(json_object_get(spec, "containers"), 0);
	assert_string_equal(json_string_value(json_object_get(c, "name")), PODSPEC_CONTAINER);
	assert_string_equal(json_string_value(json_object_get(c, "image")), "golang:1.22");
	assert_string_equal(json_string_value(json_object_get(c, "workingDir")), "/workspace/src");
	assert_string_equal(json_string_value(json_array_get(json_object_get(c, "command"), 2)),
			    "make && echo $$(git rev-parse HEAD)");
	assert_string_equal(json_string_value(json_object_get(c, "terminationMessagePath")),
			    PODSPEC_OUTPUTS_PATH);
	assert_string_equal(json_string_value(json_object_get(
		json_object_get(json_object_get(c, "resources"), "limits"), "memory")), "1Gi");
	env = json_object_get(c, "env");
	assert_int_equal(json_array_size(env), 3);
	assert_string_equal(json_string_value(json_object_get(json_array_get(env, 1), "name")),
			    "TOKEN");
	{
		json_t *ref = json_object_get(json_object_get(json_array_get(env, 1), "valueFrom"),
					      "secretKeyRef");
		assert_string_equal(json_string_value(json_object_get(ref, "name")),
				    "kpl-r1-compile-1-env");
		assert_string_equal(json_string_value(json_object_get(ref, "key")), "TOKEN");
		assert_null(json_object_get(json_array_get(env, 1), "value"));
	}
	assert_string_equal(json_string_value(json_object_get(json_array_get(env, 2), "value")),
			    "hello $$(NAME)");
	json_decref(pod);
	json_decref(res);
}

static void test_claim(void **state)
{
	char *argv[] = { "true", NULL, NULL, NULL };
	struct podspec_input in;
	char *name = podspec_claim_name("r1");
	json_t *pvc, *pod;

	(void)state;
	assert_string_equal(name, "kpl-r1-ws");
	input(&in, argv);
	in.n_argv = 1;
	in.claim = name;
	pvc = podspec_claim(&in, "64Mi");
	pod = podspec_pod(&in);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
		json_object_get(json_object_get(pvc, "spec"), "resources"), "requests"), "storage")),
		"64Mi");
	assert_null(json_object_get(json_object_get(json_object_get(pvc, "metadata"), "labels"),
				    PODSPEC_LABEL_STAGE));
	assert_string_equal(json_string_value(json_object_get(json_object_get(
		json_array_get(json_object_get(json_object_get(pod, "spec"), "volumes"), 0),
		"persistentVolumeClaim"), "claimName")), "kpl-r1-ws");
	json_decref(pvc);
	json_decref(pod);
	free(name);
}

static void test_secret_object(void **state)
{
	char *argv[] = { "true", NULL, NULL, NULL };
	struct podspec_input in;
	json_t *s;
	json_t *data;

	(void)state;
	input(&in, argv);
	s = podspec_secret(&in);
	data = json_object_get(s, "data");
	assert_int_equal(json_object_size(data), 1);
	/* base64("s3cr3t-value") */
	assert_string_equal(json_string_value(json_object_get(data, "TOKEN")), "czNjcjN0LXZhbHVl");
	assert_string_equal(json_string_value(json_object_get(json_object_get(s, "metadata"),
							      "name")),
			    "kpl-r1-compile-1-env");
	json_decref(s);
}

/* ---- statuses ---- */

static json_t *pod_json(const char *text)
{
	json_t *j = json_loads(text, 0, NULL);

	assert_non_null(j);
	return j;
}

static void test_status_pending_pull(void **state)
{
	struct podspec_status s;
	json_t *p = pod_json("{\"status\":{\"phase\":\"Pending\",\"containerStatuses\":[{\"name\":"
			     "\"step\",\"state\":{\"waiting\":{\"reason\":\"ImagePullBackOff\","
			     "\"message\":\"Back-off pulling image \\\"x/pullerror\\\"\"}}}]}}");

	(void)state;
	podspec_status_of(p, &s);
	assert_int_equal(s.phase, PODSPEC_PULL_FAILING);
	assert_false(s.terminal);
	assert_false(s.started);
	assert_string_equal(s.why, "ImagePullBackOff: Back-off pulling image \"x/pullerror\"");
	json_decref(p);
}

static void test_status_unschedulable(void **state)
{
	struct podspec_status s;
	json_t *p = pod_json("{\"status\":{\"phase\":\"Pending\",\"conditions\":[{\"type\":"
			     "\"PodScheduled\",\"status\":\"False\",\"reason\":\"Unschedulable\","
			     "\"message\":\"0/1 nodes are available: 1 Insufficient cpu.\"}]}}");

	(void)state;
	podspec_status_of(p, &s);
	assert_int_equal(s.phase, PODSPEC_UNSCHEDULABLE);
	assert_string_equal(s.why, "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.");
	json_decref(p);
}

static void test_status_running_and_done(void **state)
{
	struct podspec_status s;
	json_t *run = pod_json("{\"status\":{\"phase\":\"Running\",\"containerStatuses\":[{\"name\":"
			       "\"step\",\"state\":{\"running\":{\"startedAt\":\"2026-01-01T00:00:00Z\"}}}]}}");
	json_t *ok = pod_json("{\"status\":{\"phase\":\"Succeeded\",\"containerStatuses\":[{\"name\":"
			      "\"step\",\"state\":{\"terminated\":{\"exitCode\":0,\"reason\":"
			      "\"Completed\",\"message\":\"A=1\\nB=two\\n\"}}}]}}");
	json_t *bad = pod_json("{\"status\":{\"phase\":\"Failed\",\"containerStatuses\":[{\"name\":"
			       "\"step\",\"state\":{\"terminated\":{\"exitCode\":3,\"reason\":"
			       "\"Error\"}}}]}}");
	json_t *oom = pod_json("{\"status\":{\"phase\":\"Failed\",\"containerStatuses\":[{\"name\":"
			       "\"step\",\"state\":{\"terminated\":{\"exitCode\":137,\"reason\":"
			       "\"OOMKilled\"}}}]}}");
	json_t *evicted = pod_json("{\"metadata\":{\"deletionTimestamp\":\"2026-01-01T00:00:00Z\"},"
				   "\"status\":{\"phase\":\"Failed\",\"reason\":\"Evicted\","
				   "\"message\":\"The node was low on resource: memory.\"}}");

	(void)state;
	podspec_status_of(run, &s);
	assert_int_equal(s.phase, PODSPEC_RUNNING);
	assert_true(s.started);
	assert_false(s.terminal);
	podspec_status_of(ok, &s);
	assert_int_equal(s.phase, PODSPEC_SUCCEEDED);
	assert_true(s.terminal && s.started);
	assert_int_equal(s.exit_code, 0);
	assert_string_equal(s.message, "A=1\nB=two\n");
	podspec_status_of(bad, &s);
	assert_int_equal(s.phase, PODSPEC_FAILED);
	assert_string_equal(s.why, "the command exited with status 3 (Error)");
	podspec_status_of(oom, &s);
	assert_int_equal(s.exit_code, 137);
	assert_non_null(strstr(s.why, "OOMKilled"));
	podspec_status_of(evicted, &s);
	assert_true(s.terminal);
	assert_false(s.started);
	assert_true(s.deleting);
	assert_string_equal(s.why, "Evicted: The node was low on resource: memory.");
	{
		json_t *lost = pod_json("{\"status\":{\"phase\":\"Running\",\"conditions\":[{\"type\":"
					"\"DisruptionTarget\",\"status\":\"True\",\"reason\":"
					"\"DeletionByTaintManager\",\"message\":\"Taint manager: deleting "
					"due to NoExecute taint\"}],\"containerStatuses\":[{\"name\":"
					"\"step\",\"state\":{\"running\":{}}}]}}");
		podspec_status_of(lost, &s);
		assert_int_equal(s.phase, PODSPEC_FAILED);
		assert_true(s.terminal && s.started);
		assert_non_null(strstr(s.why, "node was lost"));
		assert_non_null(strstr(s.why, "DeletionByTaintManager"));
		json_decref(lost);
	}
	json_decref(run);
	json_decref(ok);
	json_decref(bad);
	json_decref(oom);
	json_decref(evicted);
}

/* ---- log stream ---- */

static void test_time(void **state)
{
	struct podspec_time t, u;
	char buf[48];

	(void)state;
	assert_int_equal(podspec_time_parse("2026-03-01T10:00:00.123456789Z", 30, &t), 0);
	assert_int_equal(t.nsec, 123456789);
	assert_string_equal(podspec_time_format(&t, true, buf, sizeof buf),
			    "2026-03-01T10:00:00.123456789Z");
	assert_string_equal(podspec_time_format(&t, false, buf, sizeof buf),
			    "2026-03-01T10:00:00Z");
	assert_int_equal(podspec_time_parse("2026-03-01T11:00:00.5+01:00", 27, &u), 0);
	assert_int_equal(u.sec, t.sec);
	assert_int_equal(u.nsec, 500000000);
	assert_int_equal(podspec_time_parse("2026-03-01 10:00:00Z", 20, &u), KPL_EINVAL);
	assert_int_equal(podspec_time_parse("not a time at all!!!", 20, &u), KPL_EINVAL);
}

static const char *const stream[] = {
	"2026-03-01T10:00:00.100000000Z one",
	"2026-03-01T10:00:00.200000000Z two",
	"2026-03-01T10:00:00.200000000Z three",
	"2026-03-01T10:00:00.200000000Z three",
	"2026-03-01T10:00:01.000000000Z five",
	"2026-03-01T10:00:01.000000000Z six",
};

/* Feeds stream[from..to) and appends what is stored to out. */
static void feed(struct podspec_logpos *pos, size_t from, size_t to, char *out)
{
	podspec_log_stream_begins(pos);
	for (size_t i = from; i < to; i++) {
		const char *text;
		size_t n;
		if (podspec_log_accept(pos, stream[i], strlen(stream[i]), &text, &n)) {
			strncat(out, text, n);
			strcat(out, "|");
		}
	}
}

static void test_log_resume_exact(void **state)
{
	(void)state;
	/* Every cut point: a first stream stops after k lines; the stored
	 * position goes through a record (as across a restart); the second
	 * stream starts at sinceTime (second precision: from the start of
	 * the second, so it repeats lines). Each line lands exactly once. */
	for (size_t k = 0; k <= KPL_ARRAY_SIZE(stream); k++) {
		struct podspec_logpos pos = { 0 };
		struct podspec_record rec = { 0 }, back;
		char out[512] = "", since[48];
		char *text;
		size_t from = 0;

		feed(&pos, 0, k, out);
		rec.state = PODSPEC_S_CREATED;
		rec.cluster = "c";
		rec.namespace = "ns";
		rec.pod = "p";
		rec.log = pos;
		text = podspec_record_encode(&rec);
		assert_int_equal(podspec_record_decode(text, &back), 0);
		free(text);
		podspec_log_since(&back.log, since, sizeof since);
		if (k > 0) {
			/* The API server sends lines from that second on. */
			assert_string_equal(since, k >= 5 ? "2026-03-01T10:00:01Z"
							  : "2026-03-01T10:00:00Z");
			from = k >= 5 ? 4 : 0;
		} else {
			assert_string_equal(since, "");
		}
		feed(&back.log, from, KPL_ARRAY_SIZE(stream), out);
		assert_string_equal(out, "one|two|three|three|five|six|");
		podspec_record_release(&back);
	}
}

static void test_log_line_without_timestamp(void **state)
{
	struct podspec_logpos pos = { 0 };
	const char *text;
	size_t n;

	(void)state;
	assert_true(podspec_log_accept(&pos, "plain", 5, &text, &n));
	assert_int_equal(n, 5);
	assert_false(pos.any);
	assert_true(podspec_log_accept(&pos, "2026-03-01T10:00:00Z ", 21, &text, &n));
	assert_int_equal(n, 0); /* an empty line */
}

/* ---- outputs ---- */

static void collect(void *data, const char *key, const char *value)
{
	char *out = data;

	strcat(out, key);
	strcat(out, "->");
	strcat(out, value);
	strcat(out, ";");
}

static void test_outputs(void **state)
{
	char out[256] = "";

	(void)state;
	assert_int_equal(podspec_outputs("A=1\n\nB=x=y\r\nnot a pair\n=v\nC=", collect, out), 2);
	assert_string_equal(out, "A->1;B->x=y;C->;");
}

/* ---- record ---- */

static void test_record(void **state)
{
	struct podspec_record r = { 0 }, b;
	char *text;

	(void)state;
	r.state = PODSPEC_S_DONE;
	r.cluster = kpl_strdup("kind");
	r.namespace = kpl_strdup("ci");
	r.pod = kpl_strdup("kpl-r1-a-1");
	r.secret = kpl_strdup("kpl-r1-a-1-env");
	r.result = 4;
	r.msg = kpl_strdup("pod kpl-r1-a-1: OOMKilled");
	text = podspec_record_encode(&r);
	assert_int_equal(podspec_record_decode(text, &b), 0);
	assert_int_equal(b.state, PODSPEC_S_DONE);
	assert_int_equal(b.result, 4);
	assert_string_equal(b.msg, r.msg);
	assert_string_equal(b.secret, r.secret);
	assert_false(b.log.any);
	free(text);
	podspec_record_release(&b);
	podspec_record_release(&r);
	assert_int_equal(podspec_record_decode("{\"v\":1,\"state\":\"created\"}", &b), KPL_EINVAL);
	assert_int_equal(podspec_record_decode("12", &b), KPL_EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_name_plain),
		cmocka_unit_test(test_name_made_fit),
		cmocka_unit_test(test_label_value),
		cmocka_unit_test(test_escape_expansion),
		cmocka_unit_test(test_pod_object),
		cmocka_unit_test(test_secret_object),
		cmocka_unit_test(test_claim),
		cmocka_unit_test(test_status_pending_pull),
		cmocka_unit_test(test_status_unschedulable),
		cmocka_unit_test(test_status_running_and_done),
		cmocka_unit_test(test_time),
		cmocka_unit_test(test_log_resume_exact),
		cmocka_unit_test(test_log_line_without_timestamp),
		cmocka_unit_test(test_outputs),
		cmocka_unit_test(test_record),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
