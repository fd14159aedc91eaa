/*
 * pod.h - a script stage that runs as a Kubernetes Pod (`runs_on`,
 * pipelines/runs_on.h; the objects and decisions are stages/podspec.h).
 *
 * The script kind hands an attempt here when the stage's runs_on (or the
 * pipeline's defaults.runs_on) names a cluster; these are then the kind's
 * start, resume, cancel and abandon, with stage.h's contract.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_STAGES_POD_H
#define KPL_STAGES_POD_H

#include "stages/stage.h"

/* True when the attempt runs as a pod. */
bool pod_wanted(struct stage *st);

int pod_start(struct stage *st, struct kpl_err *err);
int pod_resume(struct stage *st, struct kpl_err *err);
void pod_cancel(struct stage *st);
void pod_abandon(struct stage *st);
/* The run has ended: a stage with runs_on.workspace deletes the run's
 * claim (each such stage asks; a 404 is fine). */
void pod_run_ended(struct stage *st);

#endif
