/*
 * jenkins.c - the Jenkins client's protocol logic (see jenkins.h): no I/O,
 * no clock; replies in, steps out.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "base/logline.h"
#include "stages/jenkins.h"

struct jenkins {
	/* config (owned copies) */
	char *name, *base, *job, *job_path, *marker, *cred_word;
	char **pn, **pv;
	size_t np;
	enum jenkins_unstable unstable;

	enum jenkins_state state;
	enum jenkins_state after_crumb; /* the POST a crumb fetch is for */
	bool crumb_known;               /* fetched, or CSRF is off */
	char *crumb_field, *crumb, *cookie;
	int crumb_refetches;

	bool job_known;        /* JOB answered */
	bool marker_declared;  /* the job declares KPL_RUN_ID */
	bool no_params;        /* the job declares no parameter at all */
	int triggers;          /* POSTs sent for this marker (this process) */
	bool find_may_trigger; /* a search that finds nothing may trigger */
	/* The search follows a restart in phase triggering: the POST recorded
	 * then may never have been sent (kpld died first). */
	bool after_restart;

	int64_t queue_id, number;
	char *build_url;
	uint64_t offset;       /* progressiveText start */
	bool cut_open;         /* the last console line was a piece: the next continues it */
	char *image;           /* last KPL_IMAGE= line */
	char *art_image, *art_digest;
	char *result;

	bool cancel_requested, cancel_item_sent, stop_sent;
	int64_t stop_deadline;
	int64_t fail_since;    /* first of the failures in a row, 0 if none */
	bool queued_noted;
};

static const char *const state_names[] = {
#define JENKINS_STATE_NAME(s) #s,
	JENKINS_STATE_MAP(JENKINS_STATE_NAME)
#undef JENKINS_STATE_NAME
};

const char *jenkins_state_name(enum jenkins_state s)
{
	return s < JENKINS_ST_LAST_ ? state_names[s] : "?";
}

enum jenkins_state jenkins_state(const struct jenkins *j)
{
	return j->state;
}

int64_t jenkins_build_number(const struct jenkins *j)
{
	return j->number;
}

/* ---------------------------------------------------------------------- */
/* Pure helpers */

static bool unreserved(unsigned char c)
{
	return isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

static void pct_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n,
		       bool form)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (*len + 4 > *cap) {
			*cap = *cap ? *cap * 2 : 64;
			*buf = kpl_realloc(*buf, *cap);
		}
		if (unreserved(c)) {
			(*buf)[(*len)++] = (char)c;
		} else if (form && c == ' ') {
			(*buf)[(*len)++] = '+';
		} else {
			static const char hex[] = "0123456789ABCDEF";
			(*buf)[(*len)++] = '%';
			(*buf)[(*len)++] = hex[c >> 4];
			(*buf)[(*len)++] = hex[c & 15];
		}
	}
	if (*len + 1 > *cap) {
		*cap = *len + 1;
		*buf = kpl_realloc(*buf, *cap);
	}
	(*buf)[*len] = '\0';
}

static void raw_append(char **buf, size_t *len, size_t *cap, const char *s)
{
	size_t n = strlen(s);

	if (*len + n + 1 > *cap) {
		*cap = (*len + n + 1) * 2;
		*buf = kpl_realloc(*buf, *cap);
	}
	memcpy(*buf + *len, s, n + 1);
	*len += n;
}

char *jenkins_job_path(const char *job)
{
	char *out = NULL;
	size_t len = 0, cap = 0;
	const char *p = job;

	if (!job || !*job)
		return NULL;
	for (;;) {
		const char *slash = strchr(p, '/');
		size_t n = slash ? (size_t)(slash - p) : strlen(p);
		if (n == 0) {
			free(out);
			return NULL;
		}
		raw_append(&out, &len, &cap, "job/");
		pct_append(&out, &len, &cap, p, n, false);
		raw_append(&out, &len, &cap, "/");
		if (!slash)
			break;
		p = slash + 1;
	}
	return out;
}

int jenkins_parse_location(const char *location, int64_t *id)
{
	const char *end, *start, *q;
	char *e;
	long long v;

	if (!location || !(q = strstr(location, "/queue/item/")))
		return KPL_EINVAL;
	start = q + strlen("/queue/item/");
	end = start;
	while (isdigit((unsigned char)*end))
		end++;
	if (end == start || (*end && *end != '/' && *end != '?'))
		return KPL_EINVAL;
	v = strtoll(start, &e, 10);
	if (v <= 0)
		return KPL_EINVAL;
	*id = v;
	return 0;
}

static json_t *parse_json(const char *body, size_t len)
{
	return body ? json_loadb(body, len, JSON_DECODE_ANY, NULL) : NULL;
}

