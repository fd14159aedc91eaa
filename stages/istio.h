/*
 * istio.h - what the mesh, canary and rollback kinds know about Istio's
 * traffic objects (external-apis.md section 4): the DestinationRule with
 * subsets by a version label, the VirtualService with a weighted primary
 * route and an optional header route for testers, and the canary
 * Deployment cloned from the stable one.
 *
 * Two layers, as kube.h:
 *   - protocol logic without I/O: builders and editors over jansson
 *     objects, unit-tested in tests/unit/istio_test.c;
 *   - thin glue over kube_request: istio_update (GET, let a pure function
 *     decide, then POST or PUT with the resourceVersion read, again from the
 *     GET on 409 Conflict) and istio_delete (404 counts as done).
 *
 * The shapes kpl writes (and expects to find):
 *
 *   DestinationRule NAME: host SERVICE; subsets
 *     - { name: stable, labels: { LABEL: STABLE_VERSION } }
 *     - { name: canary, labels: { LABEL: CANARY_VERSION } }   (a canary)
 *   VirtualService NAME: hosts, gateways (when bound to one), http:
 *     - { name: canary-header, match: [{ headers: { h: { exact: v } } }],
 *         route: [{ destination: { host, subset: canary } }] }   (optional)
 *     - { name: primary, route: [ { destination: { host, subset: stable },
 *         weight: 100 - W }, { destination: { host, subset: canary },
 *         weight: W } ] }
 * Both carry the labels app.kubernetes.io/managed-by=kpl and
 * kpl.dev/deployment=DEPLOYMENT, by which rollback finds them. The primary
 * route is the one named "primary", else the first route without a match;
 * weights always sum to 100 (the emulator's and older Istio's rule).
 *
 * Threads: the pure functions any thread; istio_update and istio_delete the
 * loop thread of the http_client only.
 */
#ifndef KPL_STAGES_ISTIO_H
#define KPL_STAGES_ISTIO_H

#include <jansson.h>
#include <stdbool.h>

#include "base/kpl.h"
#include "base/http.h"
#include "stages/kube.h"

#define ISTIO_GROUP_PATH "/apis/networking.istio.io/v1"
#define ISTIO_ROUTE_PRIMARY "primary"
#define ISTIO_ROUTE_HEADER "canary-header"
#define ISTIO_SUBSET_STABLE "stable"
#define ISTIO_SUBSET_CANARY "canary"
#define ISTIO_LABEL_DEPLOYMENT "kpl.dev/deployment"
#define ISTIO_INJECT_LABEL "sidecar.istio.io/inject"
#define ISTIO_MAX_CONFLICTS 5

/* "/apis/networking.istio.io/v1/namespaces/NS/RESOURCE[/NAME]" (resource
 * "virtualservices" or "destinationrules"; name NULL: the collection),
 * segments escaped. malloc'd. */
char *istio_path(const char *resource, const char *ns, const char *name);

/* A label value as Kubernetes accepts it: 1-63 of [A-Za-z0-9._-], starting
 * and ending alphanumeric. */
bool istio_label_value_ok(const char *v);

/* --- DestinationRule --- */

/* A new DestinationRule (new reference) with the subset stable only. */
json_t *istio_destination_rule(const char *ns, const char *name, const char *host,
			       const char *deployment, const char *label,
			       const char *stable_version);
/*
 * Sets dr's host and its subsets stable (label=stable_version) and, when
 * canary_version is not NULL, canary (label=canary_version); other subsets
 * are kept, a canary subset is kept when canary_version is NULL. Returns 1
 * if dr changed, 0 if it already said so.
 */
int istio_dr_set(json_t *dr, const char *host, const char *label, const char *stable_version,
		 const char *canary_version);

/* --- VirtualService --- */

/* A new VirtualService (new reference): hosts (n_hosts >= 1), gateways
 * (may be 0: mesh only; with some, "mesh" is added so that calls inside the
 * mesh keep the routes), and a primary route all to host's stable subset
 * (port 0: none). */
