/*
 * jenkins_test.c - stages/jenkins.c over fixture replies: crumb JSON,
 * Location parsing (folders too), queue item states, build JSON,
 * progressiveText headers, error bodies, the search by marker after an
 * ambiguous trigger or a restart, cancel and stop. No sockets, no clock.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "stages/jenkins.h"

#define BASE "http://ci.example:8080/jenkins"
#define JOBP BASE "/job/team/job/app/"
#define MARKER "run1/image/1"
#define NOW 1000000

static const char *const names[] = { "GIT_SHA", "NOTE" };
static const char *const values[] = { "abc123", "a b&c" };

static struct jenkins *new_client(enum jenkins_unstable unstable)
{
	struct jenkins_config c = {
		.name = "ci-main",
		.base_url = BASE,
		.job = "team/app",
		.param_names = names,
		.param_values = values,
		.n_params = 2,
		.marker = MARKER,
		.unstable = unstable,
		.cred_word = "token",
	};
	struct kpl_err err = { 0 };
	struct jenkins *j = jenkins_new(&c, &err);

	assert_non_null(j);
	return j;
}

/* Feeds a reply; headers are "Name", "value" pairs ending with NULL. */
static void feed(struct jenkins *j, long status, const char *body, struct jenkins_step *s,
		 ...)
{
	const char *hn[8], *hv[8];
	size_t n = 0;
	struct jenkins_reply r = { 0 };
	va_list ap;
	const char *name;

	va_start(ap, s);
	while ((name = va_arg(ap, const char *)) != NULL) {
		hn[n] = name;
		hv[n] = va_arg(ap, const char *);
		n++;
	}
	va_end(ap);
	r.status = status;
	r.body = body ? body : "";
	r.body_len = strlen(r.body);
	r.header_names = hn;
	r.header_values = hv;
	r.n_headers = n;
	jenkins_step_release(s);
	jenkins_feed(j, &r, NOW, s);
}

static void feed_at(struct jenkins *j, int64_t now, int error, struct jenkins_step *s)
{
	struct jenkins_reply r = { 0 };

	r.error = error;
	r.error_msg = "connection refused";
	r.body = "";
	jenkins_step_release(s);
	jenkins_feed(j, &r, now, s);
}

static bool has_note(const struct jenkins_step *s, const char *part)
{
	for (size_t i = 0; i < s->n_lines; i++)
		if (s->lines[i].note && strstr(s->lines[i].text, part))
			return true;
	return false;
}

static const char *output(const struct jenkins_step *s, const char *key)
{
	for (size_t i = 0; i < s->n_outputs; i++)
		if (strcmp(s->outputs[i].key, key) == 0)
			return s->outputs[i].value;
	return NULL;
}

/* jenkins_begin into a step that may hold an earlier one. */
static int begin(struct jenkins *j, const char *resume, int64_t now, struct jenkins_step *s,
		 struct kpl_err *err)
{
	jenkins_step_release(s);
	return jenkins_begin(j, resume, now, s, err);
}

static const char JOB_JSON[] =
	"{\"_class\":\"hudson.model.FreeStyleProject\",\"property\":[{\"_class\":"
	"\"hudson.model.ParametersDefinitionProperty\",\"parameterDefinitions\":["
	"{\"name\":\"GIT_SHA\"},{\"name\":\"KPL_RUN_ID\"}]}]}";
static const char CRUMB_JSON[] =
	"{\"_class\":\"hudson.security.csrf.DefaultCrumbIssuer\",\"crumb\":"
	"\"0123abcd\",\"crumbRequestField\":\"Jenkins-Crumb\"}";

/* Drives a fresh client to the queue item (crumb issued with a cookie). */
static struct jenkins *to_queue(struct jenkins_step *s)
{
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);
	struct kpl_err err = { 0 };

	assert_int_equal(begin(j, NULL, NOW, s, &err), 0);
	feed(j, 200, JOB_JSON, s, NULL);
	feed(j, 200, CRUMB_JSON, s, "Set-Cookie",
	     "JSESSIONID.ab12=node0xyz.node0; Path=/; HttpOnly", NULL);
	assert_int_equal(s->req.state, JENKINS_ST_TRIGGER);
	feed(j, 201, "", s, "Location", "http://ci.example:8080/jenkins/queue/item/25/", NULL);
	assert_int_equal(s->req.state, JENKINS_ST_QUEUE);
	return j;
}