static const char *jstr(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

int jenkins_parse_crumb(const char *body, size_t len, char **field, char **crumb)
{
	json_t *o = parse_json(body, len);
	const char *f, *c;
	int rc = KPL_EINVAL;

	*field = *crumb = NULL;
	if (json_is_object(o) && (f = jstr(o, "crumbRequestField")) && *f &&
	    (c = jstr(o, "crumb")) && *c && !strpbrk(f, "\r\n:") && !strpbrk(c, "\r\n")) {
		*field = kpl_strdup(f);
		*crumb = kpl_strdup(c);
		rc = 0;
	}
	json_decref(o);
	return rc;
}

char *jenkins_image_marker(const char *line)
{
	size_t n = strlen(JENKINS_IMAGE_PREFIX), len;
	const char *v;

	if (strncmp(line, JENKINS_IMAGE_PREFIX, n) != 0)
		return NULL;
	v = line + n;
	len = strlen(v);
	while (len && (v[len - 1] == '\r' || v[len - 1] == ' ' || v[len - 1] == '\t'))
		len--;
	if (!len)
		return NULL;
	for (size_t i = 0; i < len; i++)
		if (isspace((unsigned char)v[i]))
			return NULL;
	return kpl_strndup(v, len);
}

char *jenkins_error_text(const char *body, size_t len, size_t max)
{
	char *out = kpl_malloc(max + 1);
	size_t n = 0;
	bool in_tag = false, in_head = false, space = true;

	for (size_t i = 0; i < len && n < max; i++) {
		char c = body[i];
		if (c == '<') {
			in_tag = true;
			/* <title> repeats what the body says: skip the head */
			if (len - i >= 5 && strncasecmp(body + i, "<head", 5) == 0)
				in_head = true;
			else if (len - i >= 6 && strncasecmp(body + i, "</head", 6) == 0)
				in_head = false;
			continue;
		}
		if (in_tag) {
			if (c == '>') {
				in_tag = false;
				if (!space && !in_head) {
					out[n++] = ' ';
					space = true;
				}
			}
			continue;
		}
		if (in_head)
			continue;
		if (isspace((unsigned char)c) || (unsigned char)c < 0x20) {
			if (!space) {
				out[n++] = ' ';
				space = true;
			}
			continue;
		}
		out[n++] = c;
		space = false;
	}
	while (n && out[n - 1] == ' ')
		n--;
	out[n] = '\0';
	return out;
}

/* ---------------------------------------------------------------------- */
/* Steps */

void jenkins_step_init(struct jenkins_step *s)
{
	memset(s, 0, sizeof *s);
}

void jenkins_step_release(struct jenkins_step *s)
{
	for (size_t i = 0; i < s->n_lines; i++)
		free(s->lines[i].text);
	free(s->lines);
	for (size_t i = 0; i < s->n_outputs; i++) {
		free(s->outputs[i].key);
		free(s->outputs[i].value);
	}
	free(s->outputs);
	free(s->resume);
	free(s->msg);
	free(s->req.url);
	free(s->req.body);
	jenkins_step_init(s);
}

static void add_line(struct jenkins_step *s, bool note, const char *text, size_t len)
{
	s->lines = kpl_realloc(s->lines, (s->n_lines + 1) * sizeof *s->lines);
	s->lines[s->n_lines].note = note;
	s->lines[s->n_lines].text = kpl_strndup(text, len);
	s->n_lines++;
}

static void note(struct jenkins_step *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void note(struct jenkins_step *s, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	add_line(s, true, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void add_output(struct jenkins_step *s, const char *key, const char *value)
{
	s->outputs = kpl_realloc(s->outputs, (s->n_outputs + 1) * sizeof *s->outputs);
	s->outputs[s->n_outputs].key = kpl_strdup(key);
	s->outputs[s->n_outputs].value = kpl_strdup(value);
	s->n_outputs++;
}

static void finish(struct jenkins *j, struct jenkins_step *s, enum jenkins_result res,
		   const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void finish(struct jenkins *j, struct jenkins_step *s, enum jenkins_result res,
		   const char *fmt, ...)
{
	va_list ap;
	char buf[1024];

	j->state = JENKINS_ST_DONE;
	s->result = res;
	free(s->req.url);
	free(s->req.body);
	memset(&s->req, 0, sizeof s->req);
	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(buf, sizeof buf, fmt, ap);
		va_end(ap);
		s->msg = kpl_strdup(buf);
	}
}

/* The resume data for where j is now. */
static void set_resume(struct jenkins *j, struct jenkins_step *s, bool record_first)
{
	json_t *o = json_object();

	json_object_set_new(o, "v", json_integer(1));
	json_object_set_new(o, "marker", json_string(j->marker));
	json_object_set_new(o, "triggers", json_integer(j->triggers));
	if (j->number) {
		json_object_set_new(o, "phase", json_string("build"));
		json_object_set_new(o, "number", json_integer(j->number));
		json_object_set_new(o, "offset", json_integer((json_int_t)j->offset));
		if (j->build_url)
			json_object_set_new(o, "url", json_string(j->build_url));
		if (j->image)
			json_object_set_new(o, "image", json_string(j->image));
	} else if (j->queue_id) {
		json_object_set_new(o, "phase", json_string("queued"));
	} else {
		json_object_set_new(o, "phase", json_string("triggering"));
	}
	if (j->queue_id)
		json_object_set_new(o, "queue", json_integer(j->queue_id));
	free(s->resume);
	s->resume = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
	s->record_first = s->record_first || record_first;
	json_decref(o);
}

/* Sets s->req for state (the request is derived from j alone). */
static void request(struct jenkins *j, struct jenkins_step *s, enum jenkins_state st,
		    int64_t delay_ms)
{
	struct jenkins_request *q = &s->req;
	char *url = NULL;
	size_t len = 0, cap = 0;
	char num[32];

	free(q->url);
	free(q->body);
	memset(q, 0, sizeof *q);
	j->state = st;
	q->state = st;
	q->method = "GET";
	q->delay_ms = delay_ms;
	q->cookie = j->cookie;
	raw_append(&url, &len, &cap, j->base);
	snprintf(num, sizeof num, "%lld/", (long long)j->number);
	switch (st) {
	case JENKINS_ST_JOB:
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap,
			   "api/json?tree=property%5BparameterDefinitions%5Bname%5D%5D");
		break;
	case JENKINS_ST_CRUMB:
		raw_append(&url, &len, &cap, "crumbIssuer/api/json");
		break;
	case JENKINS_ST_TRIGGER: {
		char *body = NULL;
		size_t blen = 0, bcap = 0;
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap, j->no_params ? "build" : "buildWithParameters");
		q->method = "POST";
		if (!j->no_params) {
			for (size_t i = 0; i < j->np; i++) {
				pct_append(&body, &blen, &bcap, j->pn[i], strlen(j->pn[i]), true);
				raw_append(&body, &blen, &bcap, "=");
				pct_append(&body, &blen, &bcap, j->pv[i], strlen(j->pv[i]), true);
				raw_append(&body, &blen, &bcap, "&");
			}
			raw_append(&body, &blen, &bcap, JENKINS_MARKER_PARAM "=");
			pct_append(&body, &blen, &bcap, j->marker, strlen(j->marker), true);
			q->body = body;
			q->body_len = blen;
			q->content_type = "application/x-www-form-urlencoded";
		}
		break;
	}
	case JENKINS_ST_FIND_QUEUE:
		raw_append(&url, &len, &cap, "queue/api/json?tree=items%5Bid%2Cactions"
			   "%5Bparameters%5Bname%2Cvalue%5D%5D%5D");
		break;
	case JENKINS_ST_FIND_BUILDS:
		raw_append(&url, &len, &cap, j->job_path);
		/* allBuilds with a range: `builds` holds only the newest 100,
		 * and a busy job passes that before a restarted kpld looks. */
		raw_append(&url, &len, &cap, "api/json?tree=property%5BparameterDefinitions"
			   "%5Bname%5D%5D%2CallBuilds%5Bnumber%2Curl%2Cactions%5Bparameters"
			   "%5Bname%2Cvalue%5D%5D%5D%7B0%2C" JENKINS_FIND_BUILDS_STR "%7D");
		break;
	case JENKINS_ST_QUEUE:
		snprintf(num, sizeof num, "%lld/", (long long)j->queue_id);
		raw_append(&url, &len, &cap, "queue/item/");
		raw_append(&url, &len, &cap, num);
		raw_append(&url, &len, &cap, "api/json");
		break;
	case JENKINS_ST_CANCEL_ITEM:
		snprintf(num, sizeof num, "%lld", (long long)j->queue_id);
		raw_append(&url, &len, &cap, "queue/cancelItem?id=");
		raw_append(&url, &len, &cap, num);
		q->method = "POST";
		break;
	case JENKINS_ST_LOG: {
		char off[48];
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap, num);
		snprintf(off, sizeof off, "logText/progressiveText?start=%llu",
			 (unsigned long long)j->offset);
		raw_append(&url, &len, &cap, off);
		break;
	}
	case JENKINS_ST_STOP:
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap, num);
		raw_append(&url, &len, &cap, "stop");
		q->method = "POST";
		break;
	case JENKINS_ST_RESULT:
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap, num);
		raw_append(&url, &len, &cap, "api/json?tree=number%2Curl%2Cresult%2CinProgress"
			   "%2Cbuilding%2Cartifacts%5BrelativePath%5D");
		break;
	case JENKINS_ST_ARTIFACT:
		raw_append(&url, &len, &cap, j->job_path);
		raw_append(&url, &len, &cap, num);
		raw_append(&url, &len, &cap, "artifact/" JENKINS_IMAGE_ARTIFACT);
		break;
	default:
		BUG("jenkins: no request for state %s", jenkins_state_name(st));
	}
	q->url = url;
	if (strcmp(q->method, "POST") == 0 && j->crumb) {
		q->crumb_field = j->crumb_field;
		q->crumb = j->crumb;
	}
}

