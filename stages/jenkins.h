/*
 * jenkins.h - the Jenkins client's protocol logic, without I/O (style.md
 * practice 2): it turns Jenkins' replies (status, headers, JSON, log bytes)
 * into decisions and next requests. stages/build_jenkins.c moves the bytes
 * (base/http.h) and persists what a step says; tests/unit/jenkins_test.c
 * feeds it fixture replies.
 *
 * One struct jenkins follows one build of one job, from the trigger to the
 * result:
 *
 *   JOB        GET  job/.../api/json?tree=property[...]   (job exists? does it
 *                                                          declare the marker?)
 *   CRUMB      GET  crumbIssuer/api/json                   (404: CSRF off; else
 *                                                          keep crumb + cookie)
 *   TRIGGER    POST job/.../buildWithParameters            (201/303 Location:
 *                                                          queue item N)
 *   QUEUE      GET  queue/item/N/api/json                  (until it left the
 *                                                          queue: build number)
 *   LOG        GET  job/.../B/logText/progressiveText?start=K
 *   RESULT     GET  job/.../B/api/json                     (inProgress false,
 *                                                          result set)
 *   ARTIFACT   GET  job/.../B/artifact/kpl-image.json      (if listed)
 *
 * plus FIND_QUEUE / FIND_BUILDS (find the item or build carrying our marker
 * parameter after an ambiguous trigger or a restart), CANCEL_ITEM and STOP.
 *
 * The marker: every trigger carries the parameter KPL_RUN_ID (JENKINS_MARKER
 * _PARAM) whose value is unique to the run, stage and attempt. Jenkins keeps
 * it only if the job declares it; then a trigger whose outcome is unknown
 * (kpld died between the POST and recording the queue item, or the POST got
 * a 5xx or a broken connection) is found again instead of repeated.
 *
 * Durability: a step's resume data (JSON) is what the caller must persist.
 * With record_first the caller persists it durably before sending the step's
 * request (the "triggering" mark before the POST; the queue item and the build
 * number at once when learnt); otherwise it is saved in the same commit as
 * the step's log lines (the progressiveText offset).
 *
 * Threads: none of its own; a struct jenkins is used by one thread at a time.
 * Nothing here does I/O or reads the clock: callers pass now_ms.
 */
#ifndef KPL_JENKINS_H
#define KPL_JENKINS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

/* The parameter every trigger adds (jobs should declare it; see
 * docs/stages.md). */
#define JENKINS_MARKER_PARAM "KPL_RUN_ID"
/* The artifact a job may archive to report the image it built. */
#define JENKINS_IMAGE_ARTIFACT "kpl-image.json"
/* The log line a job may print to report it: KPL_IMAGE=repo@sha256:... */
#define JENKINS_IMAGE_PREFIX "KPL_IMAGE="

/* Polling: the queue and a build whose log did not grow; a log that did. */
#define JENKINS_POLL_MS 1000
#define JENKINS_POLL_BUSY_MS 250
/* A request that failed in a way that may pass (no connection, 5xx) is
 * repeated every JENKINS_RETRY_MS until it has failed for JENKINS_GIVE_UP_MS
 * in a row (a Jenkins restart takes a minute or two). */
#define JENKINS_RETRY_MS 2000
#define JENKINS_GIVE_UP_MS (5 * 60 * 1000)
/* After asking Jenkins to stop, how long to wait for ABORTED. */
#define JENKINS_STOP_WAIT_MS (60 * 1000)
/* Triggers with an unknown outcome, at most (each followed by a search). */
#define JENKINS_MAX_TRIGGERS 3
/* A search for a build by its marker reads the job's newest this many
 * builds (allBuilds{0,N}; `builds` stops at 100). */
#define JENKINS_FIND_BUILDS_STR "1000"
/* A log line without its end is kept back (to be completed by the next
 * poll) unless it is longer than this. */
#define JENKINS_MAX_PARTIAL_LINE (64 * 1024)

#define JENKINS_STATE_MAP(X) \
	X(INIT)              \
	X(JOB)               \
	X(CRUMB)             \
	X(TRIGGER)           \
	X(FIND_QUEUE)        \
	X(FIND_BUILDS)       \
	X(QUEUE)             \
	X(CANCEL_ITEM)       \
	X(LOG)               \
	X(STOP)              \
	X(RESULT)            \
	X(ARTIFACT)          \
	X(DONE)

enum jenkins_state {
#define JENKINS_STATE_ENUM(s) JENKINS_ST_##s,
	JENKINS_STATE_MAP(JENKINS_STATE_ENUM)
#undef JENKINS_STATE_ENUM
	JENKINS_ST_LAST_
};

/* "QUEUE" (static). */
const char *jenkins_state_name(enum jenkins_state s);

enum jenkins_unstable {
	JENKINS_UNSTABLE_SUCCEED = 0, /* UNSTABLE -> SUCCEEDED, with a log note */
	JENKINS_UNSTABLE_FAIL,        /* UNSTABLE -> FAILED */
};

