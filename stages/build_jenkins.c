/*
 * build_jenkins.c - the `build` kind's jenkins driver: the libuv/libcurl
 * glue around stages/jenkins.c (which decides everything).
 *
 *   with:
 *     driver: jenkins
 *     jenkins: ci-main        # an endpoint of the daemon config's `jenkins:`
 *     job: team/app           # full name; folders separated by '/'
 *     params: { GIT_SHA: "${{ params.sha }}" }   # optional
 *     unstable: succeed       # or fail: what an UNSTABLE build counts as
 *
 * One request at a time: a step of the protocol logic says what to log, what
 * to persist (durably first, or with the log lines), which outputs to set,
 * and which request to send next (after a delay) or how the attempt ends.
 * Every text that reaches a log line or a message goes through stage_redact.
 *
 * Lifetime: struct bj is freed once the attempt is reported or abandoned and
 * nothing of it is pending: no HTTP request, no resume record, the timer
 * closed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/build.h"
#include "base/http.h"
#include "stages/jenkins.h"
#include "stages/kinds.h"

#define LOG "jenkins"
#define BJ_REQUEST_TIMEOUT_MS 60000

struct bj {
	struct stage *st;            /* NULL once reported or abandoned */
	uv_loop_t *loop;
	struct jenkins *j;
	struct stage_endpoint ep;
	uv_timer_t timer;
	bool timer_closed;
	bool closing;
	bool waiting;                /* the timer runs for pending.req */
	bool recording;              /* stage_record_resume in flight */
	struct http_request *req;    /* in flight */
	struct jenkins_step pending; /* its request not yet sent */
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static bool has_template(const char *s)
{
	return strstr(s, "${{") != NULL;
}

static int bj_check_with(const struct pl_node *with, const char *file, const char *path,
			 struct kpl_err *err)
{
	const struct pl_node *n;