/* A POST: first the crumb (and its session cookie) if not known yet. */
static void post(struct jenkins *j, struct jenkins_step *s, enum jenkins_state st)
{
	if (!j->crumb_known) {
		j->after_crumb = st;
		request(j, s, JENKINS_ST_CRUMB, 0);
		return;
	}
	if (st == JENKINS_ST_TRIGGER) {
		if (j->triggers >= JENKINS_MAX_TRIGGERS) {
			finish(j, s, JENKINS_RESULT_FAILED,
			       "jenkins %s: gave up on triggering %s after %d attempts whose "
			       "outcome was unknown", j->name, j->job, j->triggers);
			return;
		}
		j->triggers++;
		/* Durable before the POST: a restart then looks for the build
		 * instead of triggering blindly. */
		set_resume(j, s, true);
	}
	request(j, s, st, 0);
}

static const char *reason(long status)
{
	switch (status) {
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 409: return "Conflict";
	case 422: return "Unprocessable Entity";
	case 500: return "Internal Server Error";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	default: return "";
	}
}

static const char *reply_header(const struct jenkins_reply *r, const char *name)
{
	for (size_t i = 0; i < r->n_headers; i++)
		if (strcasecmp(r->header_names[i], name) == 0)
			return r->header_values[i];
	return NULL;
}

/* The request's URL without the base (for messages). */
static const char *rel_url(const struct jenkins *j, const char *url)
{
	size_t n = strlen(j->base);
	return url && strncmp(url, j->base, n) == 0 ? url + n : url ? url : "";
}

/* "jenkins ci: POST job/x/buildWithParameters: 409 Conflict: x is not buildable" */
static void fail_http(struct jenkins *j, struct jenkins_step *s, const char *method,
		      const char *url, const struct jenkins_reply *r, const char *hint)
{
	char *text = jenkins_error_text(r->body, r->body_len, 200);

	finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: %s %s: %ld %s%s%s%s%s", j->name, method,
	       rel_url(j, url), r->status, reason(r->status), *text ? ": " : "", text,
	       hint ? " " : "", hint ? hint : "");
	free(text);
}

/* A failure that may pass: the same request again a little later, until
 * it has failed for JENKINS_GIVE_UP_MS. */
static void transient(struct jenkins *j, struct jenkins_step *s, const char *what,
		      int64_t now_ms)
{
	if (!j->fail_since) {
		j->fail_since = now_ms;
		note(s, "jenkins %s: %s; retrying", j->name, what);
	} else if (now_ms - j->fail_since >= JENKINS_GIVE_UP_MS) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: %s (failing for %lld s)",
		       j->name, what, (long long)((now_ms - j->fail_since) / 1000));
		return;
	}
	request(j, s, j->state, JENKINS_RETRY_MS);
}

/* ---------------------------------------------------------------------- */
/* Life */

struct jenkins *jenkins_new(const struct jenkins_config *cfg, struct kpl_err *err)
{
	struct jenkins *j;
	char *path = jenkins_job_path(cfg->job);
	size_t blen;

	if (!path) {
		kpl_errf(err, KPL_EINVAL, "job \"%s\": must be a job name, folders separated by "
			 "single '/' (team/app)", cfg->job ? cfg->job : "");
		return NULL;
	}
	if (!cfg->base_url || (strncmp(cfg->base_url, "http://", 7) != 0 &&
			       strncmp(cfg->base_url, "https://", 8) != 0)) {
		free(path);
		kpl_errf(err, KPL_EINVAL, "jenkins %s: url must be http:// or https://",
			 cfg->name);
		return NULL;
	}
	j = kpl_calloc(1, sizeof *j);
	j->name = kpl_strdup(cfg->name ? cfg->name : "jenkins");
	blen = strlen(cfg->base_url);
	j->base = kpl_asprintf("%s%s", cfg->base_url,
			       blen && cfg->base_url[blen - 1] == '/' ? "" : "/");
	j->job = kpl_strdup(cfg->job);
	j->job_path = path;
	j->marker = kpl_strdup(cfg->marker ? cfg->marker : "");
	j->cred_word = kpl_strdup(cfg->cred_word ? cfg->cred_word : "token");
	j->np = cfg->n_params;
	j->pn = kpl_calloc(j->np + 1, sizeof *j->pn);
	j->pv = kpl_calloc(j->np + 1, sizeof *j->pv);
	for (size_t i = 0; i < j->np; i++) {
		j->pn[i] = kpl_strdup(cfg->param_names[i]);
		j->pv[i] = kpl_strdup(cfg->param_values[i]);
	}
	j->unstable = cfg->unstable;
	j->state = JENKINS_ST_INIT;
	return j;
}

