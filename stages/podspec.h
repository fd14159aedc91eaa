/*
 * podspec.h - a pod stage without I/O (style.md practice 2): the pod's name,
 * the Pod and Secret objects, what a Pod's status means for the attempt, the
 * log stream's lines and where a resumed stream picks up, the outputs in a
 * termination message, and the attempt's stored state.
 *
 * stages/pod.c is the glue that sends these objects and feeds replies back;
 * tests/unit/podspec_test.c feeds fixture objects.
 *
 * The wire rules are Kubernetes' (core/v1 types, the kubelet's log format):
 * /work/shared/reference/external-apis-2.md §1.
 *
 * Pure; any thread. JSON is jansson's.
 */
#ifndef KPL_PODSPEC_H
#define KPL_PODSPEC_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

/* The container's name in every pod stage. */
#define PODSPEC_CONTAINER "step"
/* Where a pod stage's command starts (an emptyDir volume). */
#define PODSPEC_WORKSPACE "/workspace"
/* $KPL_OUTPUTS in a pod: the termination message file, as Tekton's
 * results; Kubernetes keeps at most 4096 bytes of it. */
#define PODSPEC_OUTPUTS_PATH "/dev/termination-log"
#define PODSPEC_OUTPUTS_MAX 4096
/* Labels on the pod and its Secret. */
#define PODSPEC_LABEL_RUN "kpl.dev/run"
#define PODSPEC_LABEL_STAGE "kpl.dev/stage"
#define PODSPEC_LABEL_ATTEMPT "kpl.dev/attempt"

/*
 * The attempt's pod name: "kpl-RUN-STAGE-ATTEMPT" when that is a DNS-1123
 * label of at most 63 characters as it stands (lower case, digits, '-');
 * else the run and stage made fit (lower case, other characters '-', cut)
 * with 8 hex digits of a hash of the exact run id and stage name before the
 * attempt, so two stages whose names differ only in case or '_' never share
 * a pod. Deterministic: the same attempt always gets the same name.
 * malloc'd.
 */
char *podspec_name(const char *run_id, const char *stage, uint32_t attempt);

/* A label value for s (at most 63 of [A-Za-z0-9._-], alphanumeric at both
 * ends): s itself when it is one, else made fit with a hash suffix as
 * above. malloc'd. */
char *podspec_label_value(const char *s);

/*
 * Kubernetes expands $(VAR) in a container's command and args (and $$ to
 * $): the text as written must reach the shell, so every '$' that starts
 * "$(" or "$$" is doubled. Returns a malloc'd copy.
 */
char *podspec_escape_expansion(const char *s);

/* One variable of the pod's environment. secret: its value goes to the
 * attempt's Secret and the pod refers to it (secretKeyRef). */
struct podspec_env {
	const char *name;
	const char *value;
	bool secret;
};

struct podspec_input {
	const char *name;       /* podspec_name */
	const char *namespace;
	const char *image;
	const char *run_id, *stage;
	uint32_t attempt;
	char *const *argv;      /* n_argv strings, as written (escaped here) */
	size_t n_argv;
	const char *workdir;    /* NULL: PODSPEC_WORKSPACE; relative: below it */
	const struct podspec_env *env;
	size_t n_env;
	const char *secret_name; /* the attempt's Secret (podspec_secret) */
	const char *claim;       /* the run's PersistentVolumeClaim at
				    PODSPEC_WORKSPACE, or NULL: an emptyDir */
	const json_t *resources; /* {requests, limits} or NULL (borrowed) */
	const json_t *node_selector;
	const json_t *tolerations;
	const char *service_account; /* NULL: none, and no API token mounted */
	int64_t grace_seconds;       /* terminationGracePeriodSeconds */
};

/*
 * The Pod: one container PODSPEC_CONTAINER running argv, restartPolicy
 * Never, labels (run, stage, attempt) and annotations with the exact
 * values, env in order with secret ones as secretKeyRef to secret_name
 * (key = the variable's name), an emptyDir at PODSPEC_WORKSPACE,
 * terminationMessagePath PODSPEC_OUTPUTS_PATH (policy File). New reference.
 */
json_t *podspec_pod(const struct podspec_input *in);

/* The attempt's Secret: type Opaque, the same labels, data = the secret
 * env values, base64. New reference. */
json_t *podspec_secret(const struct podspec_input *in);

/* The run's workspace claim: "kpl-RUN-ws", made fit as podspec_name.
 * malloc'd. */
char *podspec_claim_name(const char *run_id);
/* The claim in->claim (ReadWriteOnce, size bytes of storage, the run's
 * label; the cluster's default storage class). New reference. */
json_t *podspec_claim(const struct podspec_input *in, const char *size);

/* --- What a Pod's status means --- */

enum podspec_phase {
	PODSPEC_PENDING,       /* not started yet; nothing wrong seen */
	PODSPEC_PULL_FAILING,  /* waiting: ErrImagePull, ImagePullBackOff, ... */
	PODSPEC_UNSCHEDULABLE, /* PodScheduled=False, reason Unschedulable */
	PODSPEC_CONFIG_FAILING, /* waiting: CreateContainerConfigError, ... */
	PODSPEC_RUNNING,       /* the container runs: its log can be read */
	PODSPEC_SUCCEEDED,     /* terminal */
	PODSPEC_FAILED,        /* terminal */
	PODSPEC_PHASE_LAST
};