json_t *istio_virtual_service(const char *ns, const char *name, const char *const *hosts,
			      size_t n_hosts, const char *const *gateways, size_t n_gateways,
			      const char *host, long port, const char *deployment);
/* Sets hosts and gateways of an existing one, keeping its routes, and adds a
 * primary route if it has none. Returns 1 if vs changed. */
int istio_vs_set_hosts(json_t *vs, const char *const *hosts, size_t n_hosts,
		       const char *const *gateways, size_t n_gateways, const char *host,
		       long port);

struct istio_weights {
	int stable;  /* weight of the stable subset in the primary route */
	int canary;  /* of the canary subset; 0 if it has no such destination */
	bool header; /* a canary-header route exists */
};

/* The primary route's weights (a lone destination without weight counts as
 * 100). KPL_ENOTFOUND with err when there is no primary route or it has no
 * stable destination. */
int istio_vs_weights(const json_t *vs, struct istio_weights *w, struct kpl_err *err);

/*
 * Points canary percent (0-100) of the primary route at the canary subset
 * and the rest at stable (both destinations kept, as "100/0" when canary is
 * 0), on the stable destination's host and port. header (lower-cased) and
 * value not NULL: the canary-header route, first, sends requests with that
 * header value to the canary; NULL removes it. Returns 1 if vs changed, 0
 * if it already was so, or KPL_ENOTFOUND/KPL_EINVAL with err.
 */
int istio_vs_set_weights(json_t *vs, int canary, const char *header, const char *value,
			 struct kpl_err *err);

/* --- The canary Deployment --- */

/*
 * The canary Deployment NAME cloned from the stable one (new reference):
 * its spec with replicas, selector.matchLabels and template labels set to
 * LABEL=version (pod-template-hash dropped), the container's image set
 * (container NULL: the only one), metadata reduced to name, namespace,
 * labels and an annotation kpl.dev/canary-of. NULL with err if the
 * container cannot be found.
 */
json_t *istio_canary_deployment(const json_t *stable, const char *name, const char *label,
				const char *version, const char *container, const char *image,
				long replicas, struct kpl_err *err);

/* The container of a pod template a stage changes: the one named, or the
 * only one; NULL with err naming the containers otherwise (borrowed). */
json_t *istio_find_container(const json_t *tmpl, const char *deployment,
			     const char *container, struct kpl_err *err);

/* --- Glue --- */

/*
 * modify decides from the current object (NULL: it does not exist) what to
 * write: 0 with *out a new reference (POSTed to the collection when cur was
 * NULL, else PUT with cur's resourceVersion) or *out NULL (nothing to do),
 * or a KPL_E* code with err (the update fails with err's message).
 */
typedef int (*istio_modify_cb)(const json_t *cur, json_t **out, void *data,
			       struct kpl_err *err);
/*
 * The end of an update or delete, always exactly once, on the loop, never
 * inside the istio_* call: status 0 (wrote: 1 if something was written or
 * deleted) or a KPL_E* code with msg "put virtualservice shop/web: REASON:
 * MESSAGE" (KPL_ECANCELLED after http_request_cancel of *req).
 */
typedef void (*istio_done_cb)(int status, const char *msg, int wrote, void *data);

/*
 * GET path; modify; POST to collection or PUT path; on 409 (a concurrent
 * writer, or a create that lost a race) back to the GET, at most
 * ISTIO_MAX_CONFLICTS times. what names the object in messages
 * ("virtualservice shop/web"). *req (may be NULL) always holds the request
 * in flight, for http_request_cancel; NULL once done runs. cfg must outlive
 * the update. Returns 0 or KPL_EINVAL (done never runs then).
 */
int istio_update(struct http_client *h, struct kube_config *cfg, const char *what,
		 const char *path, const char *collection, istio_modify_cb modify,
		 istio_done_cb done, void *data, struct http_request **req,
		 struct kpl_err *err);
/* DELETE path; a 404 is done with wrote 0. */
int istio_delete(struct http_client *h, struct kube_config *cfg, const char *what,
		 const char *path, istio_done_cb done, void *data, struct http_request **req,
		 struct kpl_err *err);

#endif
