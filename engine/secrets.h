/*
 * secrets.h - named secrets, sealed in the store with AES-256-GCM (OpenSSL)
 * under a key file kpld creates with mode 0600 (DATA_DIR/secret.key), and
 * the redaction that keeps every value out of logs, events and messages.
 *
 * Pipelines and the config refer to a secret as ${{ secrets.NAME }}. Values
 * are kept in memory (kpld needs them to redact), never logged, never sent
 * back by any RPC. The name is bound to its ciphertext (GCM associated
 * data), so a sealed value cannot be moved under another name.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_SECRETS_H
#define KPL_SECRETS_H

#include <stdbool.h>
#include <stddef.h>

#include "base/kpl.h"
#include "store/store.h"

#define SECRETS_MAX_VALUE (64 * 1024)
#define SECRETS_MAX_COUNT 1024
/* Values shorter than this are not redacted: "1" or "ok" would blank out
 * every log line. A secret that short is refused by secrets_set instead;
 * a line of a multi-line value that short (after trimming blanks) is not
 * redacted on its own. */
#define SECRETS_MIN_VALUE 4
/* The longest line of a value. A log line longer than KPL_MAX_LOG_LINE
 * reaches kpld in pieces; redaction finds a secret cut between two pieces
 * (the end of one is masked if it starts a secret, the start of the next
 * if it ends one), which needs every secret line to fit in one piece with
 * room for a character the cut moved: 8000 < 8192 - 3. */
#define SECRETS_MAX_LINE 8000

/* Where a text was cut from a longer line (secrets_redact_cut). */
#define SECRETS_CUT_START 1u /* the text continues an earlier piece */
#define SECRETS_CUT_END 2u   /* the text continues in a later piece */

struct secrets; /* opaque */

/*
 * Loads (or creates) the key file in data_dir and opens every stored
 * secret. A key file readable by others, of the wrong size, or one that
 * does not open the stored secrets is an error naming the file.
 */
int secrets_open(struct store *s, const char *data_dir, struct secrets **out,
		 struct kpl_err *err);
void secrets_free(struct secrets *sec);

/* Names must be [A-Za-z0-9_]{1,64}; returns 0 or KPL_EINVAL with err. */
int secrets_check_name(const char *name, struct kpl_err *err);

/*
 * Changes go in two steps, so that nothing reads a change before it is
 * durable: secrets_stage_set / secrets_stage_delete check it, seal it and
 * stage it in the store, and hand back the change (*out, the caller's); the
 * caller commits, and from the commit callback calls secrets_change_end
 * with the commit's status, which makes the change visible (secrets_get,
 * secrets_names, redaction, secrets_allowed) if status is 0 and frees it.
 *
 * pipelines (n_pipelines names; none: every pipeline) limits which
 * pipelines' runs may use the secret (secrets_allowed): pipeline names as
 * pipelines/ allows them, at most SECRETS_MAX_PIPELINES, duplicates
 * dropped. The list is sealed with the value (bound to it like the name);
 * secrets stored before lists existed are for every pipeline.
 */
#define SECRETS_MAX_PIPELINES 64
struct secrets_change; /* opaque */
int secrets_stage_set(struct secrets *sec, const char *name, const char *value, size_t len,
		      const char *const *pipelines, size_t n_pipelines,
		      struct secrets_change **out, struct kpl_err *err);
/* KPL_ENOTFOUND if there is no such secret (changes not yet ended are not
 * seen). */
int secrets_stage_delete(struct secrets *sec, const char *name, struct secrets_change **out,
			 struct kpl_err *err);
void secrets_change_end(struct secrets *sec, struct secrets_change *ch, int status);

/* True if the secret exists and pipeline may use it. */
bool secrets_allowed(struct secrets *sec, const char *name, const char *pipeline);
/* The pipelines a secret is limited to, '\n' between them, "" for every
 * pipeline; NULL if there is no such secret. Borrowed until it changes. */
const char *secrets_pipelines(struct secrets *sec, const char *name);

/*
 * secrets_stage_set (for every pipeline) and secrets_change_end at once:
 * the change is in memory before it is durable. Only for callers that
 * commit synchronously right after (tests, tools); kpld's API uses the two
 * steps.
 *
 * Seals value (len bytes) under name and stages it in the store; the caller
 * commits. KPL_EINVAL for a bad name, a value under SECRETS_MIN_VALUE or
 * over SECRETS_MAX_VALUE bytes, or one with a line over SECRETS_MAX_LINE.
 */
int secrets_set(struct secrets *sec, const char *name, const char *value, size_t len,
		struct kpl_err *err);
/* Stages the removal; KPL_ENOTFOUND if there is no such secret. */
int secrets_delete(struct secrets *sec, const char *name, struct kpl_err *err);

/* The value, NUL-terminated (borrowed until the secret changes), or NULL. */
const char *secrets_get(struct secrets *sec, const char *name);

/* The names, sorted (borrowed array until the next change). */
size_t secrets_names(struct secrets *sec, const char *const **names);

/*
 * Returns a malloc'd copy of text (len bytes) with every occurrence of
 * every secret value replaced by "***", and its length in *out_len; or NULL
 * when nothing needed replacing (use text as it is).
 *
 * What is masked: each value, and each line of a multi-line value (blanks
 * trimmed, lines under SECRETS_MIN_VALUE bytes skipped), so a PEM key or a
 * kubeconfig printed line by line is masked line by line. Every byte inside
 * any occurrence of any of them is masked, so a secret inside another, or
 * two that overlap, leave nothing of either; each run of masked bytes
 * becomes one "***".
 */
char *secrets_redact(struct secrets *sec, const char *text, size_t len, size_t *out_len);

/*
 * The same for a piece of a longer line (cut: SECRETS_CUT_* bits): with
 * SECRETS_CUT_END, a tail of the text that is the start of a secret (even
 * one byte of it) is masked too; with SECRETS_CUT_START, a head that is the
 * end of one. So a secret the cut split is masked on both sides; a few
 * bytes at the cut that only look like the edge of one are masked with it.
 */
char *secrets_redact_cut(struct secrets *sec, const char *text, size_t len, unsigned cut,
			 size_t *out_len);

#endif
