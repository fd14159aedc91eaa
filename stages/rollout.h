/*
 * rollout.h - what the Kubernetes stage kinds (deploy, rollback; canary in
 * part) share: change a Deployment once, durably recorded first, then follow its
 * rollout with kubectl's rules until it is done, failed or cancelled.
 *
 * One struct rollout per attempt:
 *   1. GET the Deployment and LIST its ReplicaSets (the current one gives the
 *      revision being replaced);
 *   2. ask the kind's plan(): FOLLOW (the change is already in place: a
 *      retried or resumed attempt, so nothing is patched twice), PATCH or
 *      CREATE with a body;
 *   3. before sending: stage_record_release() the intent record (below),
 *      then stage_record_resume() and wait for that commit, so the replaced
 *      revision is durable before the cluster changes;
 *   4. PATCH (or POST). 409 Conflict (the patch carries the resourceVersion
 *      read in 1, so a concurrent writer is noticed): back to 1 against a
 *      fresh read, at most ROLLOUT_MAX_CONFLICTS times; a new intent record
 *      is written only if the template being replaced changed;
 *   5. follow: a kube_watch on the Deployment (list + streamed watch, 410
 *      relists), kube_rollout_status on every version; each new kubectl
 *      "Waiting for ..." line becomes a log line. DONE -> the result record
 *      and the outputs `revision` and `image` -> SUCCEEDED. FAILED (the
 *      progress deadline) -> FAILED with kubectl's message.
 *
 * Release records (store.proto ReleaseRecord, target "cluster/ns/name"), two
 * per change, both of the kind's `kind` ("deploy", "rollback"):
 *   - intent, before the patch: revision "" (not known yet), image = the
 *     wanted image, previous_revision / previous_image / previous_template =
 *     what is replaced (the whole pod template, as the server returned it),
 *     template "";
 *   - result, once the rollout is done: revision = the Deployment's revision
 *     annotation, image, template = the pod template now running, previous_*
 *     copied from the intent. A failed rollout leaves only its intent.
 * So "the newest deploy record" always says what the last deploy replaced,
 * whether or not its rollout succeeded, and a result record (revision != "")
 * names each revision that rolled out.
 *
 * Cancel stops following (and a request in flight) and ends the attempt
 * CANCELLED; a rollout already started goes on in the cluster (as after a
 * Ctrl-C of kubectl rollout status): roll back to undo it.
 *
 * API errors end the attempt FAILED with "WHAT: REASON: MESSAGE" (the Status
 * object's reason and message verbatim), credentials redacted.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_STAGES_ROLLOUT_H
#define KPL_STAGES_ROLLOUT_H

#include <jansson.h>

#include "stages/kube.h"
#include "stages/stage.h"

#define ROLLOUT_MAX_CONFLICTS 5

enum rollout_action {
	ROLLOUT_FOLLOW, /* nothing to send: follow the rollout */
	ROLLOUT_PATCH,  /* PATCH the Deployment with body */
	ROLLOUT_CREATE, /* POST body to the collection (it did not exist) */
};

struct rollout;

struct rollout_plan {
	enum rollout_action action;
	char *body;              /* malloc'd JSON; PATCH/CREATE */
	enum kube_patch patch;   /* PATCH */
	char *image;             /* malloc'd: the image the change runs */
	/* What is replaced (filled by the rollout from the current
	 * Deployment before plan is called; a kind may change them). */
	char *previous_revision, *previous_image, *previous_template;
};

struct rollout_ops {
	const char *kind; /* release record kind: "deploy", "rollback" */
	/*
	 * Decides from the current Deployment (NULL if it does not exist) and
	 * its current ReplicaSet (NULL if none). Returns 0 with plan filled,
	 * or a KPL_E* code with err's message (the attempt fails with it).
	 */
	int (*plan)(struct rollout *r, const json_t *deployment, const json_t *rs,
		    struct rollout_plan *plan, struct kpl_err *err);
	/* Optional, after the change is sent and before following (rollback
	 * resets mesh weights here). Calls rollout_step_done(r, 0 or code,
	 * msg) when finished. */
	void (*after_change)(struct rollout *r);
	/* The container whose image is recorded (NULL: the first). */
	const char *(*container)(struct rollout *r);
	/* Frees the kind's impl when the rollout is freed (may be NULL). */
	void (*free_impl)(void *impl);
};

/*
 * Starts an attempt of st against the `kubernetes:` endpoint named by
 * with.cluster, namespace (NULL: the context's, else "default") and
 * deployment. resumed: after a kpld restart (the same steps; plan then
 * sees its own change and follows). impl is the kind's (rollout_impl).
 * Returns 0 (the stage is the rollout's until it calls stage_done, and
 * impl is freed with it through free_impl), or a KPL_E* code with err
 * (nothing started; impl is still the caller's to free).
 */
int rollout_start(struct stage *st, const struct rollout_ops *ops, const char *ns,
		  const char *deployment, void *impl, int resumed, struct kpl_err *err);
void rollout_cancel(struct stage *st);
void rollout_abandon(struct stage *st);

/* The kind's impl, the stage (NULL once it ended), the target and config. */
void *rollout_impl(struct rollout *r);
struct stage *rollout_stage(struct rollout *r);
const char *rollout_target(struct rollout *r);
const char *rollout_namespace(struct rollout *r);
const char *rollout_deployment(struct rollout *r);
struct kube_config *rollout_config(struct rollout *r);

/* For a plan called without a Deployment: "get deployment NS/NAME:
 * NotFound: <the Status message>" into buf. */
const char *rollout_not_found(struct rollout *r, char *buf, size_t n);

/* after_change's end: status 0 goes on to follow; else FAILED with msg. */
void rollout_step_done(struct rollout *r, int status, const char *msg);

/* A pod template as compact JSON with sorted keys and without the
 * pod-template-hash label (malloc'd): the form records keep and compare. */
char *rollout_template_text(const json_t *tmpl);

/*
 * The change that puts Deployment d's pod template back to tmpl_text (a
 * recorded template, in rollout_template_text's form), as kubectl rollout
 * undo sends it: a JSON patch (KUBE_PATCH_JSON) replacing /spec/template,
 * and /metadata/resourceVersion with d's (so a concurrent change gives 409).
 * Returns 0 with *body the patch (malloc'd, the caller's), 1 when d's
 * template already matches (*body NULL: nothing to send), or KPL_ECORRUPT
 * with err when tmpl_text is not JSON (what names the target in it).
 * Used by rollback and by a canary undoing its failed promotion.
 */
int rollout_restore_patch(const json_t *d, const char *tmpl_text, const char *what,
			  char **body, struct kpl_err *err);

#endif
