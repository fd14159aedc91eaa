/*
 * pod.h - a stage that runs as a Kubernetes Pod (`runs_on`,
 * pipelines/runs_on.h; the objects and decisions are stages/podspec.h).
 *
 * The script kind and the build kind's local driver hand an attempt here
 * when the stage's runs_on (or the pipeline's defaults.runs_on) names a
 * cluster, with a pod_command_fn that says what the pod runs; these are
 * then the kind's start, resume, cancel and abandon, with stage.h's
 * contract.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_STAGES_POD_H
#define KPL_STAGES_POD_H

#include "stages/stage.h"

/* True when the attempt runs as a pod. */
bool pod_wanted(struct stage *st);

/*
 * What the pod runs, as a kind says it: the one thing that differs between
 * kinds (a script's command, a local build's buildah). All malloc'd, freed
 * by pod.c.
 */
struct pod_command {
	char **argv;      /* NULL-terminated, as written (pod.c escapes $( ) */
	char **env;       /* NULL-terminated "NAME=value"; a value the run's
			     redaction would change goes to the Secret */
	char **secret_env; /* NULL-terminated "NAME=value" or NULL: always
			      to the attempt's Secret (a registry password) */
	char *workdir;    /* NULL: /workspace; relative: below it */
};
/* Fills *out for the attempt (on start and on resume alike: the same
 * attempt must give the same pod). 0 or an error. */
typedef int (*pod_command_fn)(struct stage *st, struct pod_command *out, struct kpl_err *err);

/* The script kind's: with.command, or /bin/sh -c with.shell. */
int pod_script_command(struct stage *st, struct pod_command *out, struct kpl_err *err);
/* The stage's environment in a pod (KPL_*, params, env), for a kind's
 * pod_command_fn. NULL-terminated, malloc'd. */
char **pod_stage_env(struct stage *st);

int pod_start(struct stage *st, pod_command_fn cmd, struct kpl_err *err);
int pod_resume(struct stage *st, pod_command_fn cmd, struct kpl_err *err);
void pod_cancel(struct stage *st);
void pod_abandon(struct stage *st);
/* The run has ended: a stage with runs_on.workspace deletes the run's
 * claim (each such stage asks; a 404 is fine). */
void pod_run_ended(struct stage *st);

#endif
