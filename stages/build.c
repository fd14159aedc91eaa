/*
 * build.c - the `build` stage kind: builds an artifact (an image) through a
 * driver named by `with.driver`, e.g.
 *
 *   - name: image
 *     kind: build
 *     with: { driver: jenkins, jenkins: ci-main, job: team/app,
 *             params: { GIT_SHA: "${{ params.sha }}" } }
 *
 * Every driver publishes what it built as outputs (docs/stages.md). This
 * file only dispatches: each driver is a struct stage_kind of its own.
 */
#include <stdio.h>
#include <string.h>

#include "stages/build.h"
#include "stages/kinds.h"
#include "stages/pod.h"

/*
 * The drivers, listed once: dispatch and check_with's "known:" list read
 * this table.
 */
static const struct stage_kind *const drivers[] = {
	&build_jenkins_driver,
	&build_local_driver,
};

static const struct stage_kind *driver_find(const char *name)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(drivers); i++)
		if (strcmp(drivers[i]->name, name) == 0)
			return drivers[i];
	return NULL;
}

static void driver_names(char *buf, size_t n)
{
	size_t len = 0;

	buf[0] = '\0';
	for (size_t i = 0; i < KPL_ARRAY_SIZE(drivers) && len < n; i++)
		len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? ", " : "",
					drivers[i]->name);
}

static int build_check_with(const struct pl_node *with, const char *file,
			    const char *path, struct kpl_err *err)
{
	const struct pl_node *d;
	const struct stage_kind *drv;
	char names[200];

	driver_names(names, sizeof names);
	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a build stage needs `with` with "
				"`driver` (known: %s)", file, path, names);
	if (with->type != PL_MAP)
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: must be a mapping", file,
				with->pos.line, with->pos.col, path);
	d = pl_map_get(with, "driver");
	if (!d)
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.driver: required (known: %s)",
				file, with->pos.line, with->pos.col, path, names);
	if (d->type != PL_SCALAR)
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.driver: must be a string "
				"(known: %s)", file, d->pos.line, d->pos.col, path, names);
	drv = driver_find(d->scalar);
	if (!drv)
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.driver: unknown driver \"%s\" "
				"(known: %s)", file, d->pos.line, d->pos.col, path, d->scalar,
				names);
	return drv->check_with ? drv->check_with(with, file, path, err) : 0;
}

/* check_with has vouched for the driver before anything runs. */
static const struct stage_kind *driver_of(struct stage *st)
{
	const struct pl_node *d = stage_with_get(st, "driver");
	const struct stage_kind *drv = d && d->scalar ? driver_find(d->scalar) : NULL;

	if (!drv)
		BUG("build stage %s without a known driver", stage_name(st));
	return drv;
}

static int build_start(struct stage *st, struct kpl_err *err)
{
	return driver_of(st)->start(st, err);
}

static void build_cancel(struct stage *st)
{
	driver_of(st)->cancel(st);
}

static int build_resume(struct stage *st, struct kpl_err *err)
{
	const struct stage_kind *drv = driver_of(st);

	if (!drv->resume)
		return kpl_errf(err, KPL_ESTATE, "the %s build driver cannot re-attach",
				drv->name);
	return drv->resume(st, err);
}

static void build_abandon(struct stage *st)
{
	const struct stage_kind *drv = driver_of(st);

	if (drv->abandon)
		drv->abandon(st);
	else
		drv->cancel(st);
}

/* Only the local driver may run as a pod (runs_on). */
static bool build_pod_capable(const struct pl_node *with)
{
	const struct pl_node *d = with && with->type == PL_MAP ? pl_map_get(with, "driver") : NULL;

	return d && d->type == PL_SCALAR && !strcmp(d->scalar, build_local_driver.name);
}

static int build_check_pod(const struct pl_node *with, const struct pl_node *runs_on,
			   const struct pl_node *defaults, const struct pl_node *at,
			   const char *file, const char *path, struct kpl_err *err)
{
	return build_local_check_pod(with, runs_on, defaults, at, file, path, err);
}

static const char *const build_argv_keys[] = { "args", NULL };

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const build_with_keys[] = {
	"driver", "jenkins", "job", "params", "unstable", "context", "dockerfile", "target",
	"args", "output", "registry", "repository", "tags", NULL
};

const struct stage_kind build_kind = {
	.name = "build",
	.with_keys = build_with_keys,
	/* buildah --build-arg (argv, and the image's history); Jenkins keeps
	 * build parameters with the build. */
	.argv_keys = build_argv_keys,
	.check_with = build_check_with,
	.start = build_start,
	.cancel = build_cancel,
	.resume = build_resume,
	.abandon = build_abandon,
	.runs_on = true,
	.pod_capable = build_pod_capable,
	.check_pod = build_check_pod,
	/* A local build in a pod with runs_on.workspace: the run's claim. */
	.run_ended = pod_run_ended,
};
