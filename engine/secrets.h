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

#include <stddef.h>

#include "engine/kpl.h"
#include "store/store.h"

#define SECRETS_MAX_VALUE (64 * 1024)
#define SECRETS_MAX_COUNT 1024
/* Values shorter than this are not redacted: "1" or "ok" would blank out
 * every log line. A secret that short is refused by secrets_set instead. */
#define SECRETS_MIN_VALUE 4

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
 * Seals value (len bytes) under name and stages it in the store; the caller
 * commits. KPL_EINVAL for a bad name or a value under SECRETS_MIN_VALUE or
 * over SECRETS_MAX_VALUE bytes.
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
 */
char *secrets_redact(struct secrets *sec, const char *text, size_t len, size_t *out_len);

#endif
