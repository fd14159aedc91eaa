/*
 * store.h - kpl's durable state in one LMDB environment.
 *
 * Named databases (keys are bytes; "be" = big-endian so keys sort by number):
 *   meta       "schema_version" -> be32
 *   runs       run id -> RunRecord (protobuf, store/store.proto)
 *   stages     run id, 0x00, be32 index -> StageRecord
 *   events     run id, 0x00, be64 seq -> kpl.v1.RunEvent
 *   pipelines  run id -> the pipeline file's text
 *   idem       idempotency key, 0x00, pipeline name -> run id (before
 *              keys were per pipeline: idempotency key -> run id)
 *   active     run id -> "" for every run not yet in a final state
 *   secrets    secret name -> sealed value (AES-256-GCM, engine/secrets.c)
 *   releases   target, 0x00, be64 seq -> ReleaseRecord (deploy history)
 *   gevents    be64 global_seq -> the event's events key (run id, 0x00,
 *              be64 seq): every event of every run in global order
 *   tokens     SHA-256 of an API token (64 lowercase hex) -> TokenRecord
 *   notify     be64 global_seq, be32 notify entry -> NotifyRecord: the
 *              outbox of pipeline notifications (engine/notify.c)
 *   audit      be64 audit seq -> kpl.v1.RunEvent of kind AUDIT
 *   pipelines_registered  name -> kpl.v1.RegisteredPipeline (webhooks)
 *   schedules  registered pipeline name, 0x00, be32 schedule index ->
 *              ScheduleState (engine/sched.c)
 *
 * Writes are staged, then committed in groups: many state changes share one
 * LMDB write transaction, run on libuv's thread pool so the loop never waits
 * for fsync. Nothing staged is visible to any reader until its group's
 * transaction has committed durably, and commit callbacks run only after
 * that: the engine tells clients about a change only from there, so no
 * client ever sees a state that is not durable. (Readers may see a group's
 * writes a moment before its callbacks run: the transaction commits on a
 * pool thread, the callbacks run when the loop gets to them.)
 *
 * Threads: every function is loop-thread only, except where it says so.
 */
#ifndef KPL_STORE_H
#define KPL_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "api/store/store.pb-c.h"
#include "base/kpl.h"

#define STORE_SCHEMA_VERSION 1

/*
 * Run ids are 1..STORE_MAX_RUN_ID_LEN bytes of printable ASCII without
 * spaces (0x21..0x7e). Idempotency keys are 1..STORE_MAX_IDEM_KEY_LEN bytes
 * (no NUL). Reads return KPL_EINVAL for anything else; staging one is a
 * BUG(), so check what comes from outside before staging it.
 */
#define STORE_MAX_RUN_ID_LEN 64
#define STORE_MAX_IDEM_KEY_LEN 256

struct store; /* opaque */

struct store_options {
	/* LMDB map size in bytes (address space, not disk); 0 = 8 GiB. The
	 * store can never hold more: see store_space. */
	size_t map_size;
	/* For tests of crash safety: MDB_NOSYNC when true. Never in kpld. */
	int no_sync;
};

/*
 * Opens (creating dir and the environment if needed) the store in dir.
 * loop is where commit callbacks run (NULL: only store_commit_sync may be
 * used). Records the schema version in a new store; refuses a store whose
 * version is newer (KPL_ESCHEMA, err names both versions). On success *out
 * is the caller's; release it with store_close.
 */
int store_open(uv_loop_t *loop, const char *dir, const struct store_options *opt,
	       struct store **out, struct kpl_err *err);

/*
 * Commits what is staged (synchronously), waits for no commit in flight
 * (the caller must have let the loop finish any store_commit first), and
 * closes the environment. s is freed.
 */
void store_close(struct store *s);

/* The schema version recorded in the store. */
uint32_t store_schema_version(struct store *s);

/* --- Staging writes. Each copies what it is given (serialized at once). ---
 * A later write of the same key in the same or a later group wins. */

