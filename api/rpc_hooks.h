/*
 * rpc_hooks.h - RegisterPipeline, ListPipelines and DeletePipeline of
 * kpl.v1.Pipelines: the pipelines whose pushes start runs (engine/hooks.h).
 * Changing them needs an admin token, listing a read token.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_RPC_HOOKS_H
#define KPL_RPC_HOOKS_H

#include "api/server.h"
#include "engine/engine.h"

struct rpc_hooks; /* opaque */

/* Creates the handlers over e (borrowed; outlives them). */
struct rpc_hooks *rpc_hooks_new(struct engine *e);

/* Their method table (valid while rh lives), to add to api_server_start's. */
const struct api_method *rpc_hooks_methods(struct rpc_hooks *rh, size_t *n);

/* fn(data) runs on the loop after each registration change is stored
 * (the schedules look again at once). fn NULL: none. */
void rpc_hooks_on_change(struct rpc_hooks *rh, void (*fn)(void *data), void *data);

/* Frees them; every call must have ended. */
void rpc_hooks_free(struct rpc_hooks *rh);

#endif
