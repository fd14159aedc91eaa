/*
 * pod.c - a stage run as a Kubernetes Pod: the glue between the
 * engine (stages/stage.h), the API server (stages/kube.h) and the decisions
 * of stages/podspec.h.
 *
 * One Pod per attempt, named deterministically (podspec_name), with its
 * secret environment in a Secret of the same attempt. The attempt's stored
 * state (podspec.h's enum podspec_state) is recorded before what it names
 * is done, so that across a kill -9 the pod is created at most once:
 *
 *   start  -> record CLAIMED -> POST Secret (409: ours) -> POST Pod
 *             (409: ours, attach) -> record CREATED -> FOLLOW
 *   FOLLOW    a watch on the pod (its status) and its log stream
 *             (follow=true&timestamps=true); the lines and the stream's
 *             position are committed together, so a restart resumes from
 *             sinceTime and drops exactly the lines it already has
 *   end    -> record DONE (result, message, outputs, last lines in one
 *             commit) -> DELETE Pod -> DELETE Secret -> stage_done
 *   cancel -> record CANCELLING -> DELETE Pod (grace) -> wait until gone
 *             (grace + 5 s) -> DELETE Pod (grace 0) -> DELETE Secret ->
 *             stage_done(CANCELLED); the engine's timeout is a cancel too.
 *
 * The in-memory step (enum pod_step) changes only through set_step, which
 * logs every transition at debug level (curl's mstate).
 *
 * Lifetime: struct pod is freed once the attempt is reported or abandoned
 * and nothing of it is pending: no request, no stream, no resume record in
 * flight, the timers closed (pod_maybe_free).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipelines/runs_on.h"
#include "base/http.h"
#include "stages/kinds.h"
#include "stages/kube.h"
#include "stages/pod.h"
#include "stages/podspec.h"
#include "stages/proc.h"

#define LOG "pod"
#define POD_GRACE_S 10
#define POD_TICK_MS 1000
#define POD_DEFAULT_PULL_MS (60 * 1000)
#define POD_DEFAULT_SCHEDULE_MS (5 * 60 * 1000)
/* A create whose reply did not come (a broken connection, 5xx, 429) is
 * sent again this many times, a tick apart: 409 then says it was done. */
#define POD_CREATE_TRIES 10
/* Lines kept in memory before they are committed with their position. */
#define POD_MAX_PENDING 512

enum pod_step {
	STEP_CLAIMING,      /* the CLAIMED record is being made durable */
	STEP_CLAIM,         /* POST PersistentVolumeClaim (the run's workspace) */
	STEP_SECRET,        /* POST Secret */
	STEP_CREATE,        /* POST Pod */
	STEP_ATTACH,        /* GET Pod (after a restart) */
	STEP_FOLLOW,        /* watch + log stream */
	STEP_DELETE,        /* DELETE Pod with the grace period */
	STEP_WAIT_GONE,     /* GET Pod until 404 */
	STEP_FORCE,         /* DELETE Pod, grace 0 */
	STEP_DELETE_SECRET, /* DELETE Secret */
	STEP_END,
	STEP_LAST
};

static const char *const step_names[] = {
	"CLAIMING", "CLAIM", "SECRET", "CREATE", "ATTACH", "FOLLOW", "DELETE", "WAIT_GONE", "FORCE",
	"DELETE_SECRET", "END",
};
_Static_assert(KPL_ARRAY_SIZE(step_names) == STEP_LAST, "a name per step");

struct pod_line {
	char *text;
	size_t len;
};

struct pod {
	struct stage *st;            /* NULL once reported or abandoned */
	uv_loop_t *loop;
	struct http_client *h;
	struct kube_config cfg;
	struct podspec_record rec;   /* the stored state, as last recorded */
	enum pod_step step;
	json_t *pod_obj, *secret_obj; /* to create; secret_obj NULL: no secret */
	json_t *claim_obj;           /* the run's workspace claim, or NULL */
	char *image;
	char *where;                 /* "pod P (namespace N, cluster C)" */
	int64_t pull_ms, schedule_ms;

	struct http_request *req;    /* the one request of the step */
	bool recording;              /* stage_record_resume in flight */
	struct kube_watch *watch;
	int64_t watch_retry_at;      /* 0: the watch runs or is not wanted */
	struct http_request *log_req;
	bool log_after_terminal;     /* the stream in flight began after the end */
	bool logs_complete;
	int64_t log_retry_at;
	int log_failures;            /* reads of the last log that failed */
	struct podspec_logpos pos;   /* the stream's, pending lines included */
	struct pod_line *pending;
	size_t n_pending;

	struct podspec_status last;  /* the pod's latest status */
	bool have_status;
	int64_t pull_since, schedule_since;
	char said[600];              /* the last waiting reason logged */

	bool cancel_wanted;          /* cancel arrived while claiming/creating */
	int tries;                   /* of the step's request (creates) */
	int64_t resend_at;           /* 0, or when to send the step's request again */
	int64_t gone_deadline;       /* STEP_WAIT_GONE */
	Kpl__V1__StageState end_state;
	char *end_msg;

	uv_timer_t tick, flush;
	int timers_open;
	bool closing;
};

static void pod_exec(struct pod *p);
static void pod_conclude(struct pod *p, Kpl__V1__StageState state, const char *msg);

#define set_step(p, s) set_step_at(p, s, __LINE__)
static void set_step_at(struct pod *p, enum pod_step s, int line)
{
	if (s >= STEP_LAST)
		BUG("pod step %d", (int)s);
	kpl_debug(LOG, "%s: %s -> [%s] (line %d)", p->rec.pod, step_names[p->step],
		  step_names[s], line);
	p->step = s;
}

/*
 * The one way the stored state changes (it is recorded by the caller, with
 * stage_record_resume or pod_save): forward only, cancel from anything not
 * yet ended.
 */