void store_stage_run(struct store *s, const Kpl__Store__V1__RunRecord *rec);
void store_stage_stage(struct store *s, const char *run_id,
		       const Kpl__Store__V1__StageRecord *rec);
/* Keyed by ev->run_id and ev->seq. When ev->global_seq > 0 it also stages
 * the gevents entry (a second write, in the same group). */
void store_stage_event(struct store *s, const Kpl__V1__RunEvent *ev);
void store_stage_pipeline(struct store *s, const char *run_id, const char *text,
			  size_t len);
void store_stage_idem(struct store *s, const char *key, const char *run_id);
/* Marks a run active (on) or not (off) in the active index. */
void store_stage_active(struct store *s, const char *run_id, int on);
/*
 * Deletes a run and everything kept for it: its run record, stage records,
 * events and their gevents entries, pipeline text and active entry, and the
 * idem entry of the run record's idempotency_key if that maps to this run
 * (a key another run holds stays). It runs when its group commits, inside
 * that group's transaction, in order with the other staged writes: a write
 * of the run staged before it is deleted too, one staged after it is kept.
 * Missing records are fine. Any size of run (100k events and more) goes in
 * one transaction. For retention: the engine deletes only runs in a final
 * state, never one it still writes.
 */
void store_stage_delete_run(struct store *s, const char *run_id);
/* Number of writes staged since the last store_commit/store_commit_sync
 * (ones that no commit call covers yet). */
size_t store_staged(struct store *s);

/*
 * Makes everything staged so far durable, then calls cb(data, status) on the
 * loop: status 0, or a negative KPL_E* code if the commit failed (nothing of
 * that group was written). Callbacks run in the order store_commit was
 * called. While one commit is in flight, later writes and callbacks gather
 * into the next group (group commit). cb may stage and commit again.
 * Writes staged before a commit started are in it, whoever called
 * store_commit: so a callback registered while a commit was in flight that
 * then failed gets that failure too (its writes may have been in it), even
 * if its own group committed.
 */
typedef void (*store_commit_cb)(void *data, int status);
void store_commit(struct store *s, store_commit_cb cb, void *data);

/* Commits what is staged on the calling thread; for tests and shutdown.
 * Must not be called while a store_commit is in flight (BUG()). Returns 0
 * or a negative KPL_E* code; on failure the staged writes are dropped. */
int store_commit_sync(struct store *s);

/* Number of commits in flight or waiting (0 when the store is idle). */
size_t store_pending_commits(struct store *s);

/*
 * --- Space ---
 * LMDB's map is a hard limit: a transaction that needs a page past it fails
 * whole (MDB_MAP_FULL). So writers ask first. The last `reserve` bytes of
 * the map (an eighth of it, at least 512 KiB, at most 64 MiB) are kept for
 * what must still work in a full store: the state changes that fail a run,
 * retention's deletes, tokens. Ordinary growth (submits, log events) checks
 * store_has_room and is refused past it.
 *
 * used: bytes of pages in use as of the last commit (LMDB's highest page
 * less its free list; deletes free pages for reuse). staged: what staged and
 * in-flight writes add (their bytes and LMDB's per-record overhead; the
 * slack of the pages they land in shows in used once they commit).
 */
struct store_space {
	size_t map_size, used, staged, reserve;
};
void store_space(struct store *s, struct store_space *out);

/* 1 if need more bytes fit before the reserve (used + staged + need <=
 * map_size - reserve), else 0. Once it has said 0, it says 0 until used +
 * staged + need is a reserve (at most a quarter of the limit) below that
 * limit again (deletes free pages):
 * a store at the edge refuses steadily rather than in turns. */
int store_has_room(struct store *s, size_t need);

/* Writes "the store is full: ..." (used, map size, reserve and what to do)
 * into buf; returns snprintf's count. */
int store_full_msg(struct store *s, char *buf, size_t size);

/* store_has_room as an error: 0, or KPL_EFULL with err saying so (gRPC
 * RESOURCE_EXHAUSTED), for writes a client asks for. */
int store_room_err(struct store *s, size_t need, struct kpl_err *err);