void jenkins_free(struct jenkins *j)
{
	if (!j)
		return;
	for (size_t i = 0; i < j->np; i++) {
		free(j->pn[i]);
		free(j->pv[i]);
	}
	free(j->pn);
	free(j->pv);
	free(j->name);
	free(j->base);
	free(j->job);
	free(j->job_path);
	free(j->marker);
	free(j->cred_word);
	free(j->crumb_field);
	free(j->crumb);
	free(j->cookie);
	free(j->build_url);
	free(j->image);
	free(j->art_image);
	free(j->art_digest);
	free(j->result);
	free(j);
}

int jenkins_begin(struct jenkins *j, const char *resume, int64_t now_ms,
		  struct jenkins_step *out, struct kpl_err *err)
{
	json_t *o;
	const char *phase, *m;

	(void)now_ms;
	jenkins_step_init(out);
	if (j->state != JENKINS_ST_INIT)
		BUG("jenkins_begin twice");
	if (!resume || !*resume) {
		request(j, out, JENKINS_ST_JOB, 0);
		return 0;
	}
	o = json_loads(resume, 0, NULL);
	phase = json_is_object(o) ? jstr(o, "phase") : NULL;
	if (!phase) {
		json_decref(o);
		return kpl_errf(err, KPL_EINVAL, "unreadable resume data for the Jenkins build");
	}
	if ((m = jstr(o, "marker")) && *m) {
		free(j->marker);
		j->marker = kpl_strdup(m);
	}
	j->triggers = (int)json_integer_value(json_object_get(o, "triggers"));
	j->queue_id = json_integer_value(json_object_get(o, "queue"));
	if (strcmp(phase, "build") == 0) {
		const char *u = jstr(o, "url"), *img = jstr(o, "image");
		j->number = json_integer_value(json_object_get(o, "number"));
		j->offset = (uint64_t)json_integer_value(json_object_get(o, "offset"));
		j->build_url = u ? kpl_strdup(u) : NULL;
		j->image = img ? kpl_strdup(img) : NULL;
		if (j->number <= 0)
			goto bad;
		note(out, "following Jenkins build #%lld again from byte %llu of its log",
		     (long long)j->number, (unsigned long long)j->offset);
		request(j, out, JENKINS_ST_LOG, 0);
	} else if (strcmp(phase, "queued") == 0) {
		if (j->queue_id <= 0)
			goto bad;
		note(out, "following Jenkins queue item %lld again", (long long)j->queue_id);
		request(j, out, JENKINS_ST_QUEUE, 0);
	} else if (strcmp(phase, "triggering") == 0) {
		/* The POST may or may not have reached Jenkins. */
		j->find_may_trigger = true;
		j->after_restart = true;
		note(out, "kpld stopped while triggering %s: looking for a queue item or build "
		     "with %s=%s before triggering", j->job, JENKINS_MARKER_PARAM, j->marker);
		request(j, out, JENKINS_ST_FIND_QUEUE, 0);
	} else {
		goto bad;
	}
	json_decref(o);
	return 0;
bad:
	kpl_errf(err, KPL_EINVAL, "unreadable resume data for the Jenkins build (phase %s)",
		 phase);
	json_decref(o); /* phase is gone with it */
	jenkins_step_release(out);
	return KPL_EINVAL;
}

/* ---------------------------------------------------------------------- */
/* Replies */

/* 1 if a Jenkins "actions" array holds parameter name=value. */
static bool actions_have(json_t *actions, const char *name, const char *value)
{
	size_t i, k;
	json_t *a, *p;

	json_array_foreach(actions, i, a) {
		json_array_foreach(json_object_get(a, "parameters"), k, p) {
			const char *n = jstr(p, "name"), *v = jstr(p, "value");
			if (n && v && strcmp(n, name) == 0 && strcmp(v, value) == 0)
				return true;
		}
	}
	return false;
}

/* Declared parameter names of a job's JSON (property[].parameterDefinitions). */
static bool job_declares(json_t *job, const char *name, size_t *n_defs)
{
	size_t i, k;
	json_t *prop, *d;
	bool found = false;

	*n_defs = 0;
	json_array_foreach(json_object_get(job, "property"), i, prop) {
		json_array_foreach(json_object_get(prop, "parameterDefinitions"), k, d) {
			const char *n = jstr(d, "name");
			(*n_defs)++;
			if (n && strcmp(n, name) == 0)
				found = true;
		}
	}
	return found;
}

static void enter_build(struct jenkins *j, struct jenkins_step *s, int64_t number,
			const char *url)
{
	char num[32];

	j->number = number;
	j->offset = 0;
	free(j->build_url);
	j->build_url = url && *url ? kpl_strdup(url)
				   : kpl_asprintf("%s%s%lld/", j->base, j->job_path,
						  (long long)number);
	snprintf(num, sizeof num, "%lld", (long long)number);
	add_output(s, "build_number", num);
	add_output(s, "build_url", j->build_url);
	note(s, "Jenkins build #%lld: %s", (long long)number, j->build_url);
	set_resume(j, s, true);
	if (j->cancel_requested && !j->stop_sent)
		post(j, s, JENKINS_ST_STOP);
	else
		request(j, s, JENKINS_ST_LOG, 0);
}

