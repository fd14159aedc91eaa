/*
 * approval.c - the `approval` stage kind: the run waits (stage WAITING)
 * until someone answers through ApproveStage (kplctl approve), or the
 * stage's `timeout` fails it.
 *
 *   with: { message: "text shown while waiting" }   (optional)
 *
 * Nothing runs outside kpld, so after a restart the stage simply waits
 * again, with what is left of its deadline.
 */
#include <stdlib.h>
#include <string.h>

#include "stages/kinds.h"

static int approval_check_with(const struct pl_node *with, const char *file,
			       const char *path, struct kpl_err *err)
{
	if (!with)
		return 0;
	if (with->type != PL_MAP)
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: must be a mapping", file,
				with->pos.line, with->pos.col, path);
	for (size_t i = 0; i < with->n; i++) {
		const struct pl_node *k = with->keys[i], *v = with->items[i];
		if (strcmp(k->scalar, "message") != 0)
			return kpl_errf(err, KPL_EINVAL,
					"%s:%d:%d: %s.%s: unknown key (allowed: message)", file,
					k->pos.line, k->pos.col, path, k->scalar);
		if (v->type != PL_SCALAR)
			return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.message: must be a string",
					file, v->pos.line, v->pos.col, path);
	}
	return 0;
}

static int approval_start(struct stage *st, struct kpl_err *err)
{
	char *msg = stage_expand(st, stage_with_get(st, "message"));
	char *text = kpl_asprintf("waiting for approval%s%s", msg && *msg ? ": " : "",
				  msg ? msg : "");

	(void)err;
	stage_wait(st, text);
	free(text);
	free(msg);
	return 0;
}

static void approval_cancel(struct stage *st)
{
	stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
}

static int approval_resume(struct stage *st, struct kpl_err *err)
{
	(void)st;
	(void)err;
	return 0; /* still waiting: the answer comes through the engine */
}

static void approval_abandon(struct stage *st)
{
	(void)st; /* nothing to release */
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const approval_with_keys[] = { "message", NULL };

const struct stage_kind approval_kind = {
	.name = "approval",
	.with_keys = approval_with_keys,
	.check_with = approval_check_with,
	.start = approval_start,
	.cancel = approval_cancel,
	.resume = approval_resume,
	.abandon = approval_abandon,
};
