/*
 * kube.h - kpl's Kubernetes API client: configuration (kubeconfig and
 * in-cluster), requests, Status errors, watches and kubectl's rollout rules.
 *
 * Two layers (style.md practice 2):
 *   - protocol logic without I/O: kube_config_parse, kube_status_parse,
 *     kube_rollout_status, kube_watch_event_parse, the URL and patch
 *     builders. They take text or JSON and return decisions; the unit tests
 *     (tests/unit/kube_test.c) feed them fixture replies;
 *   - thin glue over base/http.h: kube_request (one JSON request) and
 *     struct kube_watch (list + streamed watch that survives stream ends and
 *     410 Gone).
 *
 * JSON is jansson's json_t throughout. Secrets: a kube_config holds the
 * bearer token, key and password in memory; nothing here logs them, and
 * kube_redact removes them from any text a caller builds for a person.
 *
 * Threads: the pure functions any thread; kube_request and kube_watch_* the
 * loop thread of the http_client only.
 */
#ifndef KPL_KUBE_H
#define KPL_KUBE_H

#include <jansson.h>
#include <stddef.h>

#include "engine/config.h"
#include "base/kpl.h"
#include "pipelines/pipeline.h"
#include "base/http.h"

/* --- Configuration --- */

/*
 * How to reach one API server, as kubectl would from the same kubeconfig.
 * Every string is owned (NULL when absent). PEM data is decoded (the
 * kubeconfig's *-data fields are base64); file paths are absolute (a relative
 * one in a kubeconfig is relative to the kubeconfig's directory, as
 * client-go resolves it).
 */
struct kube_config {
	char *context;   /* the context used (NULL in-cluster) */
	char *server;    /* "https://host:port", no trailing '/' */
	char *namespace; /* the context's namespace (in-cluster: the pod's) */
	char *ca_file, *ca_data;                   /* certificate-authority(-data) */
	char *client_cert, *client_key;            /* client-certificate / -key */
	char *client_cert_data, *client_key_data;  /* ... -data, decoded PEM */
	char *token;      /* user token */
	char *token_file; /* tokenFile / the service account token: read per
			     request, at most once a minute (projected tokens
			     rotate; client-go does the same) */
	char *username, *password; /* basic auth */
	int insecure;     /* insecure-skip-tls-verify */
	char *tls_server_name; /* kept for messages; NEEDSWORK: not sent (the
				  http layer has no SNI override) */
	/* token_file cache */
	char *file_token;
	int64_t file_token_ms;
};

void kube_config_init(struct kube_config *c);
/* Frees the strings (secrets zeroed first) and initialises c again. */
void kube_config_release(struct kube_config *c);

/*
 * Parses kubeconfig text (YAML or JSON) of len bytes; path names the file in
 * messages and is the base of relative paths. context picks a context by
 * name; NULL or "" uses current-context. Supports clusters[].cluster.{server,
 * certificate-authority(-data), insecure-skip-tls-verify, tls-server-name}
 * and users[].user.{client-certificate(-data), client-key(-data), token,
 * tokenFile, username, password}; exec and auth-provider users are refused
 * (KPL_EINVAL naming them). Files named by tokenFile are not read here.
 * Returns 0 with *out filled (release it), or KPL_EINVAL with err saying
 * what is wrong and where ("kubeconfig /k: contexts: no context named
 * \"x\" (declared: a, b)"). No I/O.
 */
int kube_config_parse(const char *text, size_t len, const char *path,
		      const char *context, struct kube_config *out,
		      struct kpl_err *err);

/* Reads path (synchronously: a small local file) and parses it. */
int kube_config_load(const char *path, const char *context, struct kube_config *out,
		     struct kpl_err *err);

/*
 * In-cluster config as client-go's InClusterConfig: server from
 * KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT (both required: else
 * KPL_EINVAL "not running in a cluster ..."), the token file and CA of the
 * service account in dir (NULL: /var/run/secrets/kubernetes.io/
 * serviceaccount), namespace from $POD_NAMESPACE or dir/namespace. host and
 * port NULL read the environment (tests pass them).
 */
int kube_config_in_cluster(const char *host, const char *port, const char *dir,
			   struct kube_config *out, struct kpl_err *err);

/* The config of a `kubernetes:` endpoint of the daemon config: in_cluster,
 * or kubeconfig + context. A token in the endpoint (resolved secret)
 * overrides the kubeconfig's. */
