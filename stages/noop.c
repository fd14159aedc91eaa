/*
 * noop.c - the `noop` stage kind: succeeds at once. It goes through the same
 * states, store writes and events as any other kind, which makes it the
 * yardstick for the engine's own overhead (bench/) and a placeholder while a
 * pipeline is being drafted.
 */
#include "stages/kinds.h"

static int noop_check_with(const struct pl_node *with, const char *file,
			   const char *path, struct kpl_err *err)
{
	if (with && !(with->type == PL_MAP && with->n == 0))
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: a noop stage takes no with",
				file, with->pos.line, with->pos.col, path);
	return 0;
}

static int noop_start(struct stage *st, struct kpl_err *err)
{
	(void)err;
	stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
	return 0;
}

static void noop_cancel(struct stage *st)
{
	(void)st; /* it never runs long enough to be cancelled */
}

/* Nothing to re-attach to; running it again is harmless. */
static int noop_resume(struct stage *st, struct kpl_err *err)
{
	(void)err;
	stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
	return 0;
}

const struct stage_kind noop_kind = {
	.name = "noop",
	.check_with = noop_check_with,
	.start = noop_start,
	.cancel = noop_cancel,
	.resume = noop_resume,
};
