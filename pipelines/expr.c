/* expr.c - the `when:` / template expression parser and evaluator. */
#include "pipelines/expr.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum tok_kind {
	TOK_EOF,
	TOK_LPAREN,
	TOK_RPAREN,
	TOK_NOT,
	TOK_EQ,
	TOK_NE,
	TOK_AND,
	TOK_OR,
	TOK_STR,
	TOK_NUM,
	TOK_WORD, /* true, false or a dotted reference */
};

struct tok {
	enum tok_kind kind;
	size_t off;
	size_t len;  /* bytes of the token in the text */
};

struct parser {
	const char *s;
	size_t len;
	size_t pos;
	unsigned roots;
	struct tok tok;  /* the current token */
	int nesting;
	size_t n_nodes;
	size_t err_off;
	struct kpl_err *err;
	bool failed;
};

static int fail(struct parser *p, size_t off, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(struct parser *p, size_t off, const char *fmt, ...)
{
	/* Keep the first error: later ones are consequences of it. */
	if (!p->failed) {
		va_list ap;
		p->failed = true;
		p->err_off = off;
		if (p->err) {
			p->err->code = KPL_EINVAL;
			va_start(ap, fmt);
			vsnprintf(p->err->msg, sizeof p->err->msg, fmt, ap);
			va_end(ap);
		}
	}
	return KPL_EINVAL;
}

static bool is_word_start(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/* Stage names may start with a digit and hold '-', so parts after the
 * root take the wider set. */
static bool is_part_char(char c)
{
	return is_word_start(c) || (c >= '0' && c <= '9') || c == '-';
}

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* A printable description of the token for messages. */
static void tok_describe(const struct parser *p, const struct tok *t,
			 char *buf, size_t size)
{
	if (t->kind == TOK_EOF) {
		snprintf(buf, size, "the end of the expression");
		return;
	}
	int n = t->len > 40 ? 40 : (int)t->len;
	snprintf(buf, size, "'%.*s'%s", n, p->s + t->off,
		 t->len > 40 ? "..." : "");
}

static int next(struct parser *p)
{
	const char *s = p->s;
	size_t i = p->pos;

	while (i < p->len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' ||
			      s[i] == '\r'))
		i++;
	p->tok.off = i;
	if (i >= p->len) {
		p->tok.kind = TOK_EOF;
		p->tok.len = 0;
		p->pos = i;
		return 0;
	}
	char c = s[i];
	char c2 = i + 1 < p->len ? s[i + 1] : '\0';
	size_t start = i;

	switch (c) {
	case '(': p->tok.kind = TOK_LPAREN; i++; break;
	case ')': p->tok.kind = TOK_RPAREN; i++; break;
	case '!':
		if (c2 == '=') {
			p->tok.kind = TOK_NE;
			i += 2;
		} else {
			p->tok.kind = TOK_NOT;
			i++;
		}
		break;
	case '=':
		if (c2 != '=')
			return fail(p, i, "'=' is not an operator; compare with '=='");
		p->tok.kind = TOK_EQ;
		i += 2;
		break;
	case '&':
		if (c2 != '&')
			return fail(p, i, "'&' is not an operator; use '&&'");
		p->tok.kind = TOK_AND;
		i += 2;
		break;
	case '|':
		if (c2 != '|')
			return fail(p, i, "'|' is not an operator; use '||'");
		p->tok.kind = TOK_OR;
		i += 2;
		break;
	case '\'':
	case '"':
		i++;
		while (i < p->len && s[i] != c)
			i++;
		if (i >= p->len)
			return fail(p, start, "unterminated string: add the closing %c", c);
		i++;
		p->tok.kind = TOK_STR;
		break;
	default:
		if (is_digit(c) || (c == '-' && is_digit(c2))) {
			i++;
			while (i < p->len && is_digit(s[i]))
				i++;
			if (i < p->len && (is_part_char(s[i]) || s[i] == '.'))
				return fail(p, start, "bad number: only whole decimal numbers are allowed");
			p->tok.kind = TOK_NUM;
		} else if (is_word_start(c)) {
			while (i < p->len && (is_part_char(s[i]) || s[i] == '.'))
				i++;
			p->tok.kind = TOK_WORD;
		} else {
			if (c == '$')
				return fail(p, i, "unexpected character '$': write the expression "
					    "bare (a == 'x'), or wrap all of it in one ${{ }}");
			return fail(p, i, "unexpected character '%c'", c);
		}
	}
	p->tok.len = i - start;
	p->pos = i;
	return 0;
}

static struct expr *node_new(struct parser *p, enum expr_kind kind, size_t off)
{
	if (++p->n_nodes > EXPR_MAX_NODES) {
		fail(p, off, "expression too long: more than %d terms",
		     EXPR_MAX_NODES);
		return NULL;
	}
	struct expr *e = kpl_calloc(1, sizeof *e);
	e->kind = kind;
	e->off = off;
	return e;
}

/* Checks a reference's shape against the allowed roots. */
static int check_ref(struct parser *p, struct expr *e)
{
	const char *root = e->part[0];
	size_t n = e->n_part;
	size_t off = e->off;
	static const struct {
		const char *name;
		unsigned bit;
	} roots[] = {
		{ "params", EXPR_ROOT_PARAMS }, { "stages", EXPR_ROOT_STAGES },
		{ "env", EXPR_ROOT_ENV },       { "run", EXPR_ROOT_RUN },
		{ "secrets", EXPR_ROOT_SECRETS }, { "canary", EXPR_ROOT_CANARY },
	};
	unsigned bit = 0;
	char allowed[128] = "";

	for (size_t i = 0; i < KPL_ARRAY_SIZE(roots); i++) {
		if (strcmp(root, roots[i].name) == 0)
			bit = roots[i].bit;
		if (p->roots & roots[i].bit) {
			strcat(allowed, allowed[0] ? ", " : "");
			strcat(allowed, roots[i].name);
			strcat(allowed, ".");
		}
	}
	if (!bit || !(p->roots & bit)) {
		if (n == 1)
			return fail(p, off, "unknown name \"%s\": strings need quotes, and references start with %s",
				    root, allowed);
		return fail(p, off, "unknown reference \"%s\": references here start with %s",
			    e->str, allowed);
	}
	switch (bit) {
	case EXPR_ROOT_PARAMS:
	case EXPR_ROOT_ENV:
	case EXPR_ROOT_SECRETS:
	case EXPR_ROOT_CANARY:
		if (n != 2)
			return fail(p, off, "bad reference \"%s\": write %s.NAME",
				    e->str, root);
		return 0;
	case EXPR_ROOT_RUN:
		if (n != 2 || strcmp(e->part[1], "id") != 0)
			return fail(p, off, "bad reference \"%s\": the only run value is run.id",
				    e->str);
		return 0;
	case EXPR_ROOT_STAGES:
		if (n == 3 && strcmp(e->part[2], "state") == 0)
			return 0;
		if (n == 4 && strcmp(e->part[2], "outputs") == 0)
			return 0;
		return fail(p, off, "bad reference \"%s\": write stages.NAME.state or stages.NAME.outputs.KEY",
			    e->str);
	}
	BUG("root bit %u", bit);
}

static struct expr *parse_word(struct parser *p)
{
	const char *w = p->s + p->tok.off;
	size_t len = p->tok.len;
	size_t off = p->tok.off;
	struct expr *e;

	if ((len == 4 && memcmp(w, "true", 4) == 0) ||
	    (len == 5 && memcmp(w, "false", 5) == 0)) {
		e = node_new(p, EXPR_BOOL, off);
		if (e)
			e->b = len == 4;
		return e;
	}
	e = node_new(p, EXPR_REF, off);
	if (!e)
		return NULL;
	e->str = kpl_strndup(w, len);
	/* Split on dots; empty parts ("params..x", "params.") are errors. */
	const char *part = w;
	for (size_t i = 0; i <= len; i++) {
		if (i < len && w[i] != '.')
			continue;
		size_t plen = (size_t)(w + i - part);
		if (plen == 0) {
			fail(p, off, "bad reference \"%s\": empty part", e->str);
			goto fail;
		}
		if (e->n_part == EXPR_MAX_REF_PARTS) {
			fail(p, off, "bad reference \"%s\": too many parts", e->str);
			goto fail;
		}
		e->part[e->n_part++] = kpl_strndup(part, plen);
		part = w + i + 1;
	}
	if (check_ref(p, e) < 0)
		goto fail;
	return e;
fail:
	expr_free(e);
	return NULL;
}

static struct expr *parse_or(struct parser *p);

static struct expr *parse_primary(struct parser *p)
{
	struct expr *e = NULL;
	char what[64];

	switch (p->tok.kind) {
	case TOK_LPAREN: {
		size_t open = p->tok.off;
		if (++p->nesting > EXPR_MAX_NESTING) {
			fail(p, open, "expression nested too deeply (more than %d levels)",
			     EXPR_MAX_NESTING);
			return NULL;
		}
		if (next(p) < 0)
			return NULL;
		e = parse_or(p);
		if (!e)
			return NULL;
		if (p->tok.kind != TOK_RPAREN) {
			tok_describe(p, &p->tok, what, sizeof what);
			fail(p, p->tok.off, "expected ')' to close '(', found %s",
			     what);
			expr_free(e);
			return NULL;
		}
		p->nesting--;
		break;
	}
	case TOK_STR:
		e = node_new(p, EXPR_STR, p->tok.off);
		if (!e)
			return NULL;
		e->str = kpl_strndup(p->s + p->tok.off + 1, p->tok.len - 2);
		break;
	case TOK_NUM: {
		char buf[32];
		if (p->tok.len >= sizeof buf) {
			fail(p, p->tok.off, "number out of range");
			return NULL;
		}
		memcpy(buf, p->s + p->tok.off, p->tok.len);
		buf[p->tok.len] = '\0';
		errno = 0;
		long long v = strtoll(buf, NULL, 10);
		if (errno == ERANGE) {
			fail(p, p->tok.off, "number out of range");
			return NULL;
		}
		e = node_new(p, EXPR_NUM, p->tok.off);
		if (!e)
			return NULL;
		e->num = v;
		break;
	}
	case TOK_WORD:
		e = parse_word(p);
		if (!e)
			return NULL;
		break;
	default:
		tok_describe(p, &p->tok, what, sizeof what);
		fail(p, p->tok.off, "expected a value, found %s", what);
		return NULL;
	}
	if (next(p) < 0) {
		expr_free(e);
		return NULL;
	}
	return e;
}

static struct expr *parse_unary(struct parser *p)
{
	if (p->tok.kind != TOK_NOT)
		return parse_primary(p);
	size_t off = p->tok.off;
	if (++p->nesting > EXPR_MAX_NESTING) {
		fail(p, off, "expression nested too deeply (more than %d levels)",
		     EXPR_MAX_NESTING);
		return NULL;
	}
	if (next(p) < 0)
		return NULL;
	struct expr *operand = parse_unary(p);
	if (!operand)
		return NULL;
	p->nesting--;
	struct expr *e = node_new(p, EXPR_NOT, off);
	if (!e) {
		expr_free(operand);
		return NULL;
	}
	e->l = operand;
	return e;
}

static struct expr *parse_cmp(struct parser *p)
{
	struct expr *l = parse_unary(p);
	if (!l)
		return NULL;
	if (p->tok.kind != TOK_EQ && p->tok.kind != TOK_NE)
		return l;
	enum expr_kind kind = p->tok.kind == TOK_EQ ? EXPR_EQ : EXPR_NE;
	size_t off = p->tok.off;
	struct expr *r = NULL, *e = NULL;
	if (next(p) < 0)
		goto fail;
	r = parse_unary(p);
	if (!r)
		goto fail;
	if (p->tok.kind == TOK_EQ || p->tok.kind == TOK_NE) {
		fail(p, p->tok.off, "comparisons do not chain; use parentheses and '&&'");
		goto fail;
	}
	e = node_new(p, kind, off);
	if (!e)
		goto fail;
	e->l = l;
	e->r = r;
	return e;
fail:
	expr_free(l);
	expr_free(r);
	return NULL;
}

/* One loop for both && and ||: left-associative chains of level below. */
static struct expr *parse_chain(struct parser *p, enum tok_kind op,
				enum expr_kind kind,
				struct expr *(*below)(struct parser *))
{
	struct expr *l = below(p);
	while (l && p->tok.kind == op) {
		size_t off = p->tok.off;
		if (next(p) < 0)
			goto fail;
		struct expr *r = below(p);
		if (!r)
			goto fail;
		struct expr *e = node_new(p, kind, off);
		if (!e) {
			expr_free(r);
			goto fail;
		}
		e->l = l;
		e->r = r;
		l = e;
	}
	return l;
fail:
	expr_free(l);
	return NULL;
}

static struct expr *parse_and(struct parser *p)
{
	return parse_chain(p, TOK_AND, EXPR_AND, parse_cmp);
}

static struct expr *parse_or(struct parser *p)
{
	return parse_chain(p, TOK_OR, EXPR_OR, parse_and);
}

int expr_parse(const char *s, size_t len, unsigned roots, struct expr **out,
	       size_t *err_off, struct kpl_err *err)
{
	struct parser p = { .s = s, .len = len, .roots = roots, .err = err };
	struct expr *e = NULL;
	char what[64];

	*out = NULL;
	if (memchr(s, '\0', len))
		return fail(&p, (size_t)((const char *)memchr(s, '\0', len) - s),
			    "NUL character in expression");
	if (next(&p) < 0)
		goto fail;
	if (p.tok.kind == TOK_EOF) {
		fail(&p, 0, "empty expression");
		goto fail;
	}
	e = parse_or(&p);
	if (!e)
		goto fail;
	if (p.tok.kind != TOK_EOF) {
		tok_describe(&p, &p.tok, what, sizeof what);
		fail(&p, p.tok.off, p.tok.kind == TOK_RPAREN
			     ? "unbalanced ')': no '(' to close"
			     : "expected an operator (==, !=, &&, ||) or the end, found %s",
		     what);
		goto fail;
	}
	*out = e;
	return 0;
fail:
	expr_free(e);
	if (err_off)
		*err_off = p.err_off;
	return KPL_EINVAL;
}

void expr_free(struct expr *e)
{
	if (!e)
		return;
	expr_free(e->l);
	expr_free(e->r);
	free(e->str);
	for (size_t i = 0; i < e->n_part; i++)
		free(e->part[i]);
	free(e);
}

int expr_walk_refs(const struct expr *e,
		   int (*fn)(void *data, const struct expr *ref), void *data)
{
	int rc;

	if (!e)
		return 0;
	if (e->kind == EXPR_REF)
		return fn(data, e);
	if ((rc = expr_walk_refs(e->l, fn, data)) != 0)
		return rc;
	return expr_walk_refs(e->r, fn, data);
}

void expr_value_release(struct expr_value *v)
{
	if (v) {
		free(v->str);
		v->str = NULL;
	}
}

char *expr_value_text(const struct expr_value *v)
{
	switch (v->type) {
	case EXPR_T_STR: return kpl_strdup(v->str);
	case EXPR_T_NUM: return kpl_asprintf("%" PRId64, v->num);
	case EXPR_T_BOOL: return kpl_strdup(v->b ? "true" : "false");
	}
	BUG("value type %d", (int)v->type);
}

static void describe_value(const struct expr_value *v, char *buf, size_t size)
{
	switch (v->type) {
	case EXPR_T_STR:
		snprintf(buf, size, "the string \"%.60s\"", v->str);
		return;
	case EXPR_T_NUM:
		snprintf(buf, size, "the number %" PRId64, v->num);
		return;
	case EXPR_T_BOOL:
		snprintf(buf, size, "%s", v->b ? "true" : "false");
		return;
	}
}

static int to_bool(const struct expr_value *v, bool *out, struct kpl_err *err)
{
	char what[96];

	if (v->type == EXPR_T_BOOL) {
		*out = v->b;
		return 0;
	}
	if (v->type == EXPR_T_STR && strcmp(v->str, "true") == 0) {
		*out = true;
		return 0;
	}
	if (v->type == EXPR_T_STR && strcmp(v->str, "false") == 0) {
		*out = false;
		return 0;
	}
	describe_value(v, what, sizeof what);
	return kpl_errf(err, KPL_EINVAL, "expected a bool, found %s", what);
}

static bool values_equal(const struct expr_value *a, const struct expr_value *b)
{
	if (a->type == b->type) {
		switch (a->type) {
		case EXPR_T_STR: return strcmp(a->str, b->str) == 0;
		case EXPR_T_NUM: return a->num == b->num;
		case EXPR_T_BOOL: return a->b == b->b;
		}
	}
	/* Numbers never equal bools; a string equals another type through
	 * that type's text, since references are always text. */
	if (a->type != EXPR_T_STR && b->type != EXPR_T_STR)
		return false;
	const struct expr_value *s = a->type == EXPR_T_STR ? a : b;
	const struct expr_value *o = a->type == EXPR_T_STR ? b : a;
	char *text = expr_value_text(o);
	bool eq = strcmp(s->str, text) == 0;
	free(text);
	return eq;
}

int expr_eval(const struct expr *e, expr_lookup_fn lookup, void *data,
	      struct expr_value *out, struct kpl_err *err)
{
	struct expr_value l = { 0 }, r = { 0 };
	const char *text = NULL;
	bool lb, rb;
	int rc;

	memset(out, 0, sizeof *out);
	switch (e->kind) {
	case EXPR_STR:
		out->type = EXPR_T_STR;
		out->str = kpl_strdup(e->str);
		return 0;
	case EXPR_NUM:
		out->type = EXPR_T_NUM;
		out->num = e->num;
		return 0;
	case EXPR_BOOL:
		out->type = EXPR_T_BOOL;
		out->b = e->b;
		return 0;
	case EXPR_REF:
		rc = lookup ? lookup(data, e, &text) : KPL_ENOTFOUND;
		if (rc == KPL_ESTATE)
			return kpl_errf(err, rc, "%s: withheld from this run: a pull request "
					"from a fork gets no secrets (unless its pipeline's "
					"registration says fork_secrets: true)", e->str);
		if (rc < 0 || !text)
			return kpl_errf(err, rc < 0 ? rc : KPL_ENOTFOUND,
					"%s: no such value", e->str);
		out->type = EXPR_T_STR;
		out->str = kpl_strdup(text);
		return 0;
	case EXPR_NOT:
		if ((rc = expr_eval(e->l, lookup, data, &l, err)) < 0)
			return rc;
		rc = to_bool(&l, &lb, err);
		expr_value_release(&l);
		if (rc < 0)
			return rc;
		out->type = EXPR_T_BOOL;
		out->b = !lb;
		return 0;
	case EXPR_AND:
	case EXPR_OR:
		if ((rc = expr_eval(e->l, lookup, data, &l, err)) < 0)
			return rc;
		rc = to_bool(&l, &lb, err);
		expr_value_release(&l);
		if (rc < 0)
			return rc;
		out->type = EXPR_T_BOOL;
		if (lb == (e->kind == EXPR_OR)) {
			out->b = lb;
			return 0;
		}
		if ((rc = expr_eval(e->r, lookup, data, &r, err)) < 0)
			return rc;
		rc = to_bool(&r, &rb, err);
		expr_value_release(&r);
		if (rc < 0)
			return rc;
		out->b = rb;
		return 0;
	case EXPR_EQ:
	case EXPR_NE:
		if ((rc = expr_eval(e->l, lookup, data, &l, err)) < 0)
			return rc;
		if ((rc = expr_eval(e->r, lookup, data, &r, err)) < 0) {
			expr_value_release(&l);
			return rc;
		}
		out->type = EXPR_T_BOOL;
		out->b = values_equal(&l, &r) == (e->kind == EXPR_EQ);
		expr_value_release(&l);
		expr_value_release(&r);
		return 0;
	case EXPR_KIND_LAST_:
		break;
	}
	BUG("expr kind %d", (int)e->kind);
}

int expr_eval_bool(const struct expr *e, expr_lookup_fn lookup, void *data,
		   bool *out, struct kpl_err *err)
{
	struct expr_value v;
	int rc = expr_eval(e, lookup, data, &v, err);
	if (rc < 0)
		return rc;
	rc = to_bool(&v, out, err);
	expr_value_release(&v);
	return rc;
}