int kube_config_from_endpoint(const struct cfg_endpoint *ep, const char *token,
			      struct kube_config *out, struct kpl_err *err);

/* A malloc'd copy of text with every credential of c (token, password,
 * token file contents) replaced by "***". */
char *kube_redact(const struct kube_config *c, const char *text);

/* --- Status errors --- */

/*
 * An API error as a person reads it: the Status object's reason and message,
 * verbatim. For a reply that is not a Status (a proxy's HTML, say) reason is
 * "" and message the start of the body; for a transport error code is 0 and
 * message the http layer's (method and URL, no secret).
 */
struct kube_status {
	long code;          /* HTTP status (Status.code when present) */
	char reason[64];    /* "NotFound", "Conflict", "Expired", ... */
	char message[512];
	/* The API server that answered (its URL), so a message names the
	 * system and endpoint; empty when not known (a bare parse). */
	char server[160];
};

/* Fills st from an HTTP status and body (pure). */
void kube_status_parse(long http_status, const char *body, size_t len,
		       struct kube_status *st);
/* "REASON: MESSAGE", "MESSAGE" without a reason, into buf; with a server,
 * "kubernetes SERVER: CODE REASON: MESSAGE". */
const char *kube_status_text(const struct kube_status *st, char *buf, size_t n);
/* 410 Gone / reason Expired or Gone: the resourceVersion is too old. */
int kube_status_is_gone(const struct kube_status *st);

/* --- URLs and patches --- */

enum kube_patch {
	KUBE_PATCH_JSON,      /* application/json-patch+json (RFC 6902) */
	KUBE_PATCH_MERGE,     /* application/merge-patch+json (RFC 7386) */
	KUBE_PATCH_STRATEGIC, /* application/strategic-merge-patch+json */
	KUBE_PATCH_APPLY,     /* application/apply-patch+yaml (needs fieldManager) */
};
const char *kube_patch_content_type(enum kube_patch p);

/* "/apis/apps/v1/namespaces/NS/deployments[/NAME]" (name NULL: the
 * collection), path segments escaped. malloc'd. */
char *kube_deployment_path(const char *ns, const char *name);
char *kube_replicasets_path(const char *ns);
/* A query value escaped for a URL (malloc'd). */
char *kube_escape(const char *s);
/* "k1=v1,k2=v2" from a Deployment's spec.selector.matchLabels (malloc'd),
 * NULL if there are none. */
char *kube_label_selector(const json_t *deployment);

/* --- The Deployment rollout, exactly as kubectl rollout status --- */

enum kube_rollout {
	KUBE_ROLLOUT_WAITING, /* msg: kubectl's "Waiting for ..." line */
	KUBE_ROLLOUT_DONE,    /* msg: "deployment \"x\" successfully rolled out" */
	KUBE_ROLLOUT_FAILED,  /* msg: "deployment \"x\" exceeded its progress deadline" */
};

/*
 * kubectl's DeploymentStatusViewer.Status on a Deployment object (pure):
 * observedGeneration first, then the Progressing condition's
 * ProgressDeadlineExceeded, then updated vs spec.replicas, old replicas
 * pending termination, available vs updated. msg gets kubectl's text without
 * its trailing newline.
 */
enum kube_rollout kube_rollout_status(const json_t *deployment, char *msg, size_t n);

/* The revision annotation (deployment.kubernetes.io/revision) of a
 * Deployment or ReplicaSet, or "" (borrowed from obj). */
const char *kube_revision(const json_t *obj);
/* The image of the container named container in a pod template, or NULL
 * (borrowed). */
const char *kube_template_image(const json_t *template, const char *container);

/*
 * Among the items of a ReplicaSet list, the one a Deployment controls whose
 * pod template equals the Deployment's (ignoring the pod-template-hash
 * label): the Deployment's current ReplicaSet. NULL if none (borrowed from
 * list).
 */
const json_t *kube_current_replicaset(const json_t *deployment, const json_t *list);

/* A document tree (pipelines/pipeline.h) as JSON: quoted scalars are
 * strings; plain ones null/bool/integer/number when they read as such. New
 * reference. */
json_t *kube_json_from_node(const struct pl_node *n);

/* --- Requests --- */