static void rec_set_state(struct pod *p, enum podspec_state to)
{
	static const unsigned ok[PODSPEC_S_LAST] = {
		[PODSPEC_S_NONE] = 1u << PODSPEC_S_CLAIMED,
		[PODSPEC_S_CLAIMED] = 1u << PODSPEC_S_CREATED | 1u << PODSPEC_S_DONE |
				      1u << PODSPEC_S_CANCELLING,
		[PODSPEC_S_CREATED] = 1u << PODSPEC_S_DONE | 1u << PODSPEC_S_CANCELLING,
	};
	enum podspec_state from = p->rec.state;

	if (from >= PODSPEC_S_LAST || to >= PODSPEC_S_LAST || !(ok[from] & (1u << to)))
		BUG("%s: stored state %s -> %s", p->rec.pod, podspec_state_name(from),
		    podspec_state_name(to));
	kpl_debug(LOG, "%s: stored state %s -> %s", p->rec.pod, podspec_state_name(from),
		  podspec_state_name(to));
	p->rec.state = to;
}

/* ---------------------------------------------------------------------- */
/* Lifetime */

static void pending_clear(struct pod *p)
{
	for (size_t i = 0; i < p->n_pending; i++)
		free(p->pending[i].text);
	p->n_pending = 0;
}

static void pod_maybe_free(struct pod *p)
{
	if (p->st || p->req || p->log_req || p->recording || p->timers_open)
		return;
	pending_clear(p);
	free(p->pending);
	podspec_record_release(&p->rec);
	kube_config_release(&p->cfg);
	json_decref(p->pod_obj);
	json_decref(p->secret_obj);
	json_decref(p->claim_obj);
	free(p->image);
	free(p->where);
	free(p->end_msg);
	free(p);
}

/* What comes after step `after` on the way to the create. */
static enum pod_step next_create_step(const struct pod *p, enum pod_step after)
{
	if (after < STEP_CLAIM && p->claim_obj)
		return STEP_CLAIM;
	if (after < STEP_SECRET && p->secret_obj)
		return STEP_SECRET;
	return STEP_CREATE;
}

static void on_timer_closed(uv_handle_t *h)
{
	struct pod *p = h->data;

	p->timers_open--;
	pod_maybe_free(p);
}

static void stop_follow(struct pod *p)
{
	if (p->watch)
		kube_watch_stop(p->watch);
	p->watch = NULL;
	p->watch_retry_at = 0;
	if (p->log_req)
		http_request_cancel(p->log_req); /* its on_done clears it */
}

/* The attempt is over for this kpld (reported or abandoned). */
static void pod_close(struct pod *p)
{
	if (p->closing)
		return;
	p->closing = true;
	p->st = NULL;
	stop_follow(p);
	if (p->req)
		http_request_cancel(p->req);
	uv_close((uv_handle_t *)&p->tick, on_timer_closed);
	uv_close((uv_handle_t *)&p->flush, on_timer_closed);
}

/* Ends the attempt now (a failure before anything was created, or the end
 * of the cleanup). */
static void pod_report(struct pod *p, Kpl__V1__StageState state, const char *msg)
{
	struct stage *st = p->st;
	char *m = msg ? stage_redact(st, msg) : NULL;

	pod_close(p);
	stage_set_impl(st, NULL);
	stage_done(st, state, m);
	free(m);
}

/* ---------------------------------------------------------------------- */
/* Records */

/* Commits the pending log lines and the stream's position with rec. */
static void pod_save(struct pod *p)
{
	char *text;

	if (!p->st)
		return;
	for (size_t i = 0; i < p->n_pending; i++)
		stage_log_staged(p->st, KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT,
				 p->pending[i].text, p->pending[i].len);
	pending_clear(p);
	p->rec.log = p->pos;
	text = podspec_record_encode(&p->rec);
	stage_save_resume(p->st, text);
	free(text);
}

static void on_flush(uv_timer_t *t)
{
	pod_save(t->data);
}

static void on_claimed(struct stage *st, int status, void *data)
{
	struct pod *p = data;

	(void)st;
	p->recording = false;
	if (!p->st) {
		pod_maybe_free(p);
		return;
	}
	if (status) {
		char msg[300];
		snprintf(msg, sizeof msg, "cannot record the pod's name before creating it: %s",
			 kpl_strerror(status));
		pod_report(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return;
	}
	if (p->cancel_wanted) {
		pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, NULL);
		return;
	}
	set_step(p, next_create_step(p, STEP_CLAIMING));
	pod_exec(p);
}

/* ---------------------------------------------------------------------- */
/* Requests */

static char *pod_path(const struct pod *p, const char *what, const char *name)
{
	char *ns = kube_escape(p->rec.namespace);
	char *n = name ? kube_escape(name) : NULL;
	char *path = kpl_asprintf("/api/v1/namespaces/%s/%s%s%s", ns, what, n ? "/" : "",
				  n ? n : "");
	free(ns);
	free(n);
	return path;
}

static void on_reply(int status, json_t *obj, const struct kube_status *ks, void *data);