struct jenkins_config {
	const char *name;     /* the endpoint's name, for messages ("ci-main") */
	const char *base_url; /* http(s)://host[/prefix][/] */
	const char *job;      /* full name, folders with '/': "team/app" */
	const char *const *param_names;
	const char *const *param_values;
	size_t n_params;
	const char *marker;   /* value of KPL_RUN_ID for this attempt */
	enum jenkins_unstable unstable;
	const char *cred_word; /* "token" or "password", for the 401 message */
};

/* A request to send. Strings are owned by the step (or, for crumb and
 * cookie, by the struct jenkins, valid until the next call on it). */
struct jenkins_request {
	enum jenkins_state state; /* what the reply will be fed to */
	const char *method;       /* "GET" or "POST" (static) */
	char *url;                /* absolute */
	char *body;               /* POST form body or NULL */
	size_t body_len;
	const char *content_type; /* with body */
	const char *crumb_field;  /* NULL: none */
	const char *crumb;
	const char *cookie;       /* "JSESSIONID.x=y" or NULL */
	int64_t delay_ms;         /* wait this long before sending */
};

enum jenkins_result {
	JENKINS_RESULT_NONE = 0, /* not done: send req */
	JENKINS_RESULT_SUCCEEDED,
	JENKINS_RESULT_FAILED,
	JENKINS_RESULT_CANCELLED,
};

/* Which ends of a console line are cuts (a line over
 * JENKINS_MAX_PARTIAL_LINE comes in pieces); as STAGE_LOG_CUT_*. */
#define JENKINS_CUT_START 1u /* continues the previous piece */
#define JENKINS_CUT_END 2u   /* continues in the next one */

struct jenkins_line {
	bool note; /* kpl's own note (system stream), else a console line */
	char *text;
	unsigned cut; /* JENKINS_CUT_* bits: a piece, redacted as one (stage_log_piece) */
};

struct jenkins_output {
	char *key;
	char *value;
};

/*
 * What to do, in this order: log lines; persist resume (if not NULL:
 * durably before anything else when record_first, else in the commit of the
 * lines); publish outputs; then end the attempt (result != NONE, msg says
 * why, may be NULL) or send req. Everything is owned by the step.
 */
struct jenkins_step {
	struct jenkins_line *lines;
	size_t n_lines;
	char *resume;
	bool record_first;
	struct jenkins_output *outputs;
	size_t n_outputs;
	enum jenkins_result result;
	char *msg;
	struct jenkins_request req;
};

void jenkins_step_init(struct jenkins_step *s);
void jenkins_step_release(struct jenkins_step *s);

/* A reply as the transport saw it (all borrowed for the call). */
struct jenkins_reply {
	int error;             /* 0, or a KPL_E* code: no HTTP reply */
	const char *error_msg; /* with error: for a person (no secrets) */
	long status;
	const char *const *header_names;
	const char *const *header_values;
	size_t n_headers;
	const char *body;
	size_t body_len;
};

struct jenkins;

/* A new client for cfg (copied). NULL with err set if the job name or URL
 * is unusable. Free with jenkins_free. */
struct jenkins *jenkins_new(const struct jenkins_config *cfg, struct kpl_err *err);
void jenkins_free(struct jenkins *j);

/*
 * The first step: resume NULL or "" starts afresh; else resume is what a
 * step asked to persist and the client carries on from there (following the
 * build, the queue item, or searching for a trigger whose outcome is
 * unknown: it never triggers a second build for one marker while Jenkins
 * has one). Returns 0, or KPL_EINVAL if resume cannot be read (err says
 * why).
 */
int jenkins_begin(struct jenkins *j, const char *resume, int64_t now_ms,
		  struct jenkins_step *out, struct kpl_err *err);

/* The reply to the last step's request. out is initialized here. */
void jenkins_feed(struct jenkins *j, const struct jenkins_reply *r, int64_t now_ms,
		  struct jenkins_step *out);

/*
 * Stop the build (or the queue item). sent says whether the last step's
 * request has gone out. Returns true if out holds a step that replaces the
 * last one's request (which must then not be sent); false if the caller
 * carries on as it was (the reply to the request in flight decides, or
 * nothing is left to stop). Calling it again is harmless.
 */
bool jenkins_cancel(struct jenkins *j, bool sent, int64_t now_ms, struct jenkins_step *out);

enum jenkins_state jenkins_state(const struct jenkins *j);
/* The build number, 0 until known. */
int64_t jenkins_build_number(const struct jenkins *j);

/* --- Pure helpers, exposed for tests --- */

/* "team/app" -> "job/team/job/app/" with each name percent-encoded; NULL if
 * the name is empty or has an empty part. malloc'd. */
char *jenkins_job_path(const char *job);
/* The queue item id from a Location header (".../queue/item/25/"); 0 or
 * KPL_EINVAL. */
int jenkins_parse_location(const char *location, int64_t *id);
/* The crumb issuer's JSON: field name and crumb, malloc'd; 0 or KPL_EINVAL. */
int jenkins_parse_crumb(const char *body, size_t len, char **field, char **crumb);
/* The image reference of a "KPL_IMAGE=ref" line (no spaces in ref), or
 * NULL; malloc'd. */
char *jenkins_image_marker(const char *line);
/* Readable text of an error body (HTML tags dropped, blanks squeezed, at
 * most max bytes); malloc'd. */
char *jenkins_error_text(const char *body, size_t len, size_t max);

#endif
