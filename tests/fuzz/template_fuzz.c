/*
 * template_fuzz.c - ${{ }} templates in pipeline strings
 * (pipelines/template.c): parse with the roots given by the first byte,
 * expand, and expand in one call.
 */
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "pipelines/template.h"
#include "tests/fuzz/fuzz.h"

static int lookup(void *data, const struct expr *ref, const char **value)
{
	(void)data;
	if (ref->n_part == 0 || strcmp(ref->part[ref->n_part - 1], "missing") == 0)
		return KPL_ENOTFOUND;
	*value = ref->part[ref->n_part - 1];
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct tpl *t = NULL;
	struct kpl_err err = { 0 };
	size_t off = 0;
	unsigned roots;
	char *s, *out = NULL;

	if (size < 1)
		return 0;
	roots = data[0] & (EXPR_ROOTS_TEMPLATE | EXPR_ROOT_CANARY);
	s = fz_strndup(data + 1, size - 1); /* a C string: stops at a NUL */
	tpl_has_template(s);
	if (tpl_parse(s, roots, &t, &off, &err) == 0) {
		if (tpl_expand(t, lookup, NULL, &out, &err) == 0)
			free(out);
		tpl_free(t);
	} else if (off > strlen(s)) {
		abort(); /* an error offset outside the text */
	}
	out = NULL;
	if (tpl_expand_str(s, roots, lookup, NULL, &out, &err) == 0)
		free(out);
	free(s);
	return 0;
}