static bool send_req(struct pod *p, const char *method, char *path, const json_t *body)
{
	struct kpl_err err = { 0 };
	char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
	int rc = kube_request(p->h, &p->cfg, method, path, NULL, text, on_reply, p, &p->req,
			      &err);

	if (text) {
		/* A Secret's body holds its values. */
		memset(text, 0, strlen(text));
		free(text);
	}
	free(path);
	if (rc) {
		char msg[1000];
		p->req = NULL;
		snprintf(msg, sizeof msg, "%s: %s", p->where, err.msg);
		pod_report(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return false;
	}
	return true;
}

static json_t *delete_options(int grace)
{
	return json_pack("{s:s, s:s, s:i, s:s}", "kind", "DeleteOptions", "apiVersion", "v1",
			 "gracePeriodSeconds", grace, "propagationPolicy", "Background");
}

/* Sends what the step needs. */
static void pod_exec(struct pod *p)
{
	json_t *opts;

	if (!p->st || p->req)
		return;
	switch (p->step) {
	case STEP_CLAIM:
		send_req(p, "POST", pod_path(p, "persistentvolumeclaims", NULL), p->claim_obj);
		break;
	case STEP_SECRET:
		send_req(p, "POST", pod_path(p, "secrets", NULL), p->secret_obj);
		break;
	case STEP_CREATE:
		send_req(p, "POST", pod_path(p, "pods", NULL), p->pod_obj);
		break;
	case STEP_ATTACH:
	case STEP_WAIT_GONE:
		send_req(p, "GET", pod_path(p, "pods", p->rec.pod), NULL);
		break;
	case STEP_DELETE:
	case STEP_FORCE:
		opts = delete_options(p->step == STEP_DELETE ? POD_GRACE_S : 0);
		send_req(p, "DELETE", pod_path(p, "pods", p->rec.pod), opts);
		json_decref(opts);
		break;
	case STEP_DELETE_SECRET:
		if (!p->rec.secret) {
			/* No secret env when the attempt was claimed: no Secret. */
			set_step(p, STEP_END);
			pod_exec(p);
			break;
		}
		opts = delete_options(0);
		send_req(p, "DELETE", pod_path(p, "secrets", p->rec.secret), opts);
		json_decref(opts);
		break;
	case STEP_END:
		pod_report(p, p->end_state, p->end_msg);
		break;
	default:
		break;
	}
}

static void api_fail(struct pod *p, const char *what, int status, const struct kube_status *ks)
{
	char buf[700], msg[1000];

	if (ks)
		kube_status_text(ks, buf, sizeof buf);
	else
		snprintf(buf, sizeof buf, "%s", kpl_strerror(status));
	snprintf(msg, sizeof msg, "%s: cannot %s: %s", p->where, what, buf);
	pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
}

static void start_follow(struct pod *p);
static void handle_pod(struct pod *p, const json_t *obj);
static void pod_gone(struct pod *p);
static void begin_cancel(struct pod *p);

/* A create's outcome is unknown (no reply, or the server could not say):
 * send it again later; a 409 will tell it was done. */
static bool resend_create(struct pod *p, int status, long code, const struct kube_status *ks)
{
	char buf[700];

	if (p->step != STEP_CLAIM && p->step != STEP_SECRET && p->step != STEP_CREATE)
		return false;
	if (!(status < 0 || code == 429 || code == 500 || code == 502 || code == 503 ||
	      code == 504) || ++p->tries >= POD_CREATE_TRIES || p->cancel_wanted)
		return false;
	stage_logf(p->st, "%s: POST %s: %s; sending it again (try %d of %d; 409 AlreadyExists "
		   "would mean the first one was done)", p->where,
		   p->step == STEP_CREATE ? "pods" : p->step == STEP_SECRET ? "secrets"
					 : "persistentvolumeclaims",
		   ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status), p->tries + 1,
		   POD_CREATE_TRIES);
	p->resend_at = kpl_now_ms() + POD_TICK_MS;
	return true;
}

static void on_reply(int status, json_t *obj, const struct kube_status *ks, void *data)
{
	struct pod *p = data;
	long code = status ? 0 : ks ? ks->code : 200;
	char buf[700];

	p->req = NULL;
	if (!p->st) {
		pod_maybe_free(p);
		return;
	}
	if (resend_create(p, status, code, ks))
		return;
	p->tries = 0;
	switch (p->step) {
	case STEP_CLAIM:
		/* 409: the run's claim, made by an earlier pod stage. */
		if (code == 409 || (code >= 200 && code < 300)) {
			set_step(p, next_create_step(p, STEP_CLAIM));
			if (p->cancel_wanted)
				begin_cancel(p);
			else
				pod_exec(p);
		} else {
			api_fail(p, "create the run's workspace claim", status, ks);
		}
		return;
	case STEP_SECRET:
		if (code == 409 || (code >= 200 && code < 300)) {
			set_step(p, STEP_CREATE);
			if (p->cancel_wanted)
				begin_cancel(p);
			else
				pod_exec(p);
		} else {
			api_fail(p, "create its Secret", status, ks);
		}
		return;
	case STEP_CREATE:
		if (code == 409 || (code >= 200 && code < 300)) {
			/* 409 AlreadyExists: this attempt's pod, created by an
			 * earlier kpld whose CREATED record never landed. */
			char line[800];
			int n = snprintf(line, sizeof line, "%s %s (image %s)", code == 409
					 ? "attached to the existing" : "created", p->where, p->image);
			/* The line and the CREATED record in one commit. */
			stage_log_staged(p->st, KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, line,
					 n < (int)sizeof line ? (size_t)n : sizeof line - 1);
			rec_set_state(p, PODSPEC_S_CREATED);
			pod_save(p);
			if (p->cancel_wanted) {
				begin_cancel(p);
				return;
			}
			start_follow(p);
		} else {
			api_fail(p, "create it", status, ks);
		}
		return;
	case STEP_ATTACH:
		if (p->cancel_wanted) {
			begin_cancel(p);
		} else if (code == 404) {
			pod_gone(p);
		} else if (code >= 200 && code < 300) {
			stage_logf(p->st, "re-attached to %s", p->where);
			start_follow(p);
			handle_pod(p, obj);
		} else {
			/* The API server may be down for a while: try again. */
			kpl_warn(LOG, "%s: GET: %s", p->where,
				 ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status));
			start_follow(p);
		}
		return;
	case STEP_DELETE:
	case STEP_FORCE:
		if (code != 404 && !(code >= 200 && code < 300)) {
			char msg[1000];
			snprintf(msg, sizeof msg, "could not delete %s: %s", p->where,
				 ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status));
			stage_logf(p->st, "%s", msg);
			if (p->end_state != KPL__V1__STAGE_STATE__STAGE_STATE_FAILED) {
				free(p->end_msg);
				p->end_msg = kpl_strdup(msg);
			}
			set_step(p, STEP_DELETE_SECRET);
		} else if (p->step == STEP_DELETE && code != 404) {
			p->gone_deadline = kpl_now_ms() + (POD_GRACE_S + 5) * 1000;
			set_step(p, STEP_WAIT_GONE);
			return; /* the tick polls */
		} else {
			set_step(p, STEP_DELETE_SECRET);
		}
		pod_exec(p);
		return;
	case STEP_WAIT_GONE:
		if (code == 404) {
			set_step(p, STEP_DELETE_SECRET);
			pod_exec(p);
		}
		return; /* else the tick asks again, or forces */
	case STEP_DELETE_SECRET:
		if (code != 404 && !(code >= 200 && code < 300))
			stage_logf(p->st, "could not delete Secret %s: %s", p->rec.secret,
				   ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status));
		set_step(p, STEP_END);
		pod_exec(p);
		return;
	default:
		return;
	}
}