/*
 * The bytes ev takes in the store once staged: its key, its packed value
 * and LMDB's per-record overhead, and the same for its gevents entry when
 * it has a global_seq. An event with an empty message still costs its
 * record (~100-200 bytes). Any thread.
 */
size_t store_event_cost(const Kpl__V1__RunEvent *ev);

/* --- Reads: committed data only. Any thread (MDB_NOTLS). --- */

/*
 * Reads a run. *out is new (free with kpl__store__v1__run_record__free_unpacked
 * (*out, NULL)). KPL_ENOTFOUND if there is no such run, KPL_ECORRUPT if the
 * record does not decode.
 */
int store_get_run(struct store *s, const char *run_id,
		  Kpl__Store__V1__RunRecord **out);

/*
 * Reads the stage records of a run in index order. *out is a new array of
 * *n new records (free with store_free_stages); a run without stage records
 * (or no such run) gives *out NULL, *n 0 and returns 0.
 */
int store_get_stages(struct store *s, const char *run_id,
		     Kpl__Store__V1__StageRecord ***out, size_t *n);
void store_free_stages(Kpl__Store__V1__StageRecord **stages, size_t n);

/* Reads a run's pipeline text; *text is malloc'd and NUL-terminated. */
int store_get_pipeline(struct store *s, const char *run_id, char **text,
		       size_t *len);

/* Looks up an idempotency key; *run_id is malloc'd. KPL_ENOTFOUND if none.
 * Entries of keys staged with store_stage_idem only (from before keys were
 * per pipeline, and kpld's own). */
int store_find_idem(struct store *s, const char *key, char **run_id);

/*
 * Idempotency keys per pipeline (docs/security.md): the entry of key under
 * pipeline (a pipeline name, 1..KPL_MAX_NAME_LEN bytes) is another than the
 * same key under another pipeline, and another than store_stage_idem's
 * (the db key is key, 0x00, pipeline; keys hold no NUL). The schema stays
 * 1: entries from before stay where they are and store_find_idem still
 * reads them. store_stage_delete_run deletes both kinds of entry of its
 * run. store_find_idem_any finds key under any pipeline (the first in name
 * order), for keys only kpld makes (webhook deliveries). Reads: *run_id
 * malloc'd; KPL_ENOTFOUND if none, KPL_EINVAL for an empty or over-long
 * key or name.
 */
void store_stage_idem_scoped(struct store *s, const char *pipeline, const char *key,
			     const char *run_id);
int store_find_idem_scoped(struct store *s, const char *pipeline, const char *key,
			   char **run_id);
int store_find_idem_any(struct store *s, const char *key, char **run_id);

/*
 * Calls fn for each event of run_id with seq >= from_seq, in order, at most
 * max of them (0 = no limit). ev is borrowed for the call only. fn returns 0
 * to go on, non-zero to stop (that value is then returned). Returns 0 when
 * done, or a negative KPL_E* code.
 */
typedef int (*store_event_fn)(void *data, const Kpl__V1__RunEvent *ev);
int store_read_events(struct store *s, const char *run_id, uint64_t from_seq,
		      size_t max, store_event_fn fn, void *data);

/*
 * The highest seq of run_id's events, 0 if it has none (or run_id is not
 * valid, or the read fails: that is logged). One cursor seek, any number of
 * events.
 */
uint64_t store_last_event_seq(struct store *s, const char *run_id);

/* Events decoded by the reads above so far (store_read_events,
 * store_read_global): a running count, so a caller can tell what one call
 * cost. Any thread. */
uint64_t store_events_decoded(struct store *s);

/* The highest global_seq in the gevents index, 0 if none (or the read
 * fails: that is logged). Deleting the runs of the newest events lowers
 * it: keep the engine's next global seq in a record of its own, not here. */
uint64_t store_last_global_seq(struct store *s);

