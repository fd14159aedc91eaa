/*
 * expr_fuzz.c - the `when:` expression language (pipelines/expr.c): parse
 * with the roots given by the first byte, walk the references, evaluate
 * (as a value and as a bool) with every reference found, and print.
 */
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "pipelines/expr.h"
#include "tests/fuzz/fuzz.h"

/* A reference's value is its last part; "missing" is not found, so
 * errors in evaluation are reached too. */
static int lookup(void *data, const struct expr *ref, const char **value)
{
	(void)data;
	if (ref->n_part == 0 || strcmp(ref->part[ref->n_part - 1], "missing") == 0)
		return KPL_ENOTFOUND;
	*value = ref->part[ref->n_part - 1];
	return 0;
}

static int count_ref(void *data, const struct expr *ref)
{
	(void)ref;
	++*(size_t *)data;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct expr *e = NULL;
	struct kpl_err err = { 0 };
	size_t off = 0, n_refs = 0;
	unsigned roots;

	if (size < 1)
		return 0;
	roots = data[0] & (EXPR_ROOTS_TEMPLATE | EXPR_ROOT_CANARY);
	if (expr_parse((const char *)data + 1, size - 1, roots, &e, &off, &err) != 0)
		return 0;
	if (off > size - 1)
		abort(); /* an error offset outside the text */
	expr_walk_refs(e, count_ref, &n_refs);
	struct expr_value v;
	if (expr_eval(e, lookup, NULL, &v, &err) == 0) {
		free(expr_value_text(&v));
		expr_value_release(&v);
	}
	bool b;
	expr_eval_bool(e, lookup, NULL, &b, &err);
	expr_free(e);
	return 0;
}