/* ---------------------------------------------------------------------- */
/* Following the pod: its status (a watch) and its log (a stream) */

static void on_log_done(struct http_response *resp, int status, void *data);
static void finish(struct pod *p);

static void pending_push(struct pod *p, const char *text, size_t len)
{
	if (!p->pending)
		p->pending = kpl_calloc(POD_MAX_PENDING, sizeof *p->pending);
	p->pending[p->n_pending].text = kpl_malloc(len + 1);
	memcpy(p->pending[p->n_pending].text, text, len);
	p->pending[p->n_pending].text[len] = '\0';
	p->pending[p->n_pending++].len = len;
	if (p->n_pending == POD_MAX_PENDING)
		pod_save(p);
	else if (!uv_is_active((uv_handle_t *)&p->flush))
		uv_timer_start(&p->flush, on_flush, 0, 0); /* once this burst is read */
}

static int on_log_line(struct http_request *req, const char *line, size_t n, void *data)
{
	struct pod *p = data;
	const char *text;
	size_t len;

	(void)req;
	if (!p->st)
		return KPL_ECANCELLED;
	if (podspec_log_accept(&p->pos, line, n, &text, &len))
		pending_push(p, text, len);
	return 0;
}

static void open_logs(struct pod *p)
{
	struct kpl_err err = { 0 };
	char since[48], *base = pod_path(p, "pods", p->rec.pod), *path;

	if (p->n_pending)
		pod_save(p);
	podspec_log_since(&p->pos, since, sizeof since);
	path = kpl_asprintf("%s/log?container=%s&follow=true&timestamps=true%s%s", base,
			    PODSPEC_CONTAINER, since[0] ? "&sinceTime=" : "", since);
	free(base);
	podspec_log_stream_begins(&p->pos);
	p->log_after_terminal = p->have_status && p->last.terminal;
	if (kube_stream_lines(p->h, &p->cfg, path, on_log_line, on_log_done, p, &p->log_req,
			      &err)) {
		p->log_req = NULL;
		kpl_warn(LOG, "%s: log: %s", p->where, err.msg);
		p->log_retry_at = kpl_now_ms() + POD_TICK_MS;
	}
	free(path);
}

static void on_log_done(struct http_response *resp, int status, void *data)
{
	struct pod *p = data;
	static const int max_failures = 30;

	p->log_req = NULL;
	if (!p->st) {
		pod_maybe_free(p);
		return;
	}
	if (p->step != STEP_FOLLOW)
		return;
	if (p->n_pending)
		pod_save(p);
	if (status == 0 && resp->status >= 200 && resp->status < 300) {
		if (p->log_after_terminal) {
			/* A stream begun after the container ended has all of it. */
			p->logs_complete = true;
			finish(p);
		} else if (p->have_status && p->last.terminal) {
			open_logs(p); /* the last read */
		} else {
			p->log_retry_at = kpl_now_ms() + POD_TICK_MS;
		}
		return;
	}
	{
		struct kube_status ks;
		char buf[700];
		if (status == 0)
			kube_status_parse(resp->status, resp->body, resp->body_len, &ks);
		kpl_debug(LOG, "%s: log stream: %s", p->where,
			  status ? resp->err.msg : kube_status_text(&ks, buf, sizeof buf));
	}
	p->log_retry_at = kpl_now_ms() + POD_TICK_MS;
	if (p->have_status && p->last.terminal && ++p->log_failures >= max_failures) {
		stage_logf(p->st, "%s: the rest of its log could not be read", p->where);
		p->logs_complete = true;
		finish(p);
	}
}

static void say(struct pod *p, const char *why)
{
	if (!strcmp(p->said, why))
		return;
	snprintf(p->said, sizeof p->said, "%s", why);
	stage_logf(p->st, "%s: %s", p->where, why);
}

static void format_ms(char *buf, size_t n, int64_t ms)
{
	if (ms % 60000 == 0)
		snprintf(buf, n, "%lldm", (long long)(ms / 60000));
	else if (ms % 1000 == 0)
		snprintf(buf, n, "%llds", (long long)(ms / 1000));
	else
		snprintf(buf, n, "%lldms", (long long)ms);
}

