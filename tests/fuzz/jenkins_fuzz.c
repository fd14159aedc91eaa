/*
 * jenkins_fuzz.c - the Jenkins client's protocol logic (stages/jenkins.c)
 * over any sequence of replies: one build followed from the trigger (or
 * from resume data) through the state machine, each reply in fuzz.h's
 * text form fed to whatever request the last step asked for. A status of
 * 0 in the first reply makes its body the resume data; a status of 999
 * asks to cancel instead of replying. The pure helpers see each reply too.
 */
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "stages/jenkins.h"
#include "tests/fuzz/fuzz.h"

static const char *const names[] = { "GIT_SHA", "NOTE" };
static const char *const values[] = { "abc123", "a b&c" };

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

static void helpers(const struct fz_reply *r)
{
	const char *loc = fz_header(r, "Location");
	char *field = NULL, *crumb = NULL;
	int64_t id;

	if (loc)
		jenkins_parse_location(loc, &id);
	if (jenkins_parse_crumb(r->body, r->body_len, &field, &crumb) == 0) {
		free(field);
		free(crumb);
	}
	free(jenkins_image_marker(r->body));
	free(jenkins_error_text(r->body, r->body_len, 200));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct jenkins_config c = {
		.name = "ci-main",
		.base_url = "http://jenkins:8080/",
		.job = "team/app",
		.param_names = names,
		.param_values = values,
		.n_params = 2,
		.marker = "run1/image/1",
		.unstable = JENKINS_UNSTABLE_SUCCEED,
		.cred_word = "token",
	};
	struct fz_in in = { (const char *)data, size };
	struct kpl_err err = { 0 };
	struct jenkins_step s;
	struct jenkins *j;
	struct fz_reply r;
	int64_t now = 1000000;
	int have, steps = 0;

	if (size > 0 && (data[0] & 1))
		c.unstable = JENKINS_UNSTABLE_FAIL;
	if (!(j = jenkins_new(&c, &err)))
		abort(); /* a fixed, valid config */
	jenkins_step_init(&s);
	have = fz_next_reply(&in, &r);
	if (jenkins_begin(j, have && r.status == 0 ? r.body : NULL, now, &s, &err) != 0)
		goto out;
	if (have && r.status == 0) {
		fz_reply_release(&r);
		have = fz_next_reply(&in, &r);
	}
	while (have && s.result == JENKINS_RESULT_NONE && steps++ < 1000) {
		struct jenkins_reply jr = { 0 };

		helpers(&r);
		now += s.req.delay_ms + 1;
		if (r.status == 999) {
			struct jenkins_step c2;
			jenkins_step_init(&c2);
			if (jenkins_cancel(j, r.n_headers > 0, now, &c2)) {
				jenkins_step_release(&s);
				s = c2;
			} else {
				jenkins_step_release(&c2);
			}
		} else {
			jr.error = r.error ? KPL_EUNAVAILABLE : 0;
			jr.error_msg = r.error ? "connection refused" : NULL;
			jr.status = r.status;
			jr.header_names = (const char *const *)r.names;
			jr.header_values = (const char *const *)r.values;
			jr.n_headers = r.n_headers;
			jr.body = r.body;
			jr.body_len = r.body_len;
			jenkins_step_release(&s);
			jenkins_feed(j, &jr, now, &s);
		}
		jenkins_state_name(jenkins_state(j));
		jenkins_build_number(j);
		fz_reply_release(&r);
		have = fz_next_reply(&in, &r);
	}
out:
	if (have)
		fz_reply_release(&r);
	jenkins_step_release(&s);
	jenkins_free(j);
	return 0;
}
