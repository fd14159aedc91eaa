/*
 * rpc_pipelines.h - the kpl.v1.Pipelines service: thin handlers that turn
 * requests into engine calls and store reads into responses.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_RPC_PIPELINES_H
#define KPL_RPC_PIPELINES_H

#include "api/server.h"
#include "engine/engine.h"

struct rpc; /* opaque */

/* Creates the service over e (borrowed; outlives the rpc). */
struct rpc *rpc_new(struct engine *e);

/* The method table to give api_server_start (static storage, valid while
 * rpc lives). */
const struct api_method *rpc_methods(struct rpc *rpc, size_t *n);

/*
 * The git side of RunPipeline (engine/hooks.h; borrowed). NULL until set
 * and once the hooks stop: RunPipeline is then UNAVAILABLE.
 */
struct hooks;
void rpc_set_hooks(struct rpc *rpc, struct hooks *h);

/*
 * Ends every open WatchRun stream with UNAVAILABLE and a message that says
 * which seq to resume from, so clients reconnect without a gap. Called before
 * api_server_shutdown, which would otherwise cut them without a status.
 */
void rpc_close_streams(struct rpc *rpc);

/* Frees the service; every call must have ended. */
void rpc_free(struct rpc *rpc);

#endif