/* Pending too long in a state that rarely clears by itself. */
static void check_bounds(struct pod *p, int64_t now)
{
	char msg[1200], d[32];

	if (p->step != STEP_FOLLOW || !p->have_status)
		return;
	if (p->pull_since && now - p->pull_since >= p->pull_ms) {
		format_ms(d, sizeof d, p->pull_ms);
		if (p->last.phase == PODSPEC_PULL_FAILING)
			snprintf(msg, sizeof msg, "%s: image %s cannot be pulled: %s (for %s, "
				 "runs_on.image_pull_timeout)", p->where, p->image, p->last.why, d);
		else
			snprintf(msg, sizeof msg, "%s: its container cannot be created: %s (for "
				 "%s, runs_on.image_pull_timeout)", p->where, p->last.why, d);
		pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
	} else if (p->schedule_since && now - p->schedule_since >= p->schedule_ms) {
		format_ms(d, sizeof d, p->schedule_ms);
		snprintf(msg, sizeof msg, "%s cannot be scheduled: %s (for %s, "
			 "runs_on.schedule_timeout)", p->where, p->last.why, d);
		pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
	}
}

static void handle_pod(struct pod *p, const json_t *obj)
{
	int64_t now = kpl_now_ms();

	podspec_status_of(obj, &p->last);
	p->have_status = true;
	kpl_debug(LOG, "%s: %s%s", p->where, podspec_phase_name(p->last.phase),
		  p->last.started ? " (started)" : "");
	switch (p->last.phase) {
	case PODSPEC_PULL_FAILING:
	case PODSPEC_CONFIG_FAILING:
		if (!p->pull_since)
			p->pull_since = now;
		p->schedule_since = 0;
		say(p, p->last.why);
		break;
	case PODSPEC_UNSCHEDULABLE:
		if (!p->schedule_since)
			p->schedule_since = now;
		p->pull_since = 0;
		say(p, p->last.why);
		break;
	default:
		p->pull_since = p->schedule_since = 0;
		break;
	}
	if (p->last.terminal && !p->last.started) {
		finish(p); /* nothing ran: no log to read */
		return;
	}
	if (p->last.started && !p->log_req && !p->logs_complete)
		open_logs(p);
	check_bounds(p, now);
}

static void pod_gone(struct pod *p)
{
	char msg[600];

	snprintf(msg, sizeof msg, "%s disappeared: it was deleted outside kpl, or its node "
		 "was lost with it", p->where);
	pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
}

static int on_watch_event(struct kube_watch *w, const char *type, json_t *obj, void *data)
{
	struct pod *p = data;

	(void)w;
	if (!p->st || p->step != STEP_FOLLOW)
		return 0;
	if (!strcmp(type, "DELETED"))
		pod_gone(p);
	else
		handle_pod(p, obj);
	return 0;
}

static void on_watch_error(struct kube_watch *w, int status, const struct kube_status *ks,
			   void *data)
{
	struct pod *p = data;
	char buf[700];

	kube_watch_stop(w);
	if (p->watch == w)
		p->watch = NULL;
	if (!p->st)
		return;
	if (ks && (ks->code == 401 || ks->code == 403)) {
		/* Refused, not unavailable: asking again will not help. */
		char msg[1200];
		snprintf(msg, sizeof msg, "%s: cannot watch it (kpld's credentials need get, list "
			 "and watch on pods there): %s", p->where,
			 kube_status_text(ks, buf, sizeof buf));
		pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		return;
	}
	kpl_warn(LOG, "%s: watch: %s; watching again", p->where,
		 ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status));
	p->watch_retry_at = kpl_now_ms() + 2 * POD_TICK_MS;
}

static void start_watch(struct pod *p)
{
	struct kpl_err err = { 0 };
	char *coll = pod_path(p, "pods", NULL);
	char *sel = kpl_asprintf("metadata.name=%s", p->rec.pod);

	p->watch_retry_at = 0;
	if (kube_watch_start(p->loop, p->h, &p->cfg, coll, sel, on_watch_event, on_watch_error,
			     p, &p->watch, &err)) {
		p->watch = NULL;
		kpl_warn(LOG, "%s: watch: %s", p->where, err.msg);
		p->watch_retry_at = kpl_now_ms() + 2 * POD_TICK_MS;
	}
	free(coll);
	free(sel);
}

static void start_follow(struct pod *p)
{
	set_step(p, STEP_FOLLOW);
	start_watch(p);
}

static void set_output(void *data, const char *key, const char *value)
{
	struct pod *p = data;

	if (stage_set_output(p->st, key, value))
		stage_logf(p->st, "outputs: output %s is too long; ignored", key);
}

