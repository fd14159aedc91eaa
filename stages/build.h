/*
 * build.h - the `build` stage kind's drivers. stages/build.c dispatches on
 * `with.driver` to one of these; each is a whole struct stage_kind (its
 * check_with sees the whole `with`, `driver` included).
 */
#ifndef KPL_STAGES_BUILD_H
#define KPL_STAGES_BUILD_H

#include "stages/stage.h"

/* driver: jenkins (stages/build_jenkins.c) */
extern const struct stage_kind build_jenkins_driver;
/* driver: local (stages/build_local.c, buildah) */
extern const struct stage_kind build_local_driver;
/* The local driver's needs in a pod (pl_kind's check_pod; also refuses
 * its pod-only keys on kpld's host). */
int build_local_check_pod(const struct pl_node *with, const struct pl_node *runs_on,
			  const struct pl_node *defaults, const struct pl_node *at,
			  const char *file, const char *path, struct kpl_err *err);

#endif