static void on_job(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		   struct jenkins_step *s)
{
	json_t *o;
	size_t n_defs;

	if (r->status == 404) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: no job \"%s\" (GET %s: 404 Not "
		       "Found)", j->name, j->job, rel_url(j, url));
		return;
	}
	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	o = parse_json(r->body, r->body_len);
	if (!json_is_object(o)) {
		json_decref(o);
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: GET %s: the reply is not "
		       "JSON (is the url a Jenkins?)", j->name, rel_url(j, url));
		return;
	}
	j->job_known = true;
	j->marker_declared = job_declares(o, JENKINS_MARKER_PARAM, &n_defs);
	j->no_params = n_defs == 0;
	if (j->no_params && j->np)
		note(s, "job %s has no parameters: Jenkins ignores the %zu given", j->job, j->np);
	for (size_t i = 0; i < j->np && !j->no_params; i++) {
		size_t dummy;
		if (!job_declares(o, j->pn[i], &dummy))
			note(s, "job %s does not declare the parameter %s: Jenkins ignores it",
			     j->job, j->pn[i]);
	}
	if (!j->marker_declared)
		note(s, "job %s does not declare the string parameter %s: if kpld stops between "
		     "triggering and recording the queue item, kpl cannot find the build again "
		     "and fails the stage rather than trigger twice (see docs/stages.md)",
		     j->job, JENKINS_MARKER_PARAM);
	json_decref(o);
	if (j->cancel_requested) {
		finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled before Jenkins was asked to build");
		return;
	}
	post(j, s, JENKINS_ST_TRIGGER);
}

static void on_crumb(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		     struct jenkins_step *s)
{
	char *cookie = NULL;
	size_t len = 0, cap = 0;

	if (r->status == 404) {
		/* CSRF protection is off. */
		j->crumb_known = true;
		free(j->crumb_field);
		free(j->crumb);
		j->crumb_field = j->crumb = NULL;
	} else if (r->status == 200) {
		free(j->crumb_field);
		free(j->crumb);
		if (jenkins_parse_crumb(r->body, r->body_len, &j->crumb_field, &j->crumb)) {
			finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: GET %s: no crumb in the "
			       "reply", j->name, rel_url(j, url));
			return;
		}
		j->crumb_known = true;
		/* The crumb is valid only with the session it was issued in:
		 * keep every cookie the reply set, for the POST. */
		for (size_t i = 0; i < r->n_headers; i++) {
			const char *v = r->header_values[i];
			size_t n;
			if (strcasecmp(r->header_names[i], "Set-Cookie") != 0)
				continue;
			n = strcspn(v, ";");
			if (!n || !memchr(v, '=', n) || strpbrk(v, "\r\n"))
				continue;
			if (len)
				raw_append(&cookie, &len, &cap, "; ");
			{
				char *c = kpl_strndup(v, n);
				raw_append(&cookie, &len, &cap, c);
				free(c);
			}
		}
		if (cookie) {
			free(j->cookie);
			j->cookie = cookie;
		}
	} else {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	if (j->after_crumb == JENKINS_ST_TRIGGER && j->cancel_requested) {
		finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled before Jenkins was asked to build");
		return;
	}
	post(j, s, j->after_crumb);
}

static void find(struct jenkins *j, struct jenkins_step *s, bool may_trigger, int64_t delay)
{
	j->find_may_trigger = may_trigger;
	request(j, s, JENKINS_ST_FIND_QUEUE, delay);
}

static void on_trigger(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		       struct jenkins_step *s)
{
	const char *loc = reply_header(r, "Location");
	int64_t id;

	if (r->status == 201 || r->status == 303) {
		if (jenkins_parse_location(loc, &id)) {
			finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: POST %s: %ld without a "
			       "queue item in Location", j->name, rel_url(j, url), r->status);
			return;
		}
		j->queue_id = id;
		note(s, r->status == 201 ? "queued in Jenkins as item %lld"
			: "already queued in Jenkins as item %lld", (long long)id);
		set_resume(j, s, true);
		if (j->cancel_requested)
			post(j, s, JENKINS_ST_CANCEL_ITEM);
		else
			request(j, s, JENKINS_ST_QUEUE, 0);
		return;
	}
	if (r->status >= 300 && r->status < 400) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: POST %s: %ld: Jenkins queued "
		       "nothing (a plugin vetoed the build?)", j->name, rel_url(j, url), r->status);
		return;
	}
	if (r->status == 404) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: no job \"%s\" (POST %s: 404 Not "
		       "Found)", j->name, j->job, rel_url(j, url));
		return;
	}
	fail_http(j, s, "POST", url, r, NULL);
}

static void on_find_queue(struct jenkins *j, const struct jenkins_reply *r, const char *url,
			  struct jenkins_step *s)
{
	json_t *o, *item;
	size_t i;
	int64_t found = 0;

	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	o = parse_json(r->body, r->body_len);
	json_array_foreach(json_object_get(o, "items"), i, item) {
		if (actions_have(json_object_get(item, "actions"), JENKINS_MARKER_PARAM,
				 j->marker)) {
			found = json_integer_value(json_object_get(item, "id"));
			break;
		}
	}
	json_decref(o);
	if (found > 0) {
		j->queue_id = found;
		note(s, "found queue item %lld with %s=%s: following it", (long long)found,
		     JENKINS_MARKER_PARAM, j->marker);
		set_resume(j, s, true);
		if (j->cancel_requested)
			post(j, s, JENKINS_ST_CANCEL_ITEM);
		else
			request(j, s, JENKINS_ST_QUEUE, 0);
		return;
	}
	/* Not queued (any more): a build, then. Queue first, builds second:
	 * an item leaves the queue as its build starts, so one of the two
	 * answers sees it. */
	request(j, s, JENKINS_ST_FIND_BUILDS, 0);
}

static void on_find_builds(struct jenkins *j, const struct jenkins_reply *r, const char *url,
			   struct jenkins_step *s)
{
	json_t *o, *b;
	size_t i, n_defs;
	int64_t number = 0;
	char *burl = NULL;
	bool declared;