/* The pod ended and its log is read: the result. */
static void finish(struct pod *p)
{
	char msg[1400];
	int bad;

	if (strlen(p->last.message) >= PODSPEC_OUTPUTS_MAX)
		stage_logf(p->st, "outputs: $KPL_OUTPUTS reached Kubernetes' limit of %d bytes "
			   "for a termination message: what follows was cut", PODSPEC_OUTPUTS_MAX);
	bad = podspec_outputs(p->last.message, set_output, p);
	if (bad)
		stage_logf(p->st, "outputs: ignored %d line%s without KEY=VALUE", bad,
			   bad == 1 ? "" : "s");
	if (p->last.phase == PODSPEC_SUCCEEDED) {
		pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
		return;
	}
	snprintf(msg, sizeof msg, "%s: %s", p->where, p->last.why);
	pod_conclude(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
}

/* Records the result with the last lines and outputs, then deletes the pod
 * and its Secret, then reports. */
static void pod_conclude(struct pod *p, Kpl__V1__StageState state, const char *msg)
{
	stop_follow(p);
	p->end_state = state;
	free(p->end_msg);
	p->end_msg = msg ? kpl_strdup(msg) : NULL;
	rec_set_state(p, PODSPEC_S_DONE);
	p->rec.result = (int)state;
	free(p->rec.msg);
	p->rec.msg = msg ? kpl_strdup(msg) : NULL;
	pod_save(p);
	/* It ended (or never started): nothing to wait for. */
	set_step(p, STEP_FORCE);
	pod_exec(p);
}

static void begin_cancel(struct pod *p)
{
	char msg[400];

	stop_follow(p);
	rec_set_state(p, PODSPEC_S_CANCELLING);
	pod_save(p);
	snprintf(msg, sizeof msg, "cancelled: deleted %s", p->where);
	p->end_state = KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
	free(p->end_msg);
	p->end_msg = kpl_strdup(msg);
	stage_logf(p->st, "deleting %s (grace period %ds)", p->where, POD_GRACE_S);
	set_step(p, STEP_DELETE);
	pod_exec(p);
}

static void on_tick(uv_timer_t *t)
{
	struct pod *p = t->data;
	int64_t now = kpl_now_ms();

	if (!p->st)
		return;
	switch (p->step) {
	case STEP_CLAIM:
	case STEP_SECRET:
	case STEP_CREATE:
		if (p->resend_at && now >= p->resend_at && !p->req) {
			p->resend_at = 0;
			pod_exec(p);
		}
		break;
	case STEP_FOLLOW:
		if (!p->watch && p->watch_retry_at && now >= p->watch_retry_at)
			start_watch(p);
		if (p->step == STEP_FOLLOW && p->have_status && p->last.started && !p->log_req &&
		    !p->logs_complete && now >= p->log_retry_at)
			open_logs(p);
		check_bounds(p, now);
		break;
	case STEP_WAIT_GONE:
		if (p->req)
			break;
		if (now >= p->gone_deadline) {
			stage_logf(p->st, "%s did not stop within its grace period: deleting it "
				   "at once", p->where);
			set_step(p, STEP_FORCE);
		}
		pod_exec(p);
		break;
	default:
		break;
	}
}

/* ---------------------------------------------------------------------- */
/* The attempt */

static const struct pl_node *runs_on(struct stage *st, const char *key)
{
	const struct pl_stage *s = stage_spec(st);

	return pl_runs_on_get(s->runs_on, s->runs_on_defaults, key);
}

bool pod_wanted(struct stage *st)
{
	const struct pl_stage *s = stage_spec(st);

	return pl_runs_on_pod(s->runs_on, s->runs_on_defaults);
}

/* A runs_on subtree as JSON, its strings expanded (a Kubernetes quantity
 * or label is a string; tolerationSeconds a number). New reference. */
static json_t *expand_json(struct stage *st, const struct pl_node *n, const char *key)
{
	json_t *j;
	char *v;

	switch (n->type) {
	case PL_SCALAR:
		v = stage_expand(st, n);
		j = key && !strcmp(key, "tolerationSeconds") ? json_integer(atoll(v))
							       : json_string(v);
		free(v);
		return j;
	case PL_SEQ:
		j = json_array();
		for (size_t i = 0; i < n->n; i++)
			json_array_append_new(j, expand_json(st, n->items[i], NULL));
		return j;
	case PL_MAP:
		j = json_object();
		for (size_t i = 0; i < n->n; i++)
			json_object_set_new(j, n->keys[i]->scalar,
					    expand_json(st, n->items[i], n->keys[i]->scalar));
		return j;
	}
	return json_null();
}

static int64_t duration_or(struct stage *st, const char *key, int64_t def)
{
	char *s = stage_expand(st, runs_on(st, key));
	int64_t ms = s ? pl_parse_duration(s) : -1;

	free(s);
	return ms > 0 ? ms : def;
}

char **pod_stage_env(struct stage *st)
{
	return proc_stage_env_at(st, PODSPEC_OUTPUTS_PATH, PODSPEC_WORKSPACE, false);
}

static void command_release(struct pod_command *c)
{
	proc_strv_free(c->argv);
	proc_strv_free(c->env);
	if (c->secret_env)
		for (char **e = c->secret_env; *e; e++)
			memset(*e, 0, strlen(*e));
	proc_strv_free(c->secret_env);
	free(c->workdir);
	memset(c, 0, sizeof *c);
}

/* The command as script.c runs it: with.command, or /bin/sh -c with.shell
 * (values as KPL_T_N variables). */
int pod_script_command(struct stage *st, struct pod_command *out, struct kpl_err *err)
{
	const struct pl_node *cmd = stage_with_get(st, "command");
	const struct pl_node *wenv = stage_with_get(st, "env");
	char **tvals = NULL;
	size_t ntvals = 0, argc = 0;
	int rc;

	out->argv = kpl_calloc((cmd ? cmd->n : 3) + 1, sizeof *out->argv);
	if (cmd) {
		for (size_t i = 0; i < cmd->n; i++)
			out->argv[argc++] = stage_expand(st, cmd->items[i]);
	} else {
		char *text;
		if ((rc = stage_expand_shell(st, stage_with_get(st, "shell"), &text, &tvals,
					     &ntvals, err)) != 0)
			return rc;
		out->argv[argc++] = kpl_strdup("/bin/sh");
		out->argv[argc++] = kpl_strdup("-c");
		out->argv[argc++] = text;
	}
	out->env = pod_stage_env(st);
	for (size_t i = 0; wenv && wenv->type == PL_MAP && i < wenv->n; i++) {
		char *v = stage_expand(st, wenv->items[i]);
		proc_env_set(&out->env, wenv->keys[i]->scalar, v);
		free(v);
	}
	for (size_t i = 0; i < ntvals; i++) {
		char name[32];
		snprintf(name, sizeof name, "KPL_T_%zu", i + 1);
		proc_env_set(&out->env, name, tvals[i]);
		free(tvals[i]);
	}
	free(tvals);
	out->workdir = stage_expand(st, stage_with_get(st, "workdir"));
	return 0;
}

static int pod_begin(struct stage *st, pod_command_fn cmd, const char *resume,
		     struct kpl_err *err)
{
	struct pod *p = kpl_calloc(1, sizeof *p);
	struct stage_endpoint ep = { 0 };
	struct podspec_input in = { 0 };
	struct podspec_env *penv = NULL;
	struct pod_command pc = { 0 };
	char *cluster = NULL, *ns = NULL, *sa = NULL;
	json_t *resources = NULL, *nodesel = NULL, *tols = NULL;
	char *ws = NULL, *claim = NULL, *secret_name = NULL;
	const struct pl_node *n;
	size_t argc = 0, nenv = 0, nplain = 0;
	bool any_secret = false;
	int rc;

	p->loop = stage_loop(st);
	p->h = stage_http(st);
	kube_config_init(&p->cfg);
	if (resume) {
		if (podspec_record_decode(resume, &p->rec)) {
			rc = kpl_errf(err, KPL_ESTATE, "the pod stage's stored state cannot be "
				      "read: %.200s", resume);
			goto fail;
		}
		cluster = kpl_strdup(p->rec.cluster);
	} else {
		cluster = stage_expand(st, runs_on(st, "cluster"));
	}
	if ((rc = stage_endpoint_named(st, CFG_KUBERNETES, cluster, "runs_on.cluster", &ep,
				       err)) != 0)
		goto fail;
	if ((rc = kube_config_from_endpoint(ep.ep, ep.token, &p->cfg, err)) != 0)
		goto fail;
	if (!resume) {
		ns = stage_expand(st, runs_on(st, "namespace"));
		if (!ns || !*ns) {
			free(ns);
			ns = kpl_strdup(p->cfg.namespace && *p->cfg.namespace ? p->cfg.namespace
									      : "default");
		}
		p->rec.cluster = kpl_strdup(cluster);
		p->rec.namespace = kpl_strdup(ns);
		p->rec.pod = podspec_name(stage_run_id(st), stage_name(st), stage_attempt(st));
	}
	p->image = stage_expand(st, runs_on(st, "image"));
	p->pull_ms = duration_or(st, "image_pull_timeout", POD_DEFAULT_PULL_MS);
	p->schedule_ms = duration_or(st, "schedule_timeout", POD_DEFAULT_SCHEDULE_MS);
	p->where = kpl_asprintf("pod %s (namespace %s, cluster %s)", p->rec.pod,
				p->rec.namespace, p->rec.cluster);
	p->pos = p->rec.log;

	if ((rc = cmd(st, &pc, err)) != 0)
		goto fail;
	while (pc.argv[argc])
		argc++;
	for (char **e = pc.env; *e; e++)
		nplain++;
	nenv = nplain;
	for (char **e = pc.secret_env; e && *e; e++)
		nenv++;
	penv = kpl_calloc(nenv + 1, sizeof *penv);
	for (size_t i = 0; i < nenv; i++) {
		char *var = i < nplain ? pc.env[i] : pc.secret_env[i - nplain];
		char *eq = strchr(var, '=');
		char *red;
		*eq = '\0';
		penv[i].name = var;
		penv[i].value = eq + 1;
		/* A value the redaction would change holds a secret: it goes
		 * to the Secret, never into the Pod spec. */
		red = stage_redact(st, eq + 1);
		penv[i].secret = i >= nplain || strcmp(red, eq + 1) != 0;
		any_secret |= penv[i].secret;
		free(red);
	}
	sa = stage_expand(st, runs_on(st, "service_account"));
	if ((n = runs_on(st, "resources")))
		resources = expand_json(st, n, NULL);
	if ((n = runs_on(st, "node_selector")))
		nodesel = expand_json(st, n, NULL);
	if ((n = runs_on(st, "tolerations")))
		tols = expand_json(st, n, NULL);
	in.name = p->rec.pod;
	in.namespace = p->rec.namespace;
	in.image = p->image;
	in.run_id = stage_run_id(st);
	in.stage = stage_name(st);
	in.attempt = stage_attempt(st);
	in.argv = pc.argv;
	in.n_argv = argc;
	in.workdir = pc.workdir;
	in.env = penv;
	in.n_env = nenv;
	secret_name = kpl_asprintf("%s-env", p->rec.pod);
	in.secret_name = secret_name;
	/* The record says whether a Secret may exist (what is deleted at the
	 * end): one is made when the env holds a secret. */
	if (any_secret && !p->rec.secret)
		p->rec.secret = kpl_strdup(secret_name);
	in.resources = resources;
	in.node_selector = nodesel;
	in.tolerations = tols;
	in.service_account = sa && *sa ? sa : NULL;
	in.grace_seconds = POD_GRACE_S;
	if ((ws = stage_expand(st, runs_on(st, "workspace"))) && *ws) {
		claim = podspec_claim_name(stage_run_id(st));
		in.claim = claim;
		p->claim_obj = podspec_claim(&in, ws);
	}
	p->pod_obj = podspec_pod(&in);
	p->secret_obj = any_secret ? podspec_secret(&in) : NULL;

	uv_timer_init(p->loop, &p->tick);
	uv_timer_init(p->loop, &p->flush);
	p->tick.data = p->flush.data = p;
	p->timers_open = 2;
	uv_timer_start(&p->tick, on_tick, POD_TICK_MS, POD_TICK_MS);
	p->st = st;
	stage_set_impl(st, p);
	kpl_debug(LOG, "run %s stage %s: %s %s", stage_run_id(st), stage_name(st),
		  resume ? "re-attaching to" : "starting", p->where);
	if (!resume) {
		rec_set_state(p, PODSPEC_S_CLAIMED);
		p->step = STEP_CLAIMING;
		p->recording = true;
		{
			char *text = podspec_record_encode(&p->rec);
			stage_record_resume(st, 0, 0, text, on_claimed, p);
			free(text);
		}
	} else {
		switch (p->rec.state) {
		case PODSPEC_S_CLAIMED:
			set_step(p, next_create_step(p, STEP_CLAIMING));
			break;
		case PODSPEC_S_CREATED:
			set_step(p, STEP_ATTACH);
			break;
		case PODSPEC_S_DONE:
			p->end_state = (Kpl__V1__StageState)p->rec.result;
			p->end_msg = p->rec.msg ? kpl_strdup(p->rec.msg) : NULL;
			set_step(p, STEP_FORCE);
			break;
		default: /* CANCELLING */
			p->end_state = KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
			p->end_msg = kpl_asprintf("cancelled: deleted %s", p->where);
			set_step(p, STEP_DELETE);
			break;
		}
		pod_exec(p);
	}
	rc = 0;
	goto out;
fail:
	podspec_record_release(&p->rec);
	kube_config_release(&p->cfg);
	free(p->image);
	free(p->where);
	free(p);
	if (resume && rc != KPL_ESTATE) {
		char m[sizeof err->msg];
		snprintf(m, sizeof m, "%s", err->msg);
		rc = kpl_errf(err, KPL_ESTATE, "%s", m);
	}
out:
	stage_endpoint_release(&ep);
	for (size_t i = 0; penv && i < nenv; i++)
		memset((char *)penv[i].value, 0, strlen(penv[i].value));
	command_release(&pc);
	free(penv);
	free(cluster);
	free(ns);
	free(sa);
	free(ws);
	free(claim);
	free(secret_name);
	json_decref(resources);
	json_decref(nodesel);
	json_decref(tols);
	return rc;
}

int pod_start(struct stage *st, pod_command_fn cmd, struct kpl_err *err)
{
	return pod_begin(st, cmd, NULL, err);
}

int pod_resume(struct stage *st, pod_command_fn cmd, struct kpl_err *err)
{
	int64_t pid;
	uint64_t pid_start;
	const char *resume;

	stage_resume_info(st, &pid, &pid_start, &resume);
	/* CLAIMED is recorded before anything is sent: without it nothing
	 * reached the cluster. */
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "nothing was sent to the cluster");
	return pod_begin(st, cmd, resume, err);
}