/*
 * Calls fn for each event of every run with global_seq >= from_gseq, in
 * global_seq order, at most max of them (0 = no limit), all from one read
 * transaction. Index entries whose event is gone (a deleted run) or now
 * carries another global_seq are skipped and do not count towards max.
 * ev is borrowed for the call only. fn returns 0 to go on, non-zero to stop
 * (that value is then returned). Returns 0 when done, or a negative KPL_E*
 * code (KPL_ECORRUPT for an index entry or event that does not decode).
 */
int store_read_global(struct store *s, uint64_t from_gseq, size_t max,
		      store_event_fn fn, void *data);

/*
 * Calls fn for runs newest first (run ids sort by creation time), starting
 * after the run id `after` (exclusive; NULL or "" = the newest). rec is
 * borrowed for the call only. fn returns 0 to go on, non-zero to stop.
 */
typedef int (*store_run_fn)(void *data, const Kpl__Store__V1__RunRecord *rec);
int store_list_runs(struct store *s, const char *after, store_run_fn fn,
		    void *data);

/* Calls fn for every run oldest first (the retention sweep). rec is
 * borrowed for the call only. fn returns 0 to go on, non-zero to stop (that
 * value is then returned). Returns 0 when done, or a negative KPL_E* code. */
int store_list_runs_oldest(struct store *s, store_run_fn fn, void *data);

/* Calls fn for every run in the active index (oldest first). An active
 * entry whose run record is missing is logged and skipped. */
int store_list_active(struct store *s, store_run_fn fn, void *data);

/*
 * secrets db: name (1..64 bytes) -> a sealed blob (engine/secrets.c seals
 * and opens it; the store never sees a value). blob NULL stages a delete.
 */
void store_stage_secret(struct store *s, const char *name, const void *blob, size_t len);
/* Calls fn for every secret in name order; blob is borrowed for the call. */
typedef int (*store_secret_fn)(void *data, const char *name, const void *blob,
			       size_t len);
int store_list_secrets(struct store *s, store_secret_fn fn, void *data);

/* LMDB keys are at most 511 bytes: a release's is its target, 0x00, be64.
 * Kubernetes names (namespace 63, deployment 253) and a config name fit. */
#define STORE_MAX_RELEASE_TARGET 500

/*
 * releases db: target ("cluster/namespace/deployment", at most
 * STORE_MAX_RELEASE_TARGET bytes; a longer one is a BUG(): check first),
 * 0x00, be64 seq -> ReleaseRecord. store_list_releases returns the target's
 * records newest first (*out new; store_free_releases it).
 */
void store_stage_release(struct store *s, const Kpl__Store__V1__ReleaseRecord *rec);
int store_list_releases(struct store *s, const char *target,
			Kpl__Store__V1__ReleaseRecord ***out, size_t *n);
void store_free_releases(Kpl__Store__V1__ReleaseRecord **r, size_t n);

/*
 * tokens db: the SHA-256 of an API token in lowercase hex (64 bytes) ->
 * TokenRecord (api/rpc_tokens.c makes and checks tokens; the store never
 * sees one). rec NULL stages a delete; a key that is not 64 lowercase hex
 * digits is a BUG(). store_get_token: *out new (free with
 * kpl__store__v1__token_record__free_unpacked), KPL_ENOTFOUND if none,
 * KPL_EINVAL for a malformed key. store_list_tokens calls fn in key order;
 * hash and rec are borrowed for the call; non-zero from fn stops the walk
 * and is returned.
 */
void store_stage_token(struct store *s, const char *hash_hex,
		       const Kpl__Store__V1__TokenRecord *rec);
int store_get_token(struct store *s, const char *hash_hex,
		    Kpl__Store__V1__TokenRecord **out);
typedef int (*store_token_fn)(void *data, const char *hash_hex,
			      const Kpl__Store__V1__TokenRecord *rec);
int store_list_tokens(struct store *s, store_token_fn fn, void *data);

