/*
 * rpc_tokens.h - API tokens (docs/security.md): the kpl.v1.Security service
 * (CreateToken, ListTokens, RevokeToken, ListAudit) and the authorize hook
 * the gRPC server runs before every call that is not open.
 *
 * A token is "kpl_" and 43 base64url characters (32 random bytes). It is
 * shown once, by CreateToken; the store keeps its SHA-256 (hex) only, as
 * the key of a TokenRecord {id, scope, pipeline, description, created,
 * revoked}. Revoked records stay, so that a server that ever had a token
 * never falls back to the open mode of one that never had any.
 *
 * Open mode: while the tokens db is empty every call is allowed and its
 * who is "local"; kpld then listens on loopback only (engine/kpld.c).
 *
 * Threads: loop thread only, except tokens_bootstrap and tokens_exist
 * (before the loop runs).
 */
#ifndef KPL_RPC_TOKENS_H
#define KPL_RPC_TOKENS_H

#include <stdbool.h>

#include "api/server.h"
#include "engine/engine.h"
#include "store/store.h"

struct tokens; /* opaque */

/* Creates the service over e (borrowed; outlives tokens). */
struct tokens *tokens_new(struct engine *e);

/* The Security method table (valid while t lives). */
const struct api_method *tokens_methods(struct tokens *t, size_t *n);

/* The api_authorize_fn; data is the struct tokens. */
int tokens_authorize(struct api_call *call, const struct api_method *m,
		     enum api_scope scope, const char *authorization,
		     const ProtobufCMessage *req, void *data, char *msg,
		     size_t msg_size);

/* Frees t; every call must have ended. NULL is ok. */
void tokens_free(struct tokens *t);

/*
 * True if the tokens db holds any record (revoked ones count). A read
 * error counts as true, so the caller fails closed. Any thread.
 */
bool tokens_exist(struct store *s);

/*
 * kpld --bootstrap-token-file: if no admin token that is not revoked
 * exists, makes one, writes it (and a newline) to path with mode 0600, and
 * commits it with store_commit_sync (so call it before anything else
 * commits: before engine_start); *made says whether it did. Otherwise path
 * is left alone. Errors name the file.
 */
int tokens_bootstrap(struct store *s, const char *path, bool *made,
		     struct kpl_err *err);

#endif
