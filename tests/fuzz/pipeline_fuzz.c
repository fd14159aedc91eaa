/*
 * pipeline_fuzz.c - the pipeline parser and validator (pipelines/
 * pipeline.c) over any text, with the real stage kinds, so every kind's
 * `with` check runs too. A pipeline that parses has its `when`
 * expressions evaluated and its params resolved; the all-diagnostics
 * validator and the plain document reader see the same text.
 *
 * Two targets share this file: pipeline_yaml_fuzz and pipeline_json_fuzz
 * differ in their corpus and dictionary (the parser reads JSON when the
 * text starts with '{').
 */
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "pipelines/expr.h"
#include "pipelines/pipeline.h"
#include "stages/stage.h"
#include "tests/fuzz/fuzz.h"

/* Every reference has a value: its last part, so `when` comparisons go
 * both ways across inputs. */
static int lookup(void *data, const struct expr *ref, const char **value)
{
	(void)data;
	if (ref->n_part == 0)
		return KPL_ENOTFOUND;
	*value = ref->part[ref->n_part - 1];
	return 0;
}

/* The stage kinds call back into engine/engine.c (stage_http, ...); a
 * reference from here makes the linker take engine.o from its archive
 * before it reads the kinds' one. */
void *const pipeline_fuzz_engine_ref = (void *)stage_http;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1); /* quiet */
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct pl_kind *kinds;
	size_t n_kinds, n_diags = 0;
	struct pipeline *p = NULL;
	struct pl_diag *diags = NULL;
	struct pl_node *root = NULL;
	struct kpl_err err = { 0 };
	const char *text = (const char *)data;

	kinds = stage_kinds_for_parser(&n_kinds);
	if (pipeline_parse(text, size, "fuzz", kinds, n_kinds, &p, &err) == 0) {
		for (size_t i = 0; i < p->n_stages; i++) {
			bool b;
			struct kpl_err e2 = { 0 };
			if (p->stages[i].when_expr)
				expr_eval_bool(p->stages[i].when_expr, lookup, NULL, &b, &e2);
		}
		/* Every param given as "1", then none (defaults, required). */
		const char **names = calloc(p->n_params + 1, sizeof *names);
		const char **values = calloc(p->n_params + 1, sizeof *values);
		for (int round = 0; round < 2; round++) {
			char **on = NULL, **ov = NULL;
			size_t n = round ? 0 : p->n_params, on_n = 0;
			for (size_t i = 0; i < n; i++) {
				names[i] = p->params[i].name;
				values[i] = "1";
			}
			if (pipeline_resolve_params(p, names, values, n, &on, &ov, &on_n,
						    &err) == 0) {
				for (size_t i = 0; i < on_n; i++) {
					free(on[i]);
					free(ov[i]);
				}
				free(on);
				free(ov);
			}
		}
		free(names);
		free(values);
		pipeline_free(p);
	}
	pipeline_validate_all(text, size, "fuzz", kinds, n_kinds, &diags, &n_diags);
	for (size_t i = 0; i < n_diags; i++) {
		char buf[1024];
		pl_diag_format(&diags[i], "fuzz", buf, sizeof buf);
	}
	pl_diags_free(diags, n_diags);
	if (pl_doc_parse(text, size, "fuzz", &root, &err) == 0)
		pl_doc_free(root);
	return 0;
}
