/* ops.c - cancel, retry, approve and roll back, for every front end (ops.h). */
#include "engine/ops.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/config.h"

#define LOG "ops"

int ops_check_run_id(const char *field, const char *id, struct kpl_err *err)
{
	size_t n = id ? strlen(id) : 0;

	if (n == 0)
		return kpl_errf(err, KPL_EINVAL, "%s: required", field);
	if (n > 64)
		return kpl_errf(err, KPL_EINVAL, "%s: longer than 64 characters", field);
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)id[i]) && id[i] != '-' && id[i] != '_')
			return kpl_errf(err, KPL_EINVAL,
					"%s: only letters, digits, '-' and '_' are allowed", field);
	return 0;
}

/*
 * The audit entry "WHO WHAT". A run that is not active (or a stage not
 * waiting) records nothing: the engine refuses the change then too, and
 * says so to the caller.
 */
static void audit(struct engine *e, const char *who, const char *run_id, const char *stage,
		  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void audit(struct engine *e, const char *who, const char *run_id, const char *stage,
		  const char *fmt, ...)
{
	char what[400], msg[800];
	struct kpl_err err = { 0 };
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	snprintf(msg, sizeof msg, "%s %s", who, what);
	engine_audit(e, run_id, stage, msg, &err);
}

int ops_cancel(struct engine *e, const char *who, const char *run_id,
	       engine_submit_cb cb, void *data, struct kpl_err *err)
{
	int rc;

	if ((rc = ops_check_run_id("id", run_id, err)) != 0)
		return rc;
	audit(e, who, run_id, NULL, "cancelled the run");
	return engine_cancel(e, run_id, cb, data, err);
}

int ops_retry(struct engine *e, const char *who, const char *run_id,
	      engine_submit_cb cb, void *data, struct kpl_err *err)
{
	int rc;

	if ((rc = ops_check_run_id("id", run_id, err)) != 0)
		return rc;
	if ((rc = engine_retry(e, run_id, cb, data, err)) != 0)
		return rc;
	/* After: only a retry the engine took is recorded. */
	audit(e, who, NULL, NULL, "retried run %s", run_id);
	return 0;
}

int ops_approve(struct engine *e, const char *who, const char *run_id, const char *stage,
		bool approve, const char *comment, const char *by, engine_submit_cb cb,
		void *data, struct kpl_err *err)
{
	int rc;

	if ((rc = ops_check_run_id("run_id", run_id, err)) != 0)
		return rc;
	if (!stage || !*stage || strlen(stage) > KPL_MAX_NAME_LEN)
		return kpl_errf(err, KPL_EINVAL, "stage: required, at most 128 characters");
	if ((comment && strlen(comment) > 2000) || (by && strlen(by) > 200))
		return kpl_errf(err, KPL_EINVAL,
				"comment (2000) or by (200 characters) is too long");
	audit(e, who, run_id, stage, "%s stage %s", approve ? "approved" : "rejected", stage);
	return engine_approve(e, run_id, stage, approve, comment, by, cb, data, err);
}

/* Each part as kpl writes it into a generated pipeline, so nothing in it
 * needs quoting. */
int ops_split_target(const char *t, char parts[3][128], struct kpl_err *err)
{
	int n = 0;
	size_t len = 0;

	if (!t || !*t)
		return kpl_errf(err, KPL_EINVAL, "deployment: required, as cluster/namespace/name");
	for (const char *p = t;; p++) {
		if (*p == '/' || *p == '\0') {
			if (len == 0 || n == 3)
				break;
			parts[n++][len] = '\0';
			len = 0;
			if (*p == '\0')
				return n == 3 ? 0 : kpl_errf(err, KPL_EINVAL, "deployment %.200s: want "
							      "cluster/namespace/name", t);
			continue;
		}
		if (!(isalnum((unsigned char)*p) || *p == '-' || *p == '.' || *p == '_') ||
		    len == 127)
			return kpl_errf(err, KPL_EINVAL, "deployment %.200s: only letters, digits, "
					"'.', '_' and '-' between the slashes", t);
		parts[n][len++] = *p;
	}
	return kpl_errf(err, KPL_EINVAL, "deployment %.200s: want cluster/namespace/name", t);
}

int ops_rollback(struct engine *e, const char *who, const char *deployment,
		 const char *to_revision, engine_submit_cb cb, void *data,
		 struct kpl_err *err)
{
	char parts[3][128], rev[64] = "", *text, *msg;
	struct kpl_err aerr = { 0 };
	int rc;

	if ((rc = ops_split_target(deployment, parts, err)) != 0)
		return rc;
	/* Named by the caller, not by a template: say it now, not in a run
	 * that fails at start. */
	if (!cfg_find(engine_config(e), CFG_KUBERNETES, parts[0])) {
		char names[300];
		return kpl_errf(err, KPL_EINVAL, "deployment %s: no kubernetes.%s in the daemon "
				"config (declared: %s)", deployment, parts[0],
				cfg_names(engine_config(e), CFG_KUBERNETES, names, sizeof names));
	}
	if (to_revision && *to_revision) {
		for (const char *p = to_revision; *p; p++)
			if (!isdigit((unsigned char)*p) || p - to_revision > 18)
				return kpl_errf(err, KPL_EINVAL,
						"to_revision: a revision number, like 4");
		snprintf(rev, sizeof rev, ", to_revision: \"%s\"", to_revision);
	}
	text = kpl_asprintf("name: rollback-%s\n"
			    "description: rollback of %s asked through RollbackRelease\n"
			    "stages:\n"
			    "  - name: rollback\n"
			    "    kind: rollback\n"
			    "    with: { cluster: \"%s\", namespace: \"%s\", deployment: \"%s\"%s }\n",
			    parts[2], deployment, parts[0], parts[1], parts[2], rev);
	msg = kpl_asprintf("%s asked for a rollback of %s%s%s", who, deployment,
			   rev[0] ? " to revision " : "", rev[0] ? to_revision : "");
	engine_audit(e, NULL, NULL, msg, &aerr);
	kpl_info(LOG, "%s", msg);
	free(msg);
	rc = engine_submit(e, text, strlen(text), NULL, NULL, 0, NULL, cb, data, err);
	free(text);
	return rc;
}