struct podspec_status {
	enum podspec_phase phase;
	bool terminal;          /* SUCCEEDED or FAILED */
	bool started;           /* the container ran (its log exists) */
	bool deleting;          /* metadata.deletionTimestamp is set */
	int exit_code;          /* terminated containers only, else -1 */
	/* For a person: "ImagePullBackOff: Back-off pulling image ...", the
	 * scheduler's message, "the command exited with status 3 (Error)",
	 * "OOMKilled ...", "Evicted: The node was low on resource: memory."
	 * Without the pod's name (the caller adds it). */
	char why[600];
	/* The container's termination message (the outputs), or "". */
	char message[PODSPEC_OUTPUTS_MAX + 1];
};

const char *podspec_phase_name(enum podspec_phase p);

/* Reads a Pod object (pure). */
void podspec_status_of(const json_t *pod, struct podspec_status *out);

/* --- The log stream (GET .../log?follow=true&timestamps=true) --- */

/* A time as the kubelet writes it, RFC 3339 with up to 9 fractional
 * digits; ordered by (sec, nsec). */
struct podspec_time {
	int64_t sec;
	int32_t nsec;
};

/* Parses "2026-03-01T10:00:00.123456789Z" (or an offset) at s. 0 or
 * KPL_EINVAL. */
int podspec_time_parse(const char *s, size_t n, struct podspec_time *t);
/* Formats t as RFC 3339 with 9 fractional digits (nano = true) or at
 * second precision, UTC, into buf (at least 40 bytes). */
const char *podspec_time_format(const struct podspec_time *t, bool nano, char *buf,
				size_t n);

/*
 * Where the stored log ends: the timestamp of the last stored line and how
 * many stored lines carry exactly that timestamp (several lines may share
 * one). A stream that starts again from sinceTime (which the API server
 * forwards at second precision) repeats lines; podspec_log_accept drops
 * each one already stored and only those.
 */
struct podspec_logpos {
	struct podspec_time last;
	uint32_t n_at_last;     /* stored lines with timestamp == last */
	uint32_t seen_at_last;  /* lines with that timestamp this stream */
	bool any;               /* a line was stored */
};

/* A new stream begins (from sinceTime): count its lines afresh. */
void podspec_log_stream_begins(struct podspec_logpos *pos);

/*
 * One line of the stream: splits "TIMESTAMP SP TEXT" (at the first space)
 * into *text / *text_len, and says whether to store it (true, and pos moves
 * on) or drop it as already stored. A line without a timestamp is kept
 * whole and stored (pos unchanged).
 */
bool podspec_log_accept(struct podspec_logpos *pos, const char *line, size_t n,
			const char **text, size_t *text_len);

/* The sinceTime to resume from (second precision), "" if nothing was
 * stored; into buf. */
const char *podspec_log_since(const struct podspec_logpos *pos, char *buf, size_t n);

/* --- Outputs --- */

/* Calls fn(key, value) for each KEY=VALUE line of a termination message
 * (blank lines skipped; a line without '=' or with an empty key counts as
 * bad). Returns the number of bad lines. */
int podspec_outputs(const char *message, void (*fn)(void *data, const char *key,
						     const char *value),
		    void *data);

/* --- The attempt's stored state (the stage's resume data) --- */

/*
 * Every state is recorded before what it names is done (the claim comes
 * before the side effect), so a restart re-does only what is safe:
 *   CLAIMED    names chosen; the Secret and the Pod may or may not exist.
 *              Resume: create both again; 409 AlreadyExists = attach.
 *   CREATED    the Pod was created (201 or 409). Resume: attach; a 404
 *              means it was deleted outside kpl (never created again).
 *   DONE       the result is recorded (state, msg; outputs with it).
 *              Resume: delete the Pod and the Secret, then report it.
 *   CANCELLING cancel (or the timeout) began deleting the Pod. Resume: go
 *              on deleting, then report cancelled.
 */
enum podspec_state {
	PODSPEC_S_NONE,
	PODSPEC_S_CLAIMED,
	PODSPEC_S_CREATED,
	PODSPEC_S_DONE,
	PODSPEC_S_CANCELLING,
	PODSPEC_S_LAST
};

const char *podspec_state_name(enum podspec_state s);

struct podspec_record {
	enum podspec_state state;
	char *cluster, *namespace, *pod, *secret; /* owned */
	struct podspec_logpos log;
	int result;             /* DONE: a Kpl__V1__StageState value */
	char *msg;              /* DONE: the message (owned; may be NULL) */
};

void podspec_record_release(struct podspec_record *r);
/* JSON text of r (malloc'd). */
char *podspec_record_encode(const struct podspec_record *r);
/* Parses what podspec_record_encode wrote; 0 or KPL_EINVAL (r released
 * and zeroed then). */
int podspec_record_decode(const char *text, struct podspec_record *r);

#endif