static const char LEFT_JSON[] =
	"{\"_class\":\"hudson.model.Queue$LeftItem\",\"id\":25,\"cancelled\":false,"
	"\"why\":null,\"executable\":{\"_class\":\"hudson.model.FreeStyleBuild\","
	"\"number\":42,\"url\":\"https://ci.public/job/team/job/app/42/\"}}";

static struct jenkins *to_log(struct jenkins_step *s)
{
	struct jenkins *j = to_queue(s);

	feed(j, 200, LEFT_JSON, s, NULL);
	assert_int_equal(s->req.state, JENKINS_ST_LOG);
	return j;
}

/* ---------------------------------------------------------------------- */

static void test_job_path(void **state)
{
	char *p;

	(void)state;
	p = jenkins_job_path("team/app");
	assert_string_equal(p, "job/team/job/app/");
	free(p);
	p = jenkins_job_path("app");
	assert_string_equal(p, "job/app/");
	free(p);
	p = jenkins_job_path("a b/feature%2Fx/ü");
	assert_string_equal(p, "job/a%20b/job/feature%252Fx/job/%C3%BC/");
	free(p);
	assert_null(jenkins_job_path(""));
	assert_null(jenkins_job_path("a//b"));
	assert_null(jenkins_job_path("/a"));
	assert_null(jenkins_job_path("a/"));
	assert_null(jenkins_job_path(NULL));
}

static void test_location(void **state)
{
	int64_t id = 0;

	(void)state;
	assert_int_equal(jenkins_parse_location("http://ci/queue/item/25/", &id), 0);
	assert_int_equal(id, 25);
	assert_int_equal(jenkins_parse_location("https://ci/jenkins/queue/item/7", &id), 0);
	assert_int_equal(id, 7);
	assert_int_equal(jenkins_parse_location("/queue/item/123/", &id), 0);
	assert_int_equal(id, 123);
	assert_int_equal(jenkins_parse_location("http://ci/job/a/", &id), KPL_EINVAL);
	assert_int_equal(jenkins_parse_location("http://ci/queue/item/x/", &id), KPL_EINVAL);
	assert_int_equal(jenkins_parse_location("http://ci/queue/item/0/", &id), KPL_EINVAL);
	assert_int_equal(jenkins_parse_location("http://ci/queue/item/12abc/", &id), KPL_EINVAL);
	assert_int_equal(jenkins_parse_location(NULL, &id), KPL_EINVAL);
}

static void test_crumb_json(void **state)
{
	char *f, *c;

	(void)state;
	assert_int_equal(jenkins_parse_crumb(CRUMB_JSON, strlen(CRUMB_JSON), &f, &c), 0);
	assert_string_equal(f, "Jenkins-Crumb");
	assert_string_equal(c, "0123abcd");
	free(f);
	free(c);
	assert_int_equal(jenkins_parse_crumb("{\"crumb\":\"x\"}", 13, &f, &c), KPL_EINVAL);
	assert_null(f);
	assert_int_equal(jenkins_parse_crumb("<html>", 6, &f, &c), KPL_EINVAL);
	assert_int_equal(jenkins_parse_crumb("{\"crumb\":\"x\",\"crumbRequestField\":\"A:B\"}",
					     38, &f, &c), KPL_EINVAL);
}

static void test_marker_and_error_text(void **state)
{
	char *s;

	(void)state;
	s = jenkins_image_marker("KPL_IMAGE=reg.local/app@sha256:ab\r");
	assert_string_equal(s, "reg.local/app@sha256:ab");
	free(s);
	assert_null(jenkins_image_marker("KPL_IMAGE="));
	assert_null(jenkins_image_marker("KPL_IMAGE=a b"));
	assert_null(jenkins_image_marker(" KPL_IMAGE=a"));
	{
		const char *b = "<html><head><title>Error 409</title></head><body><h2>HTTP "
				"ERROR 409</h2>\n<p>team/app is not buildable</p></body></html>\n";
		s = jenkins_error_text(b, strlen(b), 200);
	}
	assert_string_equal(s, "HTTP ERROR 409 team/app is not buildable");
	free(s);
	s = jenkins_error_text("plain text\n", 11, 5);
	assert_string_equal(s, "plain");
	free(s);
}

