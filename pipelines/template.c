/* template.c - scanning and expanding ${{ expr }} templates. */
#include "pipelines/template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct tpl_part *add_part(struct tpl *t, size_t off)
{
	t->parts = kpl_realloc(t->parts, (t->n_parts + 1) * sizeof *t->parts);
	struct tpl_part *p = &t->parts[t->n_parts++];
	memset(p, 0, sizeof *p);
	p->off = off;
	return p;
}

static void flush_literal(struct tpl *t, struct kpl_buf *lit, size_t off)
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

long tpl_find_close(const char *s, size_t i)
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
	struct kpl_buf lit = { 0 };
	size_t lit_off = 0;
	size_t i = 0;
	size_t off = 0;

	*out = NULL;
	while (s[i]) {
		if (s[i] == '$' && strncmp(s + i + 1, "${{", 3) == 0) {
			if (lit.len == 0)
				lit_off = i;
			kpl_buf_add(&lit, "${{", 3);
			i += 4;
			continue;
		}
		if (strncmp(s + i, "${{", 3) != 0) {
			if (lit.len == 0)
				lit_off = i;
			kpl_buf_add(&lit, s + i, 1);
			i++;
			continue;
		}
		long close = tpl_find_close(s, i + 3);
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
	struct kpl_buf b = { 0 };
	int rc;

	*out = NULL;
	kpl_buf_add(&b, "", 0);
	for (size_t i = 0; i < t->n_parts; i++) {
		const struct tpl_part *p = &t->parts[i];
		if (p->text) {
			kpl_buf_add(&b, p->text, strlen(p->text));
			continue;
		}
		struct expr_value v;
		if ((rc = expr_eval(p->expr, lookup, data, &v, err)) < 0)
			goto fail;
		char *text = expr_value_text(&v);
		expr_value_release(&v);
		kpl_buf_add(&b, text, strlen(text));
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

/* ---------------------------------------------------------------------- */
/* The shell form */

/* Where the shell stands at a point of the text: enough of sh's quoting to
 * say how a variable reference must be written there. */
enum sh_state {
	SH_PLAIN,       /* unquoted */
	SH_SQ,          /* inside '...' */
	SH_DQ,          /* inside "..." */
	SH_COMMENT,     /* after # to the end of the line */
	SH_HEREDOC,     /* an unquoted here-document's body (expands $) */
	SH_HEREDOC_Q,   /* a quoted one's (<<'EOF': nothing expands) */
};

#define SH_MAX_HEREDOCS 8

struct sh_lex {
	enum sh_state state;
	bool escaped;           /* the previous character was a backslash */
	bool word_start;        /* a # here starts a comment */
	/* Here-documents named on the current line, opened at its end. */
	struct { char delim[128]; bool quoted, strip_tabs; } pending[SH_MAX_HEREDOCS];
	size_t n_pending, cur;  /* cur: the one whose body this is */
	struct kpl_buf line;        /* the body line so far */
	bool line_dirty;        /* a template stood in it: never the delimiter */
};

/* Reads the delimiter word of a "<<" at s (just after it); returns the
 * bytes used. */
static size_t sh_heredoc_word(struct sh_lex *lx, const char *s)
{
	size_t i = 0, n = 0;
	bool quoted = false, strip = false;
	char q = 0;

	if (s[i] == '-') {
		strip = true;
		i++;
	}
	while (s[i] == ' ' || s[i] == '\t')
		i++;
	if (lx->n_pending == SH_MAX_HEREDOCS)
		return i;
	for (; s[i]; i++) {
		char ch = s[i];
		if (q) {
			if (ch == q) {
				q = 0;
				continue;
			}
		} else if (ch == '\'' || ch == '"') {
			q = ch;
			quoted = true;
			continue;
		} else if (ch == '\\') {
			quoted = true;
			if (!s[i + 1])
				break;
			ch = s[++i];
		} else if (strchr(" \t\n;&|<>()", ch)) {
			break;
		}
		if (n < sizeof lx->pending[0].delim - 1)
			lx->pending[lx->n_pending].delim[n++] = ch;
	}
	lx->pending[lx->n_pending].delim[n] = '\0';
	lx->pending[lx->n_pending].quoted = quoted;
	lx->pending[lx->n_pending].strip_tabs = strip;
	lx->n_pending++;
	return i;
}

static void sh_open_heredoc(struct sh_lex *lx)
{
	lx->state = lx->pending[lx->cur].quoted ? SH_HEREDOC_Q : SH_HEREDOC;
	lx->line.len = 0;
	lx->line_dirty = false;
}

/* A body line ended: the delimiter ends the here-document. */
static void sh_body_line(struct sh_lex *lx)
{
	const char *l = lx->line.s ? lx->line.s : "";

	if (lx->pending[lx->cur].strip_tabs)
		while (*l == '\t')
			l++;
	if (!lx->line_dirty && strcmp(l, lx->pending[lx->cur].delim) == 0) {
		if (++lx->cur < lx->n_pending) {
			sh_open_heredoc(lx);
		} else {
			lx->state = SH_PLAIN;
			lx->n_pending = lx->cur = 0;
			lx->word_start = true;
		}
	}
	lx->line.len = 0;
	if (lx->line.s)
		lx->line.s[0] = '\0';
	lx->line_dirty = false;
}

/* Follows the literal text s (appended to out as it is). */
static void sh_scan(struct sh_lex *lx, const char *s, struct kpl_buf *out)
{
	kpl_buf_add(out, s, strlen(s));
	for (size_t i = 0; s[i]; i++) {
		char ch = s[i];

		switch (lx->state) {
		case SH_HEREDOC:
		case SH_HEREDOC_Q:
			if (ch == '\n')
				sh_body_line(lx);
			else
				kpl_buf_add(&lx->line, &ch, 1);
			continue;
		case SH_SQ:
			if (ch == '\'')
				lx->state = SH_PLAIN;
			continue;
		case SH_DQ:
			if (lx->escaped)
				lx->escaped = false;
			else if (ch == '\\')
				lx->escaped = true;
			else if (ch == '"')
				lx->state = SH_PLAIN;
			continue;
		case SH_COMMENT:
			if (ch != '\n')
				continue;
			lx->state = SH_PLAIN;
			break; /* the newline, as unquoted */
		case SH_PLAIN:
			break;
		}
		if (lx->escaped) {
			lx->escaped = false;
			lx->word_start = false;
			continue;
		}
		if (ch == '\\') {
			lx->escaped = true;
		} else if (ch == '\'') {
			lx->state = SH_SQ;
		} else if (ch == '"') {
			lx->state = SH_DQ;
		} else if (ch == '#' && lx->word_start) {
			lx->state = SH_COMMENT;
		} else if (ch == '<' && s[i + 1] == '<' && s[i + 2] == '<') {
			i += 2; /* a here-string, not a here-document */
			lx->word_start = true;
			continue;
		} else if (ch == '<' && s[i + 1] == '<') {
			i += 1 + sh_heredoc_word(lx, s + i + 2);
			lx->word_start = true;
			continue;
		} else if (ch == '\n' && lx->n_pending) {
			lx->cur = 0;
			sh_open_heredoc(lx);
			continue;
		}
		lx->word_start = strchr(" \t\n;&|()<>", ch) != NULL;
	}
}

int tpl_expand_shell(const struct tpl *t, expr_lookup_fn lookup, void *data,
		     char **out, char ***values, size_t *n, struct kpl_err *err)
{
	struct kpl_buf b = { 0 };
	struct sh_lex lx = { .state = SH_PLAIN, .word_start = true };
	char **vals = NULL;
	size_t nv = 0;
	int rc;

	*out = NULL;
	*values = NULL;
	*n = 0;
	kpl_buf_add(&b, "", 0);
	for (size_t i = 0; i < t->n_parts; i++) {
		const struct tpl_part *p = &t->parts[i];
		struct expr_value v;
		char ref[64];

		if (p->text) {
			sh_scan(&lx, p->text, &b);
			continue;
		}
		if ((rc = expr_eval(p->expr, lookup, data, &v, err)) < 0)
			goto fail;
		vals = kpl_realloc(vals, (nv + 1) * sizeof *vals);
		vals[nv++] = expr_value_text(&v);
		expr_value_release(&v);
		switch (lx.state) {
		case SH_PLAIN:
			snprintf(ref, sizeof ref, "\"${KPL_T_%zu}\"", nv);
			lx.word_start = false;
			break;
		case SH_SQ:
			snprintf(ref, sizeof ref, "'\"${KPL_T_%zu}\"'", nv);
			break;
		case SH_HEREDOC_Q:
			rc = kpl_errf(err, KPL_EINVAL, "column %zu: a template in a quoted "
				      "here-document (<<'%s') is never expanded: quote nothing "
				      "in the delimiter (<<%s) to have it", p->off + 1,
				      lx.pending[lx.cur].delim, lx.pending[lx.cur].delim);
			goto fail;
		case SH_HEREDOC:
			lx.line_dirty = true;
			/* fall through */
		default:
			snprintf(ref, sizeof ref, "${KPL_T_%zu}", nv);
			break;
		}
		lx.escaped = false;
		kpl_buf_add(&b, ref, strlen(ref));
	}
	free(lx.line.s);
	*out = b.s;
	*values = vals;
	*n = nv;
	return 0;
fail:
	free(lx.line.s);
	free(b.s);
	for (size_t i = 0; i < nv; i++)
		free(vals[i]);
	free(vals);
	return rc;
}
