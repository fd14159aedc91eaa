/* template.c - scanning and expanding ${{ expr }} templates. */
#include "pipelines/template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A growing byte buffer for literal text and expansions. */
struct buf {
	char *s;
	size_t len, cap;
};

static void buf_add(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		b->s = kpl_realloc(b->s, b->cap);
	}
	memcpy(b->s + b->len, s, n);
	b->len += n;
	b->s[b->len] = '\0';
}

static struct tpl_part *add_part(struct tpl *t, size_t off)
{
	t->parts = kpl_realloc(t->parts, (t->n_parts + 1) * sizeof *t->parts);
	struct tpl_part *p = &t->parts[t->n_parts++];
	memset(p, 0, sizeof *p);
	p->off = off;
	return p;
}

static void flush_literal(struct tpl *t, struct buf *lit, size_t off)
{
	if (lit->len == 0)
		return;
	struct tpl_part *p = add_part(t, off);
	p->text = lit->s;
	lit->s = NULL;
	lit->len = lit->cap = 0;
}

bool tpl_has_template(const char *s)
{
	return strstr(s, "${{") != NULL;
}

/* Finds the "}}" that ends an expression starting at s + i, skipping quoted
 * strings; returns its offset or -1. */
static long find_close(const char *s, size_t i)
{
	char quote = 0;

	for (; s[i]; i++) {
		if (quote) {
			if (s[i] == quote)
				quote = 0;
		} else if (s[i] == '\'' || s[i] == '"') {
			quote = s[i];
		} else if (s[i] == '}' && s[i + 1] == '}') {
			return (long)i;
		}
	}
	return -1;
}

int tpl_parse(const char *s, unsigned roots, struct tpl **out,
	      size_t *err_off, struct kpl_err *err)
{
	struct tpl *t = kpl_calloc(1, sizeof *t);
	struct buf lit = { 0 };
	size_t lit_off = 0;
	size_t i = 0;
	size_t off = 0;

	*out = NULL;
	while (s[i]) {
		if (s[i] == '$' && strncmp(s + i + 1, "${{", 3) == 0) {
			if (lit.len == 0)
				lit_off = i;
			buf_add(&lit, "${{", 3);
			i += 4;
			continue;
		}
		if (strncmp(s + i, "${{", 3) != 0) {
			if (lit.len == 0)
				lit_off = i;
			buf_add(&lit, s + i, 1);
			i++;
			continue;
		}
		long close = find_close(s, i + 3);
		if (close < 0) {
			off = i;
			kpl_errf(err, KPL_EINVAL, "unterminated \"${{\": add the closing \"}}\"");
			goto fail;
		}
		size_t start = i + 3;
		size_t end = (size_t)close;
		size_t trimmed = start;
		while (trimmed < end && (s[trimmed] == ' ' || s[trimmed] == '\t'))
			trimmed++;
		if (trimmed == end) {
			off = i;
			kpl_errf(err, KPL_EINVAL, "empty \"${{ }}\": put a reference inside, like ${{ params.NAME }}");
			goto fail;
		}
		flush_literal(t, &lit, lit_off);
		struct tpl_part *p = add_part(t, i);
		p->expr_off = start;
		size_t eoff = 0;
		if (expr_parse(s + start, end - start, roots, &p->expr, &eoff,
			       err) < 0) {
			off = start + eoff;
			goto fail;
		}
		i = end + 2;
	}
	flush_literal(t, &lit, lit_off);
	*out = t;
	return 0;
fail:
	free(lit.s);
	tpl_free(t);
	if (err_off)
		*err_off = off;
	return KPL_EINVAL;
}

void tpl_free(struct tpl *t)
{
	if (!t)
		return;
	for (size_t i = 0; i < t->n_parts; i++) {
		free(t->parts[i].text);
		expr_free(t->parts[i].expr);
	}
	free(t->parts);
	free(t);
}

int tpl_expand(const struct tpl *t, expr_lookup_fn lookup, void *data,
	       char **out, struct kpl_err *err)
{
	struct buf b = { 0 };
	int rc;

	*out = NULL;
	buf_add(&b, "", 0);
	for (size_t i = 0; i < t->n_parts; i++) {
		const struct tpl_part *p = &t->parts[i];
		if (p->text) {
			buf_add(&b, p->text, strlen(p->text));
			continue;
		}
		struct expr_value v;
		if ((rc = expr_eval(p->expr, lookup, data, &v, err)) < 0)
			goto fail;
		char *text = expr_value_text(&v);
		expr_value_release(&v);
		buf_add(&b, text, strlen(text));
		free(text);
		/* Expansions can multiply sizes; keep them bounded like any
		 * other value from outside. */
		if (b.len > KPL_MAX_VALUE_LEN) {
			rc = kpl_errf(err, KPL_ETOOBIG, "expanded text is over %d bytes",
				      KPL_MAX_VALUE_LEN);
			goto fail;
		}
	}
	*out = b.s;
	return 0;
fail:
	free(b.s);
	return rc;
}

int tpl_expand_str(const char *s, unsigned roots, expr_lookup_fn lookup,
		   void *data, char **out, struct kpl_err *err)
{
	struct tpl *t;
	size_t off = 0;
	int rc;

	*out = NULL;
	if ((rc = tpl_parse(s, roots, &t, &off, err)) < 0) {
		if (err) {
			char msg[sizeof err->msg];
			snprintf(msg, sizeof msg, "%s", err->msg);
			kpl_errf(err, rc, "column %zu: %s", off + 1, msg);
		}
		return rc;
	}
	rc = tpl_expand(t, lookup, data, out, err);
	tpl_free(t);
	return rc;
}