	if (r->status == 404) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: no job \"%s\" (GET %s: 404 Not "
		       "Found)", j->name, j->job, rel_url(j, url));
		return;
	}
	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	o = parse_json(r->body, r->body_len);
	declared = job_declares(o, JENKINS_MARKER_PARAM, &n_defs);
	json_array_foreach(json_object_get(o, "allBuilds"), i, b) {
		if (actions_have(json_object_get(b, "actions"), JENKINS_MARKER_PARAM, j->marker)) {
			const char *u = jstr(b, "url");
			number = json_integer_value(json_object_get(b, "number"));
			burl = u ? kpl_strdup(u) : NULL;
			break;
		}
	}
	json_decref(o);
	if (number > 0) {
		note(s, "found build #%lld with %s=%s: following it", (long long)number,
		     JENKINS_MARKER_PARAM, j->marker);
		enter_build(j, s, number, burl);
		free(burl);
		return;
	}
	free(burl);
	if (!j->find_may_trigger) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: queue item %lld is gone and no "
		       "build of %s has %s=%s", j->name, (long long)j->queue_id, j->job,
		       JENKINS_MARKER_PARAM, j->marker);
		return;
	}
	if (!declared) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: cannot tell whether Jenkins "
		       "queued the build: job %s does not declare the parameter %s, so it cannot "
		       "be found; not triggering a second build (see docs/stages.md)", j->name,
		       j->job, JENKINS_MARKER_PARAM);
		return;
	}
	if (j->cancel_requested) {
		finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled (Jenkins had queued nothing)");
		return;
	}
	note(s, "no queue item or build of %s has %s=%s: triggering", j->job,
	     JENKINS_MARKER_PARAM, j->marker);
	/* The job declares the marker, so the search is conclusive: the POST
	 * recorded before the restart left nothing in Jenkins, and is not one
	 * whose outcome is unknown (else kills in that window, not Jenkins,
	 * would use up JENKINS_MAX_TRIGGERS). A POST answered with an error
	 * still counts. */
	if (j->after_restart && j->triggers > 0)
		j->triggers--;
	j->after_restart = false;
	j->no_params = false;
	post(j, s, JENKINS_ST_TRIGGER);
}

static void on_queue(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		     struct jenkins_step *s)
{
	json_t *o, *exe;
	const char *why;

	if (r->status == 404) {
		/* Left items live 5 minutes: its build, if any, has our marker. */
		note(s, "Jenkins no longer knows queue item %lld: looking for its build",
		     (long long)j->queue_id);
		j->find_may_trigger = false;
		request(j, s, JENKINS_ST_FIND_BUILDS, 0);
		return;
	}
	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	o = parse_json(r->body, r->body_len);
	if (!json_is_object(o)) {
		json_decref(o);
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: GET %s: the reply is not JSON",
		       j->name, rel_url(j, url));
		return;
	}
	exe = json_object_get(o, "executable");
	if (json_is_object(exe) && json_integer_value(json_object_get(exe, "number")) > 0) {
		int64_t n = json_integer_value(json_object_get(exe, "number"));
		char *u = jstr(exe, "url") ? kpl_strdup(jstr(exe, "url")) : NULL;
		json_decref(o);
		enter_build(j, s, n, u);
		free(u);
		return;
	}
	if (json_is_true(json_object_get(o, "cancelled"))) {
		json_decref(o);
		if (j->cancel_requested)
			finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled (Jenkins queue item %lld)",
			       (long long)j->queue_id);
		else
			finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: queue item %lld of %s was "
			       "cancelled in Jenkins", j->name, (long long)j->queue_id, j->job);
		return;
	}
	why = jstr(o, "why");
	if (!j->queued_noted && why) {
		j->queued_noted = true;
		note(s, "waiting in the Jenkins queue: %s", why);
	}
	json_decref(o);
	if (j->cancel_requested && !j->cancel_item_sent)
		post(j, s, JENKINS_ST_CANCEL_ITEM);
	else
		request(j, s, JENKINS_ST_QUEUE, JENKINS_POLL_MS);
}

static void on_cancel_item(struct jenkins *j, const struct jenkins_reply *r, const char *url,
			   struct jenkins_step *s)
{
	/* 204 cancelled; 422 it left the queue already; 404 unknown: the
	 * queue item says what became of it. */
	if ((r->status >= 200 && r->status < 400) || r->status == 404 || r->status == 422) {
		j->cancel_item_sent = true;
		note(s, "asked Jenkins to cancel queue item %lld", (long long)j->queue_id);
		request(j, s, JENKINS_ST_QUEUE, 0);
		return;
	}
	fail_http(j, s, "POST", url, r, NULL);
}

static bool stop_expired(struct jenkins *j, struct jenkins_step *s, int64_t now_ms)
{
	if (!j->stop_sent || now_ms < j->stop_deadline)
		return false;
	finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled; Jenkins build #%lld did not report "
	       "ABORTED within %d s", (long long)j->number, JENKINS_STOP_WAIT_MS / 1000);
	return true;
}

static void on_log(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		   int64_t now_ms, struct jenkins_step *s)
{
	const char *size_h = reply_header(r, "X-Text-Size");
	const char *more_h = reply_header(r, "X-More-Data");
	bool more = more_h && strcasecmp(more_h, "true") == 0;
	unsigned long long size;
	const char *p = r->body, *end = r->body + r->body_len;
	uint64_t old = j->offset;
	char *e;

	if (r->status == 404) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: build #%lld of %s is gone (GET %s: "
		       "404 Not Found)", j->name, (long long)j->number, j->job, rel_url(j, url));
		return;
	}
	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	if (!size_h || (size = strtoull(size_h, &e, 10), *e)) {
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: GET %s: no X-Text-Size header",
		       j->name, rel_url(j, url));
		return;
	}
	if (size < j->offset) {
		/* Jenkins sends from 0 when start is past the end. */
		note(s, "the console log of build #%lld is shorter than before (%llu < %llu "
		     "bytes): reading it from the start", (long long)j->number, size,
		     (unsigned long long)j->offset);
	}
	j->offset = size;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n;
		char *img;
		bool cut_end = false;
		if (!nl) {
			size_t tail = (size_t)(end - p);
			/* An unfinished line: the next poll has it whole. The
			 * body's CRLF normalisation touches only line ends, so
			 * the tail has the same length in the raw log. */
			if (more && tail <= JENKINS_MAX_PARTIAL_LINE && tail <= size) {
				j->offset = size - tail;
				break;
			}
			n = tail;
			if (more) {
				/* A piece of a longer line, tagged so a secret the
				 * cut splits is still redacted; never cut inside a
				 * character (its bytes are read again). */
				size_t k = logline_utf8_cut(p, tail);
				if (k > 0 && k < tail && tail - k <= size) {
					j->offset = size - (tail - k);
					n = k;
				}
				cut_end = true;
			}
		} else {
			n = (size_t)(nl - p);
		}
		{
			size_t len = n;
			if (len && p[len - 1] == '\r' && !cut_end)
				len--;
			add_line(s, false, p, len);
			s->lines[s->n_lines - 1].cut = (j->cut_open ? JENKINS_CUT_START : 0) |
						       (cut_end ? JENKINS_CUT_END : 0);
			j->cut_open = cut_end;
			img = jenkins_image_marker(s->lines[s->n_lines - 1].text);
			if (img) {
				free(j->image);
				j->image = img;
			}
		}
		p += n + (nl ? 1 : 0);
		if (cut_end)
			break; /* what is left (a character cut short) is read again */
	}
	if (j->offset != old || s->n_lines)
		set_resume(j, s, false);
	if (stop_expired(j, s, now_ms))
		return;
	if (j->cancel_requested && !j->stop_sent)
		post(j, s, JENKINS_ST_STOP);
	else if (more)
		request(j, s, JENKINS_ST_LOG, j->offset != old ? JENKINS_POLL_BUSY_MS
							       : JENKINS_POLL_MS);
	else
		request(j, s, JENKINS_ST_RESULT, 0);
}