/*
 * notify db: the outbox of pipeline notifications (engine/notify.c). The key
 * is the global seq of the event that made the notification and the index
 * of the pipeline's notify entry. engine/notify.c stages a record in the
 * same group as its event, so a notification exists exactly when its event
 * is durable, and deletes it once sent or given up. rec NULL stages a
 * delete. store_list_notify calls fn in key order (oldest event first); rec
 * is borrowed for the call; non-zero from fn stops the walk and is returned.
 */
void store_stage_notify(struct store *s, uint64_t gseq, uint32_t index,
			const Kpl__Store__V1__NotifyRecord *rec);
typedef int (*store_notify_fn)(void *data, uint64_t gseq, uint32_t index,
			       const Kpl__Store__V1__NotifyRecord *rec);
int store_list_notify(struct store *s, store_notify_fn fn, void *data);

/*
 * audit db: who did what (approvals, cancels, token and secret changes), in
 * order. store_stage_audit stages ev (copied) under the next audit seq (1,
 * 2, 3, ...; kept in memory once read, so several entries may share one
 * group) and returns that seq. store_read_audit calls fn for entries with
 * seq >= from_seq, at most max of them (0 = no limit); ev is borrowed for
 * the call; non-zero from fn stops and is returned. Returns 0 when done, or
 * a negative KPL_E* code.
 */
uint64_t store_stage_audit(struct store *s, const Kpl__V1__RunEvent *ev);
typedef int (*store_audit_fn)(void *data, uint64_t seq, const Kpl__V1__RunEvent *ev);
int store_read_audit(struct store *s, uint64_t from_seq, size_t max,
		     store_audit_fn fn, void *data);

/*
 * pipelines_registered db: name (1..128 bytes) -> kpl.v1.RegisteredPipeline
 * (engine/hooks.c: pushes that start runs). rec NULL stages a delete; a bad
 * name is a BUG(). store_get_registered: *out new (free with
 * kpl__v1__registered_pipeline__free_unpacked), KPL_ENOTFOUND if none,
 * KPL_EINVAL for a bad name. store_list_registered calls fn in name order;
 * rec is borrowed for the call; non-zero from fn stops the walk and is
 * returned.
 */
void store_stage_registered(struct store *s, const char *name,
			    const Kpl__V1__RegisteredPipeline *rec);
int store_get_registered(struct store *s, const char *name,
			 Kpl__V1__RegisteredPipeline **out);
typedef int (*store_registered_fn)(void *data, const Kpl__V1__RegisteredPipeline *rec);
int store_list_registered(struct store *s, store_registered_fn fn, void *data);

/*
 * forge_status db: run id -> ForgeStatusRecord, the commit statuses still
 * owed to a forge for a run a pull request started (engine/forge.c). rec
 * NULL stages a delete; a run id that is empty or over STORE_MAX_RUN_ID_LEN
 * is a BUG(). store_list_forge calls fn in run id order; rec is borrowed for
 * the call; non-zero from fn stops the walk and is returned.
 */
void store_stage_forge(struct store *s, const char *run_id,
		       const Kpl__Store__V1__ForgeStatusRecord *rec);
/* *out new (kpl__store__v1__forge_status_record__free_unpacked), or
 * KPL_ENOTFOUND, KPL_ECORRUPT, KPL_EINVAL for a bad run id. */
int store_get_forge(struct store *s, const char *run_id,
		    Kpl__Store__V1__ForgeStatusRecord **out);
typedef int (*store_forge_fn)(void *data, const char *run_id,
			      const Kpl__Store__V1__ForgeStatusRecord *rec);
int store_list_forge(struct store *s, store_forge_fn fn, void *data);

/*
 * schedules db: the state of schedule index of registered pipeline name
 * (engine/sched.c). st NULL stages a delete; a bad name is a BUG().
 * store_get_schedule: *out new (free with
 * kpl__store__v1__schedule_state__free_unpacked), KPL_ENOTFOUND if none.
 */
void store_stage_schedule(struct store *s, const char *name, uint32_t index,
			  const Kpl__Store__V1__ScheduleState *st);
int store_get_schedule(struct store *s, const char *name, uint32_t index,
		       Kpl__Store__V1__ScheduleState **out);

#endif
