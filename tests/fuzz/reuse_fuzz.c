/*
 * reuse_fuzz.c - matrix stages and stage templates (pipelines/reuse.h)
 * over any text: the input is a pipeline, then NUL-separated template
 * files named t0.kpl.yaml, t1.kpl.yaml, ... (seeds use `uses:
 * ./t0.kpl.yaml`). The all-diagnostics validator, the parser, the lister
 * of `uses:` paths and the files check all see it; a pipeline that parses
 * must name only stages that exist in its needs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "pipelines/pipeline.h"
#include "pipelines/reuse.h"
#include "stages/stage.h"
#include "tests/fuzz/fuzz.h"

/* The stage kinds call back into engine/engine.c: see pipeline_fuzz.c. */
void *const reuse_fuzz_engine_ref = (void *)stage_http;

#define MAX_FILES 4

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1); /* quiet */
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *text = (const char *)data;
	const char *end = text + size, *nul = memchr(text, '\0', size);
	size_t len = nul ? (size_t)(nul - text) : size;
	struct pl_file files[MAX_FILES];
	char names[MAX_FILES][32];
	struct pl_files fs = { files, 0 };
	const struct pl_kind *kinds;
	size_t n_kinds, n_diags = 0, n_paths = 0;
	struct pl_diag *diags = NULL;
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	char **paths = NULL;
	char buf[1024];

	for (const char *f = nul ? nul + 1 : end; f < end && fs.n < MAX_FILES;) {
		const char *e = memchr(f, '\0', (size_t)(end - f));
		snprintf(names[fs.n], sizeof names[fs.n], "t%zu.kpl.yaml", fs.n);
		files[fs.n].path = names[fs.n];
		files[fs.n].text = f;
		files[fs.n].len = e ? (size_t)(e - f) : (size_t)(end - f);
		fs.n++;
		f = e ? e + 1 : end;
	}
	/* Names here are good; only a size can be refused. */
	if (reuse_check_files(&fs, &err) && err.code != KPL_ETOOBIG)
		abort();
	kinds = stage_kinds_for_parser(&n_kinds);
	pipeline_validate_files(text, len, "fuzz", &fs, kinds, n_kinds, &diags, &n_diags);
	for (size_t i = 0; i < n_diags; i++)
		pl_diag_format(&diags[i], "fuzz", buf, sizeof buf);
	pl_diags_free(diags, n_diags);
	if (pipeline_parse_files(text, len, "fuzz", &fs, kinds, n_kinds, &p, &err) == 0) {
		if (n_diags)
			abort(); /* the two must agree */
		for (size_t i = 0; i < p->n_stages; i++) {
			if (p->stages[i].max_parallel && !p->stages[i].matrix)
				abort();
			for (size_t j = 0; j < p->stages[i].n_needs; j++) {
				size_t k;
				for (k = 0; k < p->n_stages; k++)
					if (!strcmp(p->stages[k].name, p->stages[i].needs[j]))
						break;
				if (k == p->n_stages)
					abort();
			}
		}
		pipeline_free(p);
	}
	reuse_list_paths(text, len, &paths, &n_paths);
	for (size_t i = 0; i < n_paths; i++)
		free(paths[i]);
	free(paths);
	return 0;
}
