/* kinds.h - the stage kinds kpl ships, for the registry (stages/kinds.c). */
#ifndef KPL_STAGES_KINDS_H
#define KPL_STAGES_KINDS_H

#include "stages/stage.h"

extern const struct stage_kind script_kind;
extern const struct stage_kind noop_kind;
extern const struct stage_kind approval_kind;
extern const struct stage_kind verify_kind;
extern const struct stage_kind deploy_kind;
extern const struct stage_kind rollback_kind;
extern const struct stage_kind build_kind;
extern const struct stage_kind push_kind;
extern const struct stage_kind checkout_kind;
extern const struct stage_kind mesh_kind;
extern const struct stage_kind canary_kind;

#endif
