/*
 * ops.h - the operations a person asks for on runs and releases (cancel,
 * retry, approve or reject a stage, roll back a deployment), done the same
 * way whoever asks: the gRPC methods (api/rpc_pipelines.c) and chat commands
 * (engine/chatops.c) both call these. Each checks its arguments, records an
 * audit entry naming who asked (engine_audit, before the change, so in the
 * run's log it comes before the events the change causes) and makes the
 * engine call. Who may ask is the caller's business (tokens, chat users).
 *
 * Every function returns 0, after which cb(data, status, run_id) runs once
 * on the loop when the change is durable (status 0) or refused by the engine;
 * or a KPL_E* code with err saying why (a person reads it), and cb never
 * runs. who ("token t_0123 (alice)", "slack:U123 (alice)") and the strings
 * are borrowed for the call.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_OPS_H
#define KPL_OPS_H

#include <stdbool.h>

#include "engine/engine.h"
#include "base/kpl.h"

/* Run ids are what engine_new_run_id makes; anything else cannot exist.
 * field names the argument in the message ("id: required"). */
int ops_check_run_id(const char *field, const char *id, struct kpl_err *err);

/* CancelRun. */
int ops_cancel(struct engine *e, const char *who, const char *run_id,
	       engine_submit_cb cb, void *data, struct kpl_err *err);

/* RetryRun: the audit entry goes to the audit log only (a FAILED run has no
 * open event log to take it), naming the run. */
int ops_retry(struct engine *e, const char *who, const char *run_id,
	      engine_submit_cb cb, void *data, struct kpl_err *err);

/* ApproveStage: approve or reject the WAITING stage; comment and by may be
 * NULL (by: the name the stage message records). */
int ops_approve(struct engine *e, const char *who, const char *run_id, const char *stage,
		bool approve, const char *comment, const char *by, engine_submit_cb cb,
		void *data, struct kpl_err *err);

/*
 * RollbackRelease: a run (watched, retried, audited and kept like any other)
 * of a pipeline with one `rollback` stage for deployment
 * "cluster/namespace/name"; to_revision NULL or "" is the previous one.
 * cb's run_id is the new run's.
 */
int ops_rollback(struct engine *e, const char *who, const char *deployment,
		 const char *to_revision, engine_submit_cb cb, void *data,
		 struct kpl_err *err);

/* "cluster/namespace/name" split into its parts (each of [a-zA-Z0-9._-],
 * at most 127 characters). */
int ops_split_target(const char *t, char parts[3][128], struct kpl_err *err);

#endif
