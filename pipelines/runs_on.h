/*
 * runs_on.h - where a stage's command runs: `runs_on` on a stage, and
 * `defaults.runs_on` for the whole pipeline (docs/stages.md, "runs_on").
 *
 *   runs_on:
 *     cluster: prod-eu          # a `kubernetes:` endpoint of the daemon config
 *     namespace: ci             # default: the endpoint's context's, else "default"
 *     image: golang:1.22
 *     resources: { requests: { cpu: 500m, memory: 512Mi }, limits: { memory: 1Gi } }
 *     service_account: builder  # optional; without it no API token is mounted
 *     node_selector: { kubernetes.io/arch: amd64 }
 *     tolerations: [ { key: ci, operator: Equal, value: "true", effect: NoSchedule } ]
 *     image_pull_timeout: 1m    # how long an image may fail to pull (default 1m)
 *     schedule_timeout: 5m      # how long the pod may stay unschedulable (default 5m)
 *     workspace: 1Gi            # /workspace is the run's PersistentVolumeClaim of this
 *                               # size, shared by its pod stages (default: an empty dir)
 *   runs_on: local              # kpld's host, even with defaults.runs_on
 *
 * A stage's keys win over the defaults' one by one (a stage may name only its
 * image). Checks here are about the shape; whether the cluster exists is the
 * daemon's to say when the stage starts.
 *
 * Pure; any thread.
 */
#ifndef KPL_RUNS_ON_H
#define KPL_RUNS_ON_H

#include "pipelines/pipeline.h"

/* Every key runs_on may hold, NULL-terminated (docs_test reads it). */
extern const char *const pl_runs_on_keys[];

/*
 * Checks one runs_on value (a stage's or the defaults'), n non-NULL, at
 * path ("stages[2].runs_on"). Returns 0 or KPL_EINVAL with err
 * "file:line:col: path.key: message" for the first problem.
 */
int pl_runs_on_check(const struct pl_node *n, const char *file, const char *path,
		     struct kpl_err *err);

/* True when the value says "run on kpld's host" (the scalar `local`). */
bool pl_runs_on_is_local(const struct pl_node *n);

/*
 * The value of key for a stage: the stage's runs_on first, then the
 * defaults' (either may be NULL); NULL if neither has it (borrowed).
 */
const struct pl_node *pl_runs_on_get(const struct pl_node *stage_runs_on,
				     const struct pl_node *defaults, const char *key);

/* True when the stage runs as a pod: a mapping here or in the defaults,
 * and not `local`. */
bool pl_runs_on_pod(const struct pl_node *stage_runs_on, const struct pl_node *defaults);

#endif
