/*
 * config.h - the daemon's config file (`kpld --config FILE`, YAML): every
 * external system a pipeline may name, declared once with its endpoint and
 * credentials, so a pipeline says `with: { jenkins: ci-main }` and never
 * holds a URL or a password.
 *
 *   jenkins:
 *     ci-main: { url: https://ci.example.com, username: kpl,
 *                token: "${{ secrets.JENKINS_TOKEN }}", ca_file: /etc/ssl/ci.pem }
 *   registries:
 *     local: { url: http://127.0.0.1:5000, username: kpl,
 *              password: "${{ secrets.REGISTRY_PASSWORD }}" }
 *   kubernetes:
 *     prod: { kubeconfig: /etc/kpl/kubeconfig, context: prod }
 *     here: { in_cluster: true }
 *   prometheus:
 *     main: { url: http://127.0.0.1:9090 }
 *   notifiers:
 *     team-chat: { kind: wecom, url: "${{ secrets.CHAT_WEBHOOK }}" }
 *     ops-ding: { kind: dingtalk, url: "${{ secrets.DING_URL }}",
 *                 secret: "${{ secrets.DING_SECRET }}" }
 *
 * A notifier is a chat webhook a pipeline's `notify:` names (engine/notify.h):
 * `kind` (wecom, dingtalk or slack) is required, `secret` is DingTalk's
 * signing secret, `buttons: true` (slack) adds the chatops buttons
 * (engine/chatops.h). Credential fields (password, token, a notifier's url and
 * secret) may be
 * `${{ secrets.NAME }}`: they are resolved when a stage uses the endpoint,
 * from the encrypted secret store (engine/secrets.h). Errors name the file,
 * line, column and key.
 *
 * Threads: any; a loaded config is read-only.
 */
#ifndef KPL_CONFIG_H
#define KPL_CONFIG_H

#include <stdbool.h>

#include "clients/chatbot/notice.h"
#include "base/kpl.h"

#define CFG_KIND_MAP(X)                 \
	X(JENKINS, "jenkins")           \
	X(REGISTRY, "registries")       \
	X(KUBERNETES, "kubernetes")     \
	X(PROMETHEUS, "prometheus")     \
	X(NOTIFIER, "notifiers")

enum cfg_kind {
#define CFG_KIND_ENUM(e, key) CFG_##e,
	CFG_KIND_MAP(CFG_KIND_ENUM)
#undef CFG_KIND_ENUM
	CFG_KIND_LAST_
};

/* The config section's key ("registries") of a kind. */
const char *cfg_kind_key(enum cfg_kind kind);

/* One named endpoint. Strings are NULL when not given. */
struct cfg_endpoint {
	enum cfg_kind kind;
	char *name;
	char *url;
	char *username;
	char *password;    /* may be a ${{ secrets.X }} template */
	char *token;       /* bearer token; may be a template */
	char *ca_file;     /* PEM bundle to trust instead of the system's */
	char *client_cert; /* PEM client certificate (mTLS) */
	char *client_key;
	bool insecure;     /* skip TLS verification (tests only) */
	char *kubeconfig;  /* kubernetes: kubeconfig path ... */
	char *context;     /* ... and context (default: current-context) */
	bool in_cluster;   /* kubernetes: the pod's service account */
	enum chat_kind chat_kind; /* notifiers: the webhook's service */
	char *secret;      /* notifiers: DingTalk signing secret; may be a template */
	bool buttons;      /* notifiers: Slack chatops buttons (docs/chatbot.md) */
	int line, col;     /* where it is declared */
};

struct cfg {
	char *path;
	struct cfg_endpoint *eps;
	size_t n;
};

/* An empty config (no file given). */
struct cfg *cfg_empty(void);

/*
 * Reads and checks the file. On success *out is new (cfg_free it). Unknown
 * sections or keys, wrong types and a URL that is not http(s) are errors
 * naming "FILE:LINE:COL: section.name.key: ...".
 */
int cfg_load(const char *path, struct cfg **out, struct kpl_err *err);

void cfg_free(struct cfg *c);

/* The endpoint kind/name, or NULL (borrowed from c). */
const struct cfg_endpoint *cfg_find(const struct cfg *c, enum cfg_kind kind,
				    const char *name);

/* The names declared for a kind, comma-separated, for messages ("ci-main,
 * ci-backup" or "none"); written into buf. */
const char *cfg_names(const struct cfg *c, enum cfg_kind kind, char *buf, size_t n);

#endif
