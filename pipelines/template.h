/*
 * template.h - ${{ expr }} templates inside pipeline strings.
 *
 * A string is literal text with ${{ expr }} parts; expr is the language of
 * expr.h (usually one reference: ${{ params.version }}). "$${{" writes a
 * literal "${{". A "}}" inside a quoted string of the expression does not
 * end it.
 *
 * The parser checks the syntax only; which references exist is the
 * caller's business (the pipeline validator walks them with
 * expr_walk_refs). Nothing here does I/O; any thread may call it.
 */
#ifndef KPL_TEMPLATE_H
#define KPL_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include "base/kpl.h"
#include "pipelines/expr.h"

/* One piece of a template: literal text, or an expression. */
struct tpl_part {
	char *text;        /* literal: the text (escapes undone); else NULL */
	struct expr *expr; /* expression: its tree; else NULL */
	size_t off;        /* byte offset in the source string where it starts */
	size_t expr_off;   /* expression: byte offset of its first character */
};

struct tpl {
	struct tpl_part *parts;
	size_t n_parts;
};

/* The offset of the "}}" that ends an expression starting at s + i
 * (quoted strings skipped), or -1. */
long tpl_find_close(const char *s, size_t i);

/*
 * Parses the NUL-terminated s; roots as for expr_parse. On success *out owns
 * a new template (tpl_free it). On error returns KPL_EINVAL, *err_off is the
 * byte offset in s of the problem and err->msg says what is wrong, without a
 * position (an unterminated "${{", an empty one, a syntax error).
 */
int tpl_parse(const char *s, unsigned roots, struct tpl **out,
	      size_t *err_off, struct kpl_err *err);

void tpl_free(struct tpl *t);

/* True if s holds a "${{" (so it needs tpl_parse at all). */
bool tpl_has_template(const char *s);

/*
 * Expands t, looking each reference up through lookup. On success *out is a
 * malloc'd string (caller frees). On error returns a negative code and err
 * names the failing reference ("stages.build.outputs.image: no such
 * value").
 */
int tpl_expand(const struct tpl *t, expr_lookup_fn lookup, void *data,
	       char **out, struct kpl_err *err);

/*
 * Expands t for `/bin/sh -c` (a script stage's with.shell) without ever
 * making a value shell text: the literal parts stay as written, and each
 * ${{ expr }} becomes a reference to an environment variable that holds
 * its value, KPL_T_1, KPL_T_2, ... in order, written for where it stands:
 *   unquoted                  "${KPL_T_1}"     (one word, whatever it holds)
 *   in "..." or a <<EOF body  ${KPL_T_1}
 *   in '...'                  '"${KPL_T_1}"'   (the quote closed, reopened)
 *   in a comment              ${KPL_T_1}
 * So `echo ${{ params.x }}`, `echo "v=${{ params.x }}"` and
 * `echo '${{ params.x }}'` print the value as it is, `$(...)` and all. A
 * template in a quoted here-document (<<'EOF') cannot be expanded there
 * and is an error. On success *out is the text and *values (*n of them)
 * the variables' values, in order (malloc'd; free each and the array);
 */
int tpl_expand_shell(const struct tpl *t, expr_lookup_fn lookup, void *data,
		     char **out, char ***values, size_t *n, struct kpl_err *err);

/*
 * tpl_parse + tpl_expand in one call, for strings used once. Parse errors
 * come back in err as "column N: message" (N counts bytes from 1).
 */
int tpl_expand_str(const char *s, unsigned roots, expr_lookup_fn lookup,
		   void *data, char **out, struct kpl_err *err);

#endif