static void test_fresh_flow_to_success(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(begin(j, "", NOW, &s, &err), 0);
	assert_int_equal(s.req.state, JENKINS_ST_JOB);
	assert_string_equal(s.req.method, "GET");
	assert_string_equal(s.req.url, JOBP "api/json?tree=property%5BparameterDefinitions"
			    "%5Bname%5D%5D");
	assert_null(s.resume);

	/* NOTE is not declared: a note says Jenkins ignores it */
	feed(j, 200, JOB_JSON, &s, NULL);
	assert_true(has_note(&s, "does not declare the parameter NOTE"));
	assert_false(has_note(&s, "KPL_RUN_ID"));
	assert_int_equal(s.req.state, JENKINS_ST_CRUMB);
	assert_string_equal(s.req.url, BASE "/crumbIssuer/api/json");

	feed(j, 200, CRUMB_JSON, &s, "Set-Cookie", "JSESSIONID.ab12=node0xyz.node0; Path=/",
	     "Set-Cookie", "other=1", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_string_equal(s.req.method, "POST");
	assert_string_equal(s.req.url, JOBP "buildWithParameters");
	assert_string_equal(s.req.body, "GIT_SHA=abc123&NOTE=a+b%26c&KPL_RUN_ID=run1%2Fimage%2F1");
	assert_string_equal(s.req.content_type, "application/x-www-form-urlencoded");
	assert_string_equal(s.req.crumb_field, "Jenkins-Crumb");
	assert_string_equal(s.req.crumb, "0123abcd");
	assert_string_equal(s.req.cookie, "JSESSIONID.ab12=node0xyz.node0; other=1");
	/* recorded before the POST */
	assert_true(s.record_first);
	assert_non_null(strstr(s.resume, "\"phase\":\"triggering\""));
	assert_non_null(strstr(s.resume, MARKER));

	feed(j, 201, "", &s, "Location", "http://ci.example:8080/jenkins/queue/item/25/", NULL);
	assert_true(s.record_first);
	assert_non_null(strstr(s.resume, "\"phase\":\"queued\""));
	assert_non_null(strstr(s.resume, "\"queue\":25"));
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	assert_string_equal(s.req.url, BASE "/queue/item/25/api/json");
	assert_int_equal(s.req.delay_ms, 0);

	/* waiting, blocked, buildable: poll; one note */
	feed(j, 200, "{\"_class\":\"hudson.model.Queue$WaitingItem\",\"id\":25,\"why\":"
	     "\"In the quiet period. Expires in 4.9 sec\"}", &s, NULL);
	assert_true(has_note(&s, "In the quiet period"));
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	assert_int_equal(s.req.delay_ms, JENKINS_POLL_MS);
	assert_null(s.resume);
	feed(j, 200, "{\"_class\":\"hudson.model.Queue$BlockedItem\",\"blocked\":true,\"why\":"
	     "\"Build #41 is already in progress\"}", &s, NULL);
	assert_int_equal(s.n_lines, 0);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	feed(j, 200, "{\"_class\":\"hudson.model.Queue$BuildableItem\",\"buildable\":true,"
	     "\"why\":\"Waiting for next available executor\"}", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);

	feed(j, 200, LEFT_JSON, &s, NULL);
	assert_int_equal(jenkins_build_number(j), 42);
	assert_string_equal(output(&s, "build_number"), "42");
	assert_string_equal(output(&s, "build_url"), "https://ci.public/job/team/job/app/42/");
	assert_true(s.record_first);
	assert_non_null(strstr(s.resume, "\"phase\":\"build\""));
	assert_non_null(strstr(s.resume, "\"number\":42"));
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	/* requests go to the configured URL, not Jenkins' idea of its root */
	assert_string_equal(s.req.url, JOBP "42/logText/progressiveText?start=0");

	/* not started yet */
	feed(j, 200, "", &s, "X-Text-Size", "0", "X-More-Data", "true", NULL);
	assert_int_equal(s.n_lines, 0);
	assert_int_equal(s.req.delay_ms, JENKINS_POLL_MS);
	assert_string_equal(s.req.url, JOBP "42/logText/progressiveText?start=0");

	/* CRLF lines and half a line: raw log "Started\nBuilding\nHal" = 20 */
	feed(j, 200, "Started\r\nBuilding\r\nHal", &s, "X-Text-Size", "20",
	     "X-More-Data", "true", NULL);
	assert_int_equal(s.n_lines, 2);
	assert_string_equal(s.lines[0].text, "Started");
	assert_false(s.lines[0].note);
	assert_string_equal(s.lines[1].text, "Building");
	assert_false(s.record_first);
	assert_non_null(strstr(s.resume, "\"offset\":17"));
	assert_int_equal(s.req.delay_ms, JENKINS_POLL_BUSY_MS);
	assert_string_equal(s.req.url, JOBP "42/logText/progressiveText?start=17");

	feed(j, 200, "Half done\r\nKPL_IMAGE=reg.local/app@sha256:aaaa\r\nFinished: SUCCESS\r\n",
	     &s, "X-Text-Size", "72", NULL);
	assert_int_equal(s.n_lines, 3);
	assert_string_equal(s.lines[0].text, "Half done");
	assert_string_equal(s.lines[2].text, "Finished: SUCCESS");
	assert_non_null(strstr(s.resume, "\"offset\":72"));
	assert_non_null(strstr(s.resume, "reg.local/app@sha256:aaaa"));
	assert_int_equal(s.req.state, JENKINS_ST_RESULT);

	/* post-production: not done yet, back to the log */
	feed(j, 200, "{\"number\":42,\"result\":\"SUCCESS\",\"inProgress\":true,"
	     "\"building\":false}", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	feed(j, 200, "", &s, "X-Text-Size", "72", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_RESULT);
	feed(j, 200, "{\"number\":42,\"result\":\"SUCCESS\",\"inProgress\":false,"
	     "\"artifacts\":[{\"relativePath\":\"kpl-image.json\"}]}", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_ARTIFACT);
	assert_string_equal(s.req.url, JOBP "42/artifact/kpl-image.json");

	/* the artifact wins over the log line */
	feed(j, 200, "{\"image\":\"reg.local/app:abc\",\"repository\":\"reg.local/app\","
	     "\"digest\":\"sha256:bbbb\",\"ref\":\"reg.local/app@sha256:bbbb\"}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_SUCCEEDED);
	assert_string_equal(s.msg, "Jenkins build #42 SUCCESS");
	assert_string_equal(output(&s, "image"), "reg.local/app@sha256:bbbb");
	assert_string_equal(output(&s, "digest"), "sha256:bbbb");
	assert_int_equal(jenkins_state(j), JENKINS_ST_DONE);
	jenkins_step_release(&s);
	jenkins_free(j);
}

/* The result of a finished build, after the log: "FAILURE" etc. */
static void end_with(struct jenkins *j, struct jenkins_step *s, const char *result)
{
	char body[200];

	feed(j, 200, "x\r\n", s, "X-Text-Size", "2", NULL);
	assert_int_equal(s->req.state, JENKINS_ST_RESULT);
	snprintf(body, sizeof body, "{\"number\":42,\"result\":\"%s\",\"inProgress\":false,"
		 "\"artifacts\":[]}", result);
	feed(j, 200, body, s, NULL);
}

static void test_results(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_log(&s);
	end_with(j, &s, "FAILURE");
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "Jenkins build #42 FAILURE");
	assert_null(output(&s, "image"));
	jenkins_free(j);

	j = to_log(&s);
	end_with(j, &s, "ABORTED");
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "Jenkins build #42 aborted in Jenkins");
	jenkins_free(j);

	j = to_log(&s);
	end_with(j, &s, "UNSTABLE");
	assert_int_equal(s.result, JENKINS_RESULT_SUCCEEDED);
	assert_true(has_note(&s, "UNSTABLE"));
	jenkins_free(j);

	j = to_log(&s);
	end_with(j, &s, "NOT_BUILT");
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "Jenkins build #42 NOT_BUILT");
	jenkins_free(j);
	jenkins_step_release(&s);
}