void pod_cancel(struct stage *st)
{
	struct pod *p = stage_impl(st);

	if (!p || !p->st)
		return;
	switch (p->step) {
	case STEP_CLAIM:
	case STEP_SECRET:
	case STEP_CREATE:
		if (p->resend_at && !p->req) {
			/* Waiting to send a create again: it may have been done. */
			p->resend_at = 0;
			begin_cancel(p);
			break;
		}
		/* fall through */
	case STEP_CLAIMING:
	case STEP_ATTACH:
		p->cancel_wanted = true; /* once the request in flight answers */
		break;
	case STEP_FOLLOW:
		begin_cancel(p);
		break;
	default:
		break; /* ending already */
	}
}

/* kpld is stopping: leave the pod running; the next kpld re-attaches from
 * the stored state. */
void pod_abandon(struct stage *st)
{
	struct pod *p = stage_impl(st);

	if (!p)
		return;
	stage_set_impl(st, NULL);
	pending_clear(p); /* not committed: the next kpld reads them again */
	pod_close(p);
	pod_maybe_free(p);
}

/* ---------------------------------------------------------------------- */
/* The run's end */

struct claim_delete {
	struct kube_config cfg;
	char *what;
};

static void on_claim_deleted(int status, json_t *obj, const struct kube_status *ks, void *data)
{
	struct claim_delete *d = data;
	char buf[700];

	(void)obj;
	if (status || (ks && ks->code != 404))
		kpl_warn(LOG, "%s: not deleted (kubectl delete pvc -l %s=RUN deletes it): %s",
			 d->what, PODSPEC_LABEL_RUN,
			 ks ? kube_status_text(ks, buf, sizeof buf) : kpl_strerror(status));
	else
		kpl_debug(LOG, "%s: deleted", d->what);
	kube_config_release(&d->cfg);
	free(d->what);
	free(d);
}