static void on_stop(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		    int64_t now_ms, struct jenkins_step *s)
{
	/* 302 (freestyle) or 200 (pipeline); 404: nothing to stop. */
	if ((r->status >= 200 && r->status < 400) || r->status == 404) {
		j->stop_sent = true;
		j->stop_deadline = now_ms + JENKINS_STOP_WAIT_MS;
		note(s, "asked Jenkins to stop build #%lld", (long long)j->number);
		request(j, s, JENKINS_ST_LOG, 0);
		return;
	}
	fail_http(j, s, "POST", url, r, NULL);
}

static void done_result(struct jenkins *j, struct jenkins_step *s)
{
	const char *res = j->result;
	long long n = (long long)j->number;
	/* A build counted as failed publishes no image: nothing after it
	 * (continue_on_error, finally) may take it for a good one. */
	bool good = strcmp(res, "SUCCESS") == 0 ||
		    (strcmp(res, "UNSTABLE") == 0 && j->unstable != JENKINS_UNSTABLE_FAIL);

	if (good && j->art_image) {
		add_output(s, "image", j->art_image);
		if (j->art_digest)
			add_output(s, "digest", j->art_digest);
	} else if (good && j->image) {
		const char *at = strchr(j->image, '@');
		add_output(s, "image", j->image);
		if (at && at[1])
			add_output(s, "digest", at + 1);
	}
	if (strcmp(res, "SUCCESS") == 0) {
		finish(j, s, JENKINS_RESULT_SUCCEEDED, "Jenkins build #%lld SUCCESS", n);
	} else if (strcmp(res, "UNSTABLE") == 0) {
		if (j->unstable == JENKINS_UNSTABLE_FAIL) {
			finish(j, s, JENKINS_RESULT_FAILED, "Jenkins build #%lld UNSTABLE "
			       "(with.unstable: fail)", n);
		} else {
			note(s, "Jenkins build #%lld is UNSTABLE: counted as a success "
			     "(with.unstable: succeed)", n);
			finish(j, s, JENKINS_RESULT_SUCCEEDED, "Jenkins build #%lld UNSTABLE", n);
		}
	} else if (strcmp(res, "ABORTED") == 0) {
		if (j->cancel_requested)
			finish(j, s, JENKINS_RESULT_CANCELLED, "cancelled: Jenkins build #%lld "
			       "ABORTED", n);
		else
			finish(j, s, JENKINS_RESULT_FAILED, "Jenkins build #%lld aborted in "
			       "Jenkins", n);
	} else {
		finish(j, s, JENKINS_RESULT_FAILED, "Jenkins build #%lld %s", n, res);
	}
}

static void on_result(struct jenkins *j, const struct jenkins_reply *r, const char *url,
		      int64_t now_ms, struct jenkins_step *s)
{
	json_t *o, *inprog, *a;
	const char *res, *u;
	bool running, image_listed = false;
	size_t i;

	if (r->status != 200) {
		fail_http(j, s, "GET", url, r, NULL);
		return;
	}
	o = parse_json(r->body, r->body_len);
	if (!json_is_object(o)) {
		json_decref(o);
		finish(j, s, JENKINS_RESULT_FAILED, "jenkins %s: GET %s: the reply is not JSON",
		       j->name, rel_url(j, url));
		return;
	}
	res = jstr(o, "result");
	inprog = json_object_get(o, "inProgress");
	if (!inprog)
		inprog = json_object_get(o, "building");
	/* Done means inProgress false and a result: `building` turns false
	 * before post-production ends. */
	running = !res || !json_is_false(inprog);
	if (running) {
		json_decref(o);
		if (stop_expired(j, s, now_ms))
			return;
		if (j->cancel_requested && !j->stop_sent)
			post(j, s, JENKINS_ST_STOP);
		else /* the log may still grow: follow it to the end */
			request(j, s, JENKINS_ST_LOG, JENKINS_POLL_MS);
		return;
	}
	free(j->result);
	j->result = kpl_strdup(res);
	if ((u = jstr(o, "url")) && !j->build_url)
		j->build_url = kpl_strdup(u);
	json_array_foreach(json_object_get(o, "artifacts"), i, a) {
		const char *rp = jstr(a, "relativePath");
		if (rp && strcmp(rp, JENKINS_IMAGE_ARTIFACT) == 0)
			image_listed = true;
	}
	json_decref(o); /* res is gone with it */
	if (image_listed && (strcmp(j->result, "SUCCESS") == 0 ||
			     strcmp(j->result, "UNSTABLE") == 0))
		request(j, s, JENKINS_ST_ARTIFACT, 0);
	else
		done_result(j, s);
}

static void on_artifact(struct jenkins *j, const struct jenkins_reply *r, const char *url,
			struct jenkins_step *s)
{
	json_t *o = r->status == 200 ? parse_json(r->body, r->body_len) : NULL;
	const char *ref, *repo, *digest, *image;

	if (!json_is_object(o)) {
		note(s, "jenkins %s: GET %s: %ld: no readable %s; using the log's %s line, if any",
		     j->name, rel_url(j, url), r->status, JENKINS_IMAGE_ARTIFACT,
		     JENKINS_IMAGE_PREFIX);
	} else {
		ref = jstr(o, "ref");
		repo = jstr(o, "repository");
		digest = jstr(o, "digest");
		image = jstr(o, "image");
		if (digest && strchr(digest, ':')) {
			j->art_digest = kpl_strdup(digest);
			if (ref && strchr(ref, '@'))
				j->art_image = kpl_strdup(ref);
			else if (repo)
				j->art_image = kpl_asprintf("%s@%s", repo, digest);
			else if (image) {
				/* drop a tag: the last ':' after the last '/' */
				const char *slash = strrchr(image, '/');
				const char *colon = strrchr(slash ? slash : image, ':');
				size_t n = colon ? (size_t)(colon - image) : strlen(image);
				char *r2 = kpl_strndup(image, n);
				j->art_image = kpl_asprintf("%s@%s", r2, digest);
				free(r2);
			}
		} else if (ref && strchr(ref, '@')) {
			j->art_image = kpl_strdup(ref);
			j->art_digest = kpl_strdup(strchr(ref, '@') + 1);
		}
		if (!j->art_image) {
			free(j->art_digest);
			j->art_digest = NULL;
			note(s, "%s has no digest: using the log's %s line, if any",
			     JENKINS_IMAGE_ARTIFACT, JENKINS_IMAGE_PREFIX);
		}
	}
	json_decref(o);
	done_result(j, s);
}