static void test_unstable_fail(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_FAIL);

	(void)state;
	assert_int_equal(begin(j, "{\"phase\":\"build\",\"number\":42,\"offset\":0,"
				       "\"marker\":\"m\"}", NOW, &s, &err), 0);
	end_with(j, &s, "UNSTABLE");
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "Jenkins build #42 UNSTABLE (with.unstable: fail)");
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_image_from_log_only(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_log(&s);
	feed(j, 200, "KPL_IMAGE=r/a@sha256:1111\r\nKPL_IMAGE=r/a@sha256:2222\r\n", &s,
	     "X-Text-Size", "52", NULL);
	feed(j, 200, "{\"result\":\"SUCCESS\",\"inProgress\":false}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_SUCCEEDED);
	assert_string_equal(output(&s, "image"), "r/a@sha256:2222"); /* the last wins */
	assert_string_equal(output(&s, "digest"), "sha256:2222");
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_queue_cancelled_in_jenkins(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_queue(&s);
	feed(j, 200, "{\"_class\":\"hudson.model.Queue$LeftItem\",\"cancelled\":true,"
	     "\"executable\":null}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "jenkins ci-main: queue item 25 of team/app was cancelled "
			    "in Jenkins");
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_auth_errors(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	begin(j, NULL, NOW, &s, &err);
	feed(j, 401, "Invalid password/token for user: kpl\n", &s,
	     "WWW-Authenticate", "Basic realm=\"Jenkins\"", NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "jenkins ci-main: 401 Unauthorized (check the token)");
	jenkins_free(j);

	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 403, "<html><body>Authentication required</body></html>", &s,
	     "X-You-Are-Authenticated-As", "anonymous", "X-Required-Permission",
	     "hudson.model.Hudson.Read", NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "jenkins ci-main: GET job/team/job/app/api/json?tree=property"
			    "%5BparameterDefinitions%5Bname%5D%5D: 403 Forbidden: Authentication "
			    "required (anonymous lacks hudson.model.Hudson.Read)");
	jenkins_free(j);
	jenkins_step_release(&s);
}

static void test_crumb_refused_then_fresh_one(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 200, CRUMB_JSON, &s, "Set-Cookie", "JSESSIONID.a=old; Path=/", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	feed(j, 403, "<html><body><p>No valid crumb was included in the request</p></body>"
	     "</html>", &s, NULL);
	assert_true(has_note(&s, "crumb was refused"));
	assert_int_equal(s.req.state, JENKINS_ST_CRUMB);
	assert_null(s.req.cookie);
	feed(j, 200, "{\"crumb\":\"ffff\",\"crumbRequestField\":\"Jenkins-Crumb\"}", &s,
	     "Set-Cookie", "JSESSIONID.a=new; Path=/", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_string_equal(s.req.crumb, "ffff");
	assert_string_equal(s.req.cookie, "JSESSIONID.a=new");
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_csrf_off(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "<html>Not Found</html>", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_null(s.req.crumb_field);
	assert_null(s.req.cookie);
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_trigger_errors(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	feed(j, 409, "<html><head><title>Error</title></head><body><p>team/app is not "
	     "buildable</p></body></html>", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_string_equal(s.msg, "jenkins ci-main: POST job/team/job/app/buildWithParameters: "
			    "409 Conflict: team/app is not buildable");
	jenkins_free(j);

	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 404, "", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_non_null(strstr(s.msg, "no job \"team/app\""));
	jenkins_free(j);

	/* 201 without Location */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	feed(j, 201, "", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_non_null(strstr(s.msg, "without a queue item"));
	jenkins_free(j);

	/* 303: ours is still queued */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	feed(j, 303, "", &s, "Location", "http://ci/queue/item/9/", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	assert_true(has_note(&s, "already queued"));
	jenkins_free(j);
	jenkins_step_release(&s);
}

static const char QUEUE_WITH_MARKER[] =
	"{\"items\":[{\"id\":3,\"actions\":[{\"parameters\":[{\"name\":\"KPL_RUN_ID\","
	"\"value\":\"other/x/1\"}]}]},{\"id\":5,\"actions\":[{},{\"parameters\":[{\"name\":"
	"\"GIT_SHA\",\"value\":\"abc\"},{\"name\":\"KPL_RUN_ID\",\"value\":\"" MARKER
	"\"}]}]}]}";

static void test_trigger_500_then_found_queued(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	feed(j, 500, "<html><body>java.lang.IllegalStateException</body></html>", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_FIND_QUEUE);
	assert_int_equal(s.req.delay_ms, JENKINS_RETRY_MS);
	assert_true(has_note(&s, "looking for the build before triggering again"));
	feed(j, 200, QUEUE_WITH_MARKER, &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	assert_string_equal(s.req.url, BASE "/queue/item/5/api/json");
	assert_true(s.record_first);
	assert_non_null(strstr(s.resume, "\"queue\":5"));
	jenkins_step_release(&s);
	jenkins_free(j);
}

static const char BUILDS_DECLARED[] =
	"{\"property\":[{\"parameterDefinitions\":[{\"name\":\"KPL_RUN_ID\"}]}],"
	"\"allBuilds\":[{\"number\":8,\"url\":\"http://ci/job/team/job/app/8/\",\"actions\":"
	"[{\"parameters\":[{\"name\":\"KPL_RUN_ID\",\"value\":\"other\"}]}]}]}";

static void test_resume_triggering(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);
	const char *resume = "{\"v\":1,\"phase\":\"triggering\",\"marker\":\"" MARKER
			     "\",\"triggers\":1}";

	(void)state;
	/* Found as a build */
	assert_int_equal(begin(j, resume, NOW, &s, &err), 0);
	assert_int_equal(s.req.state, JENKINS_ST_FIND_QUEUE);
	feed(j, 200, "{\"items\":[]}", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_FIND_BUILDS);
	/* `builds` holds the newest 100 only: a busy job passes that */
	assert_non_null(strstr(s.req.url, "%2CallBuilds%5Bnumber%2Curl%2Cactions"));
	assert_non_null(strstr(s.req.url, "%5D%5D%5D%7B0%2C1000%7D"));
	feed(j, 200, "{\"property\":[],\"allBuilds\":[{\"number\":9,\"url\":\"u9\",\"actions\":[{"
	     "\"parameters\":[{\"name\":\"KPL_RUN_ID\",\"value\":\"" MARKER "\"}]}]}]}", &s,
	     NULL);
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	assert_int_equal(jenkins_build_number(j), 9);
	assert_true(s.record_first);
	jenkins_free(j);

	/* Nothing anywhere, the job declares the marker: trigger (once) */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, resume, NOW, &s, &err);
	feed(j, 200, "{\"items\":[]}", &s, NULL);
	feed(j, 200, BUILDS_DECLARED, &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_CRUMB);
	feed(j, 404, "", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_non_null(strstr(s.req.body, "KPL_RUN_ID=run1%2Fimage%2F1"));
	/* the POST before the restart left nothing: it does not count */
	assert_non_null(strstr(s.resume, "\"triggers\":1"));
	jenkins_free(j);

	/* Killed JENKINS_MAX_TRIGGERS times while triggering, nothing ever
	 * reached Jenkins: still triggers (was: gave up) */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, "{\"v\":1,\"phase\":\"triggering\",\"marker\":\"" MARKER
	      "\",\"triggers\":3}", NOW, &s, &err);
	feed(j, 200, "{\"items\":[]}", &s, NULL);
	feed(j, 200, BUILDS_DECLARED, &s, NULL);
	feed(j, 404, "", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_non_null(strstr(s.resume, "\"triggers\":3"));
	jenkins_free(j);

	/* Nothing anywhere, the marker not declared: never trigger blindly */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, resume, NOW, &s, &err);
	feed(j, 200, "{\"items\":[]}", &s, NULL);
	feed(j, 200, "{\"property\":[],\"allBuilds\":[]}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_non_null(strstr(s.msg, "cannot tell whether Jenkins queued the build"));
	jenkins_free(j);
	jenkins_step_release(&s);
}

static void test_resume_queued_and_build(void **state)
{
	struct jenkins_step s = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j = new_client(JENKINS_UNSTABLE_SUCCEED);

	(void)state;
	assert_int_equal(begin(j, "{\"phase\":\"queued\",\"queue\":25,\"marker\":\""
				       MARKER "\"}", NOW, &s, &err), 0);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	assert_string_equal(s.req.url, BASE "/queue/item/25/api/json");
	/* the left item expired (5 minutes): its build is found by the marker */
	feed(j, 404, "", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_FIND_BUILDS);
	feed(j, 200, BUILDS_DECLARED, &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_non_null(strstr(s.msg, "queue item 25 is gone"));
	jenkins_free(j);

	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	assert_int_equal(begin(j, "{\"phase\":\"build\",\"queue\":25,\"number\":42,"
				       "\"offset\":1234,\"image\":\"r@sha256:9\",\"marker\":\""
				       MARKER "\"}", NOW, &s, &err), 0);
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	assert_string_equal(s.req.url, JOBP "42/logText/progressiveText?start=1234");
	/* the log was cut (rolled over): Jenkins answers from 0 */
	feed(j, 200, "new\r\n", &s, "X-Text-Size", "4", NULL);
	assert_true(has_note(&s, "shorter than before"));
	assert_non_null(strstr(s.resume, "\"offset\":4"));
	feed(j, 200, "{\"result\":\"SUCCESS\",\"inProgress\":false}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_SUCCEEDED);
	assert_string_equal(output(&s, "image"), "r@sha256:9"); /* kept across the restart */
	jenkins_free(j);

	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	assert_int_equal(begin(j, "{\"phase\":\"build\"}", NOW, &s, &err), KPL_EINVAL);
	jenkins_free(j);
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	assert_int_equal(begin(j, "not json", NOW, &s, &err), KPL_EINVAL);
	jenkins_free(j);
}

static void test_transient_then_give_up(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_log(&s);
	feed_at(j, NOW, KPL_EUNAVAILABLE, &s);
	assert_true(has_note(&s, "connection refused; retrying"));
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	assert_int_equal(s.req.delay_ms, JENKINS_RETRY_MS);
	feed(j, 503, "", &s, NULL);
	assert_int_equal(s.n_lines, 0); /* one note for the whole outage */
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	feed_at(j, NOW + JENKINS_GIVE_UP_MS, KPL_EUNAVAILABLE, &s);
	assert_int_equal(s.result, JENKINS_RESULT_FAILED);
	assert_non_null(strstr(s.msg, "failing for 300 s"));
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_cancel_running_build(void **state)
{
	struct jenkins_step s = { 0 }, c = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_log(&s);
	/* a poll is waiting (not sent): replaced by the stop */
	assert_true(jenkins_cancel(j, false, NOW, &c));
	assert_int_equal(c.req.state, JENKINS_ST_STOP);
	assert_string_equal(c.req.method, "POST");
	assert_string_equal(c.req.url, JOBP "42/stop");
	assert_string_equal(c.req.crumb, "0123abcd");
	assert_false(jenkins_cancel(j, false, NOW, &s)); /* again: nothing new */
	jenkins_step_release(&s);
	s = c;
	feed(j, 302, "", &s, "Location", JOBP "42/", NULL);
	assert_true(has_note(&s, "asked Jenkins to stop build #42"));
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	feed(j, 200, "Aborted by kpl\r\nFinished: ABORTED\r\n", &s, "X-Text-Size", "33", NULL);
	feed(j, 200, "{\"result\":\"ABORTED\",\"inProgress\":false}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_CANCELLED);
	assert_string_equal(s.msg, "cancelled: Jenkins build #42 ABORTED");
	jenkins_step_release(&s);
	jenkins_free(j);

	/* a build that does not stop: bounded wait */
	j = to_log(&s);
	assert_false(jenkins_cancel(j, true, NOW, &c)); /* in flight: its reply decides */
	feed(j, 200, "", &s, "X-Text-Size", "0", "X-More-Data", "true", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_STOP);
	feed(j, 200, "", &s, NULL);
	feed(j, 200, "", &s, "X-Text-Size", "0", "X-More-Data", "true", NULL);
	assert_int_equal(s.req.state, JENKINS_ST_LOG);
	{
		struct jenkins_reply r = { 0 };
		const char *hn[] = { "X-Text-Size", "X-More-Data" };
		const char *hv[] = { "0", "true" };
		r.status = 200;
		r.body = "";
		r.header_names = hn;
		r.header_values = hv;
		r.n_headers = 2;
		jenkins_step_release(&s);
		jenkins_feed(j, &r, NOW + JENKINS_STOP_WAIT_MS, &s);
	}
	assert_int_equal(s.result, JENKINS_RESULT_CANCELLED);
	assert_non_null(strstr(s.msg, "did not report ABORTED"));
	jenkins_step_release(&s);
	jenkins_free(j);
}

static void test_cancel_queued_and_before_trigger(void **state)
{
	struct jenkins_step s = { 0 }, c = { 0 };
	struct kpl_err err = { 0 };
	struct jenkins *j;

	(void)state;
	jenkins_step_init(&s);
	j = to_queue(&s);
	assert_true(jenkins_cancel(j, false, NOW, &c));
	assert_int_equal(c.req.state, JENKINS_ST_CANCEL_ITEM);
	assert_string_equal(c.req.url, BASE "/queue/cancelItem?id=25");
	jenkins_step_release(&s);
	s = c;
	feed(j, 204, "", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_QUEUE);
	feed(j, 200, "{\"_class\":\"hudson.model.Queue$LeftItem\",\"cancelled\":true}", &s, NULL);
	assert_int_equal(s.result, JENKINS_RESULT_CANCELLED);
	jenkins_free(j);

	/* cancelled while the item started: 422, then the build is stopped */
	j = to_queue(&s);
	assert_true(jenkins_cancel(j, false, NOW, &c));
	jenkins_step_release(&s);
	s = c;
	feed(j, 422, "", &s, NULL);
	feed(j, 200, LEFT_JSON, &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_STOP);
	jenkins_free(j);

	/* before the trigger went out: nothing to stop */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	assert_int_equal(s.req.state, JENKINS_ST_TRIGGER);
	assert_true(jenkins_cancel(j, false, NOW, &c));
	assert_int_equal(c.result, JENKINS_RESULT_CANCELLED);
	jenkins_step_release(&c);
	jenkins_free(j);

	/* the trigger in flight: its 201 is recorded, then the item cancelled */
	j = new_client(JENKINS_UNSTABLE_SUCCEED);
	begin(j, NULL, NOW, &s, &err);
	feed(j, 200, JOB_JSON, &s, NULL);
	feed(j, 404, "", &s, NULL);
	assert_false(jenkins_cancel(j, true, NOW, &c));
	feed(j, 201, "", &s, "Location", "http://ci/queue/item/7/", NULL);
	assert_true(s.record_first);
	assert_int_equal(s.req.state, JENKINS_ST_CANCEL_ITEM);
	jenkins_step_release(&s);
	jenkins_free(j);
}

/* A console line over JENKINS_MAX_PARTIAL_LINE comes in pieces tagged
 * with their cuts (so a secret across a cut is redacted), each cut between
 * UTF-8 characters. */
static void test_long_console_line_in_pieces(void **state)
{
	struct jenkins_step s = { 0 };
	struct jenkins *j;
	size_t big = JENKINS_MAX_PARTIAL_LINE + 10;
	char *body = malloc(big + 16), size[32];

	(void)state;
	j = to_log(&s);
	/* 'a' * big, then the first two bytes of a euro sign */
	memset(body, 'a', big);
	memcpy(body + big, "\xE2\x82", 3);
	snprintf(size, sizeof size, "%zu", big + 2);
	feed(j, 200, body, &s, "X-Text-Size", size, "X-More-Data", "true", NULL);
	assert_int_equal(s.n_lines, 1);
	assert_int_equal(strlen(s.lines[0].text), big);
	assert_int_equal(s.lines[0].cut, JENKINS_CUT_END);
	snprintf(size, sizeof size, "\"offset\":%zu", big);
	assert_non_null(strstr(s.resume, size));
	/* the euro sign whole, the line's end, then a line of its own */
	snprintf(size, sizeof size, "%zu", big + 3 + 5 + 6);
	feed(j, 200, "\xE2\x82\xACtail\r\nnext\r\n", &s, "X-Text-Size", size,
	     "X-More-Data", "true", NULL);
	assert_int_equal(s.n_lines, 2);
	assert_string_equal(s.lines[0].text, "\xE2\x82\xACtail");
	assert_int_equal(s.lines[0].cut, JENKINS_CUT_START);
	assert_string_equal(s.lines[1].text, "next");
	assert_int_equal(s.lines[1].cut, 0);
	jenkins_step_release(&s);
	jenkins_free(j);
	free(body);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_job_path),
		cmocka_unit_test(test_location),
		cmocka_unit_test(test_crumb_json),
		cmocka_unit_test(test_marker_and_error_text),
		cmocka_unit_test(test_fresh_flow_to_success),
		cmocka_unit_test(test_long_console_line_in_pieces),
		cmocka_unit_test(test_results),
		cmocka_unit_test(test_unstable_fail),
		cmocka_unit_test(test_image_from_log_only),
		cmocka_unit_test(test_queue_cancelled_in_jenkins),
		cmocka_unit_test(test_auth_errors),
		cmocka_unit_test(test_crumb_refused_then_fresh_one),
		cmocka_unit_test(test_csrf_off),
		cmocka_unit_test(test_trigger_errors),
		cmocka_unit_test(test_trigger_500_then_found_queued),
		cmocka_unit_test(test_resume_triggering),
		cmocka_unit_test(test_resume_queued_and_build),
		cmocka_unit_test(test_transient_then_give_up),
		cmocka_unit_test(test_cancel_running_build),
		cmocka_unit_test(test_cancel_queued_and_before_trigger),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