void pod_run_ended(struct stage *st)
{
	struct podspec_record rec;
	struct stage_endpoint ep = { 0 };
	struct kpl_err err = { 0 };
	struct claim_delete *d;
	int64_t pid;
	uint64_t pid_start;
	const char *resume;
	char *ns, *name, *path;

	if (!pod_wanted(st) || !runs_on(st, "workspace") || stage_attempt(st) == 0)
		return;
	stage_resume_info(st, &pid, &pid_start, &resume);
	if (!resume || !*resume || podspec_record_decode(resume, &rec))
		return;
	d = kpl_calloc(1, sizeof *d);
	kube_config_init(&d->cfg);
	name = podspec_claim_name(stage_run_id(st));
	d->what = kpl_asprintf("workspace claim %s (namespace %s, cluster %s) of run %s", name,
			       rec.namespace, rec.cluster, stage_run_id(st));
	ns = kube_escape(rec.namespace);
	path = kpl_asprintf("/api/v1/namespaces/%s/persistentvolumeclaims/%s", ns, name);
	if (stage_endpoint_named(st, CFG_KUBERNETES, rec.cluster, "runs_on.cluster", &ep, &err) ||
	    kube_config_from_endpoint(ep.ep, ep.token, &d->cfg, &err) ||
	    kube_request(stage_http(st), &d->cfg, "DELETE", path, NULL, NULL, on_claim_deleted, d,
			 NULL, &err)) {
		kpl_warn(LOG, "%s: not deleted: %s", d->what, err.msg);
		kube_config_release(&d->cfg);
		free(d->what);
		free(d);
	}
	stage_endpoint_release(&ep);
	podspec_record_release(&rec);
	free(ns);
	free(name);
	free(path);
}