void jenkins_feed(struct jenkins *j, const struct jenkins_reply *r, int64_t now_ms,
		  struct jenkins_step *out)
{
	enum jenkins_state st = j->state;
	struct jenkins_step prev;
	char *url, what[700];
	const char *method;
	bool is_post;

	jenkins_step_init(out);
	if (st == JENKINS_ST_DONE || st == JENKINS_ST_INIT)
		BUG("jenkins_feed in state %s", jenkins_state_name(st));
	/* The request this replies to, for messages. */
	jenkins_step_init(&prev);
	request(j, &prev, st, 0);
	url = prev.req.url;
	method = prev.req.method;
	is_post = strcmp(method, "POST") == 0;

	if (r->error) {
		if (st == JENKINS_ST_TRIGGER) {
			/* It may have reached Jenkins: look before triggering again. */
			note(out, "jenkins %s: POST %s: %s; looking for the build before "
			     "triggering again", j->name, rel_url(j, url),
			     r->error_msg ? r->error_msg : kpl_strerror(r->error));
			find(j, out, true, JENKINS_RETRY_MS);
		} else {
			snprintf(what, sizeof what, "%s %s: %s", method, rel_url(j, url),
				 r->error_msg ? r->error_msg : kpl_strerror(r->error));
			transient(j, out, what, now_ms);
		}
		goto out;
	}
	if (r->status == 401) {
		finish(j, out, JENKINS_RESULT_FAILED, "jenkins %s: 401 Unauthorized (check the %s)",
		       j->name, j->cred_word);
		goto out;
	}
	if (r->status == 403 && is_post && j->crumb_refetches < 2) {
		char *text = jenkins_error_text(r->body, r->body_len, 200);
		bool crumb = strstr(text, "crumb") != NULL;
		free(text);
		if (crumb) {
			/* Nothing was done: a fresh crumb and session, then again. */
			j->crumb_refetches++;
			j->crumb_known = false;
			free(j->cookie);
			j->cookie = NULL;
			note(out, "jenkins %s: the crumb was refused: fetching a new one", j->name);
			if (st == JENKINS_ST_TRIGGER)
				j->triggers--;
			post(j, out, st);
			goto out;
		}
	}
	if (r->status == 403) {
		const char *perm = reply_header(r, "X-Required-Permission");
		const char *as = reply_header(r, "X-You-Are-Authenticated-As");
		char hint[300] = "";
		if (perm)
			snprintf(hint, sizeof hint, "(%s lacks %s)", as ? as : "the user", perm);
		fail_http(j, out, method, url, r, perm ? hint : NULL);
		goto out;
	}
	if (r->status >= 500) {
		char *text = jenkins_error_text(r->body, r->body_len, 200);
		snprintf(what, sizeof what, "%s %s: %ld %s%s%s", method, rel_url(j, url),
			 r->status, reason(r->status), *text ? ": " : "", text);
		free(text);
		if (st == JENKINS_ST_TRIGGER) {
			note(out, "jenkins %s: %s; looking for the build before triggering again",
			     j->name, what);
			find(j, out, true, JENKINS_RETRY_MS);
		} else {
			transient(j, out, what, now_ms);
		}
		goto out;
	}
	j->fail_since = 0;
	switch (st) {
	case JENKINS_ST_JOB: on_job(j, r, url, out); break;
	case JENKINS_ST_CRUMB: on_crumb(j, r, url, out); break;
	case JENKINS_ST_TRIGGER: on_trigger(j, r, url, out); break;
	case JENKINS_ST_FIND_QUEUE: on_find_queue(j, r, url, out); break;
	case JENKINS_ST_FIND_BUILDS: on_find_builds(j, r, url, out); break;
	case JENKINS_ST_QUEUE: on_queue(j, r, url, out); break;
	case JENKINS_ST_CANCEL_ITEM: on_cancel_item(j, r, url, out); break;
	case JENKINS_ST_LOG: on_log(j, r, url, now_ms, out); break;
	case JENKINS_ST_STOP: on_stop(j, r, url, now_ms, out); break;
	case JENKINS_ST_RESULT: on_result(j, r, url, now_ms, out); break;
	case JENKINS_ST_ARTIFACT: on_artifact(j, r, url, out); break;
	default: BUG("jenkins_feed: state %s", jenkins_state_name(st));
	}
out:
	jenkins_step_release(&prev);
}

bool jenkins_cancel(struct jenkins *j, bool sent, int64_t now_ms, struct jenkins_step *out)
{
	(void)now_ms;
	if (j->cancel_requested || j->state == JENKINS_ST_DONE || j->state == JENKINS_ST_INIT)
		return false;
	j->cancel_requested = true;
	if (sent)
		return false; /* the reply decides */
	jenkins_step_init(out);
	switch (j->state) {
	case JENKINS_ST_JOB:
	case JENKINS_ST_TRIGGER:
		finish(j, out, JENKINS_RESULT_CANCELLED,
		       "cancelled before Jenkins was asked to build");
		return true;
	case JENKINS_ST_CRUMB:
		if (j->after_crumb != JENKINS_ST_TRIGGER)
			return false;
		finish(j, out, JENKINS_RESULT_CANCELLED,
		       "cancelled before Jenkins was asked to build");
		return true;
	case JENKINS_ST_QUEUE:
		post(j, out, JENKINS_ST_CANCEL_ITEM);
		return true;
	case JENKINS_ST_LOG:
	case JENKINS_ST_RESULT:
		post(j, out, JENKINS_ST_STOP);
		return true;
	default:
		return false;
	}
}