/*
 * The end of a request. status 0: a reply came; if it was 2xx, obj is the
 * parsed body (borrowed for the call; NULL for an empty body) and st NULL;
 * else obj is NULL and st the Status. status < 0: transport error (KPL_E*),
 * st->message says what. Runs on the loop, never inside kube_request.
 */
typedef void (*kube_done_cb)(int status, json_t *obj, const struct kube_status *st,
			     void *data);

/*
 * Sends METHOD server+path (path includes any query) with an optional JSON
 * body of content_type (NULL: application/json). Auth and TLS from cfg; the
 * http layer's retries for idempotent requests. *out (may be NULL) can
 * cancel it until done runs. Returns 0 or KPL_EINVAL (err says why; done
 * never runs then).
 */
int kube_request(struct http_client *h, struct kube_config *cfg, const char *method,
		 const char *path, const char *content_type, const char *body,
		 kube_done_cb done, void *data, struct http_request **out,
		 struct kpl_err *err);

/*
 * GET server+path as a stream of text lines (a pod's log with follow=true):
 * on_line for each line of a 2xx body, then on_done with the raw response
 * (a non-2xx body there, for kube_status_parse). Lines up to
 * KUBE_STREAM_MAX_LINE (a stage's whole log cap: a container's line has no
 * bound of its own, and one the stream refused would stop it at the same
 * place every time it resumes). No deadline; no retry once a line was
 * delivered (the caller resumes: sinceTime). Returns 0 or KPL_EINVAL (err
 * says why; on_done never runs then).
 */
#define KUBE_STREAM_MAX_LINE (16u * 1024 * 1024)
int kube_stream_lines(struct http_client *h, struct kube_config *cfg, const char *path,
		      http_line_cb on_line, http_done_cb on_done, void *data,
		      struct http_request **out, struct kpl_err *err);

/* --- Watches --- */

/* One line of a watch stream (pure). Returns 0 with *type ("ADDED",
 * "MODIFIED", "DELETED", "BOOKMARK", "ERROR") and *object borrowed from
 * *root (a new reference the caller json_decrefs), or KPL_EINVAL. */
int kube_watch_event_parse(const char *line, size_t n, json_t **root,
			   const char **type, json_t **object);

/*
 * A watch on a collection, narrowed by a field selector (e.g.
 * "metadata.name=web"), that a caller follows for as long as it likes:
 *   1. LIST the collection: each item is delivered as type "SYNC" (state
 *      to re-evaluate), and the list's resourceVersion is kept;
 *   2. WATCH from there as one long streamed request (never polling),
 *      with allowWatchBookmarks; each event's object's resourceVersion
 *      (BOOKMARKs included, which are not delivered) is kept;
 *   3. when the stream ends (the server's timeout) or breaks, watch again
 *      from the last resourceVersion (after a short backoff on errors);
 *   4. on 410 Gone/Expired (an HTTP reply, or an ERROR event in the
 *      stream), go back to 1: a fresh list.
 * on_event returns 0 to go on or non-zero to stop the watch (no callback
 * after that). on_error reports a failure that ends the watch (a non-410
 * API error, an ERROR event that is not 410, or KUBE_WATCH_MAX_FAILURES
 * transport errors in a row); no callback after it either. Whatever
 * happened, the caller releases the watch with exactly one kube_watch_stop
 * (also allowed from inside its callbacks); memory is freed later, on the
 * loop, once its request has finished. loop is the http client's loop.
 */
#define KUBE_WATCH_MAX_FAILURES 5
struct kube_watch;
typedef int (*kube_watch_event_cb)(struct kube_watch *w, const char *type,
				   json_t *object, void *data);
typedef void (*kube_watch_error_cb)(struct kube_watch *w, int status,
				    const struct kube_status *st, void *data);

int kube_watch_start(uv_loop_t *loop, struct http_client *h, struct kube_config *cfg,
		     const char *collection_path, const char *field_selector,
		     kube_watch_event_cb on_event, kube_watch_error_cb on_error,
		     void *data, struct kube_watch **out, struct kpl_err *err);
/* Stops and releases a watch: no callback after this returns. */
void kube_watch_stop(struct kube_watch *w);
/* How many times it listed (1 + the 410 relists), for tests and logs. */
unsigned kube_watch_lists(const struct kube_watch *w);

/* Pure helpers for the watch (exposed for tests). */
char *kube_watch_url_query(const char *field_selector, const char *rv, int watch);

#endif