	for (size_t i = 0; i < with->n; i++) {
		const char *k = with->keys[i]->scalar;
		if (strcmp(k, "driver") && strcmp(k, "jenkins") && strcmp(k, "job") &&
		    strcmp(k, "params") && strcmp(k, "unstable"))
			return with_err(err, file, with->keys[i], path, k, "unknown key for "
					"driver jenkins (allowed: driver, jenkins, job, params, "
					"unstable)");
	}
	n = pl_map_get(with, "jenkins");
	if (!n)
		return with_err(err, file, with, path, "jenkins", "required (the name of an "
				"endpoint in the daemon config's `jenkins:` section)");
	if (n->type != PL_SCALAR || !n->scalar[0])
		return with_err(err, file, n, path, "jenkins", "must be a non-empty string");
	n = pl_map_get(with, "job");
	if (!n)
		return with_err(err, file, with, path, "job", "required (the job's full name, "
				"folders separated by '/': team/app)");
	if (n->type != PL_SCALAR || !n->scalar[0])
		return with_err(err, file, n, path, "job", "must be a non-empty string");
	if (!has_template(n->scalar)) {
		char *p = jenkins_job_path(n->scalar);
		if (!p)
			return with_err(err, file, n, path, "job", "must be a job name, folders "
					"separated by single '/' (team/app)");
		free(p);
	}
	n = pl_map_get(with, "params");
	if (n) {
		if (n->type != PL_MAP)
			return with_err(err, file, n, path, "params", "must be a mapping of "
					"parameter names to values");
		for (size_t i = 0; i < n->n; i++) {
			char key[200];
			snprintf(key, sizeof key, "params.%s", n->keys[i]->scalar);
			if (n->items[i]->type != PL_SCALAR)
				return with_err(err, file, n->items[i], path, key,
						"must be a string");
			if (strcmp(n->keys[i]->scalar, JENKINS_MARKER_PARAM) == 0)
				return with_err(err, file, n->keys[i], path, key, "is set by kpl "
						"(it marks the build as this attempt's)");
		}
	}
	n = pl_map_get(with, "unstable");
	if (n && (n->type != PL_SCALAR ||
		  (!has_template(n->scalar) && strcmp(n->scalar, "succeed") &&
		   strcmp(n->scalar, "fail"))))
		return with_err(err, file, n, path, "unstable", "must be succeed or fail");
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Lifetime */

static void bj_maybe_free(struct bj *b)
{
	if (b->st || b->req || b->recording || !b->timer_closed)
		return;
	jenkins_step_release(&b->pending);
	jenkins_free(b->j);
	stage_endpoint_release(&b->ep);
	free(b);
}

static void on_timer_closed(uv_handle_t *h)
{
	struct bj *b = h->data;

	b->timer_closed = true;
	bj_maybe_free(b);
}

/* The attempt is over for this kpld (reported or abandoned). */
static void bj_close(struct bj *b)
{
	if (b->closing)
		return;
	b->closing = true;
	b->st = NULL;
	b->waiting = false;
	if (b->req)
		http_request_cancel(b->req); /* its on_done frees */
	uv_close((uv_handle_t *)&b->timer, on_timer_closed);
}

/* ---------------------------------------------------------------------- */
/* Steps */

static void bj_send(struct bj *b);
static void bj_exec(struct bj *b, struct jenkins_step *s);

_Static_assert(JENKINS_CUT_START == STAGE_LOG_CUT_START && JENKINS_CUT_END == STAGE_LOG_CUT_END,
	       "jenkins.h and stage.h name the same cuts");

static void emit_line(struct bj *b, const struct jenkins_line *l, bool staged)
{
	char *text;
	Kpl__V1__LogStream stream = l->note ? KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM
					    : KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT;

	if (l->cut) {
		/* A piece: redacted knowing where it was cut. */
		stage_log_piece(b->st, stream, l->text, strlen(l->text), l->cut, !staged);
		return;
	}
	text = stage_redact(b->st, l->text);

	if (staged)
		stage_log_staged(b->st, stream, text, strlen(text));
	else
		stage_log(b->st, stream, text, strlen(text));
	free(text);
}

static void on_recorded(struct stage *st, int status, void *data)
{
	struct bj *b = data;

	(void)st;
	b->recording = false;
	if (!b->st) {
		bj_maybe_free(b);
		return;
	}
	if (status) {
		struct stage *s = b->st;
		char msg[300];
		snprintf(msg, sizeof msg, "cannot record the Jenkins build's state: %s",
			 kpl_strerror(status));
		bj_close(b);
		stage_done(s, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return;
	}
	bj_send(b);
}

static void on_timer(uv_timer_t *t)
{
	struct bj *b = t->data;

	b->waiting = false;
	if (b->st)
		bj_send(b);
}

static void on_http_done(struct http_response *resp, int status, void *data)
{
	struct bj *b = data;
	struct jenkins_reply r = { 0 };
	struct jenkins_step s;
	size_t n = status ? 0 : http_response_header_count(resp);
	const char **names = kpl_calloc(n + 1, sizeof *names);
	const char **values = kpl_calloc(n + 1, sizeof *values);

	b->req = NULL;
	if (!b->st) {
		free(names);
		free(values);
		bj_maybe_free(b);
		return;
	}
	for (size_t i = 0; i < n; i++)
		http_response_header_at(resp, i, &names[i], &values[i]);
	r.error = status;
	r.error_msg = status ? resp->err.msg : NULL;
	r.status = resp->status;
	r.header_names = names;
	r.header_values = values;
	r.n_headers = n;
	r.body = resp->body;
	r.body_len = resp->body_len;
	kpl_debug(LOG, "run %s stage %s: %s -> %ld%s%s", stage_run_id(b->st),
		  stage_name(b->st), jenkins_state_name(jenkins_state(b->j)), resp->status,
		  status ? " " : "", status ? resp->err.msg : "");
	jenkins_feed(b->j, &r, kpl_now_ms(), &s);
	free(names);
	free(values);
	bj_exec(b, &s);
}

static void bj_send(struct bj *b)
{
	const struct jenkins_request *q = &b->pending.req;
	struct http_request_options o = { 0 };
	struct http_header h[3];
	struct kpl_err err = { 0 };
	const struct cfg_endpoint *ep = b->ep.ep;
	size_t nh = 0;

	if (b->req || b->waiting || b->recording || !q->url)
		return;
	if (q->delay_ms > 0) {
		int64_t d = q->delay_ms;
		b->pending.req.delay_ms = 0; /* waited once */
		b->waiting = true;
		uv_timer_start(&b->timer, on_timer, (uint64_t)d, 0);
		return;
	}
	if (q->crumb_field && q->crumb)
		h[nh++] = (struct http_header){ q->crumb_field, q->crumb };
	if (q->cookie)
		h[nh++] = (struct http_header){ "Cookie", q->cookie };
	if (q->content_type)
		h[nh++] = (struct http_header){ "Content-Type", q->content_type };
	o.method = q->method;
	o.url = q->url;
	o.headers = h;
	o.n_headers = nh;
	o.body = q->body;
	o.body_len = q->body_len;
	o.timeout_ms = BJ_REQUEST_TIMEOUT_MS;
	if (b->ep.username) {
		o.auth.kind = HTTP_AUTH_BASIC;
		o.auth.user = b->ep.username;
		o.auth.password = b->ep.token ? b->ep.token : b->ep.password ? b->ep.password : "";
	}
	o.tls.ca_file = ep->ca_file;
	o.tls.client_cert = ep->client_cert;
	o.tls.client_key = ep->client_key;
	o.tls.insecure = ep->insecure;
	o.on_done = on_http_done;
	o.data = b;
	if (http_request_start(stage_http(b->st), &o, &b->req, &err)) {
		struct stage *st = b->st;
		char *msg = stage_redact(st, err.msg);
		b->req = NULL;
		bj_close(b);
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		free(msg);
		return;
	}
}

static Kpl__V1__StageState stage_state_of(enum jenkins_result r)
{
	switch (r) {
	case JENKINS_RESULT_SUCCEEDED: return KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED;
	case JENKINS_RESULT_CANCELLED: return KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
	default: return KPL__V1__STAGE_STATE__STAGE_STATE_FAILED;
	}
}

/* Does what step s says, and takes it over. */
static void bj_exec(struct bj *b, struct jenkins_step *s)
{
	struct stage *st = b->st;
	bool staged = s->resume != NULL;

	for (size_t i = 0; i < s->n_lines; i++)
		emit_line(b, &s->lines[i], staged);
	for (size_t i = 0; i < s->n_outputs; i++)
		if (stage_set_output(st, s->outputs[i].key, s->outputs[i].value))
			stage_logf(st, "output %s is too long; not set", s->outputs[i].key);
	if (s->result != JENKINS_RESULT_NONE) {
		char *msg = s->msg ? stage_redact(st, s->msg) : NULL;
		Kpl__V1__StageState state = stage_state_of(s->result);
		if (s->resume)
			stage_save_resume(st, s->resume);
		jenkins_step_release(s);
		bj_close(b);
		stage_done(st, state, msg);
		free(msg);
		return;
	}
	jenkins_step_release(&b->pending);
	b->pending = *s;
	jenkins_step_init(s);
	if (b->pending.resume && b->pending.record_first) {
		/* Durable before the request goes out (the trigger) or before
		 * anything else happens (the queue item, the build number). */
		b->recording = true;
		stage_record_resume(st, 0, 0, b->pending.resume, on_recorded, b);
		return;
	}
	if (b->pending.resume)
		stage_save_resume(st, b->pending.resume); /* with the lines */
	bj_send(b);
}

/* ---------------------------------------------------------------------- */
/* The driver */

static int bj_begin(struct stage *st, const char *resume, struct kpl_err *err)
{
	struct bj *b = kpl_calloc(1, sizeof *b);
	struct jenkins_config cfg = { 0 };
	const struct pl_node *params = stage_with_get(st, "params");
	char *job = stage_expand(st, stage_with_get(st, "job"));
	char *unstable = stage_expand(st, stage_with_get(st, "unstable"));
	char *marker = kpl_asprintf("%s/%s/%u", stage_run_id(st), stage_name(st),
				    stage_attempt(st));
	char **pn = NULL, **pv = NULL;
	size_t np = params && params->type == PL_MAP ? params->n : 0;
	struct jenkins_step s;
	int rc;

	jenkins_step_init(&s);
	jenkins_step_init(&b->pending);
	b->loop = stage_loop(st);
	if ((rc = stage_endpoint(st, CFG_JENKINS, "jenkins", &b->ep, err)) != 0)
		goto fail;
	if (unstable && strcmp(unstable, "succeed") && strcmp(unstable, "fail")) {
		rc = kpl_errf(err, KPL_EINVAL, "stages.%s.with.unstable: \"%s\": must be succeed "
			      "or fail", stage_name(st), unstable);
		goto fail;
	}
	pn = kpl_calloc(np + 1, sizeof *pn);
	pv = kpl_calloc(np + 1, sizeof *pv);
	for (size_t i = 0; i < np; i++) {
		pn[i] = kpl_strdup(params->keys[i]->scalar);
		pv[i] = stage_expand(st, params->items[i]);
	}
	cfg.name = b->ep.ep->name;
	cfg.base_url = b->ep.url;
	cfg.job = job;
	cfg.param_names = (const char *const *)pn;
	cfg.param_values = (const char *const *)pv;
	cfg.n_params = np;
	cfg.marker = marker;
	cfg.unstable = unstable && strcmp(unstable, "fail") == 0 ? JENKINS_UNSTABLE_FAIL
								 : JENKINS_UNSTABLE_SUCCEED;
	cfg.cred_word = b->ep.token || !b->ep.password ? "token" : "password";
	if (!(b->j = jenkins_new(&cfg, err))) {
		char msg[sizeof err->msg];
		snprintf(msg, sizeof msg, "%s", err->msg);
		rc = kpl_errf(err, KPL_EINVAL, "stages.%s.with: %s", stage_name(st), msg);
		goto fail;
	}
	if ((rc = jenkins_begin(b->j, resume, kpl_now_ms(), &s, err)) != 0) {
		rc = KPL_ESTATE;
		err->code = rc;
		goto fail;
	}
	uv_timer_init(b->loop, &b->timer);
	b->timer.data = b;
	b->st = st;
	stage_set_impl(st, b);
	kpl_debug(LOG, "run %s stage %s: %s %s on jenkins %s", stage_run_id(st),
		  stage_name(st), resume ? "re-attaching to" : "building", job, cfg.name);
	bj_exec(b, &s);
	rc = 0;
	goto out;
fail:
	jenkins_free(b->j);
	stage_endpoint_release(&b->ep);
	free(b);
out:
	for (size_t i = 0; i < np && pn; i++) {
		free(pn[i]);
		free(pv[i]);
	}
	free(pn);
	free(pv);
	free(job);
	free(unstable);
	free(marker);
	return rc;
}

static int bj_start(struct stage *st, struct kpl_err *err)
{
	return bj_begin(st, NULL, err);
}

static int bj_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t pid_start;
	const char *resume;

	stage_resume_info(st, &pid, &pid_start, &resume);
	/* "triggering" is recorded before the POST: without it nothing was
	 * sent to Jenkins. */
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was sent to Jenkins");
	return bj_begin(st, resume, err);
}

static void bj_cancel(struct stage *st)
{
	struct bj *b = stage_impl(st);
	struct jenkins_step s;

	if (!b || !b->st)
		return;
	if (!jenkins_cancel(b->j, b->req != NULL, kpl_now_ms(), &s))
		return;
	/* s replaces the request that was not sent yet. */
	if (b->waiting) {
		uv_timer_stop(&b->timer);
		b->waiting = false;
	}
	jenkins_step_release(&b->pending);
	bj_exec(b, &s); /* while recording, on_recorded sends it */
}

/* kpld is stopping: leave the Jenkins build alone; the next kpld re-attaches
 * from the recorded state. */
static void bj_abandon(struct stage *st)
{
	struct bj *b = stage_impl(st);

	if (b)
		bj_close(b);
}

const struct stage_kind build_jenkins_driver = {
	.name = "jenkins",
	.check_with = bj_check_with,
	.start = bj_start,
	.cancel = bj_cancel,
	.resume = bj_resume,
	.abandon = bj_abandon,
};
