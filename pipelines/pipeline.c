/*
 * pipeline.c - pipeline files: text -> positioned tree (libyaml events; JSON
 * is checked by jansson first, then read as YAML flow syntax) -> validated
 * model. One model and one validator serve both formats.
 *
 * Validation collects diagnostics instead of stopping at the first, so
 * pipeline_validate_all can report them all; pipeline_parse returns the
 * first in file order.
 */
#include "pipelines/pipeline.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "pipelines/runs_on.h"
#include "pipelines/pl_internal.h"
#include "pipelines/reuse.h"
#include "pipelines/template.h"

/* Key paths longer than this are cut short in messages, on purpose: a
 * truncated path still says where to look. */
#define PATH_LEN 512
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* Default retry delays when `retries` leaves them out. */
#define DEFAULT_BACKOFF_MS 1000
#define DEFAULT_MAX_BACKOFF_MS (5 * 60 * 1000)
#define MAX_RETRIES 10


/* ---- diagnostics ---- */

static void diag_v(struct vctx *c, int code, struct pl_pos pos,
		   const char *path, const char *fmt, va_list ap)
{
	char msg[sizeof ((struct kpl_err *)0)->msg];

	if (c->n_diags >= PL_MAX_DIAGS) {
		c->n_dropped++;
		return;
	}
	vsnprintf(msg, sizeof msg, fmt, ap);
	if (!pos.file && c->origin.file) {
		pos.file = c->origin.file;
		pos.use_line = c->origin.use_line;
		pos.use_col = c->origin.use_col;
	}
	/* The instances of a matrix stage share their nodes' positions: one
	 * mistake is said once, not once per instance. */
	for (size_t i = 0; i < c->n_diags; i++) {
		const struct pl_diag *o = &c->diags[i];
		if (o->line == pos.line && o->col == pos.col && !o->file == !pos.file &&
		    o->use_line == pos.use_line &&
		    o->use_col == pos.use_col && !strcmp(o->message, msg))
			return;
	}
	c->diags = kpl_realloc(c->diags, (c->n_diags + 1) * sizeof *c->diags);
	struct pl_diag *d = &c->diags[c->n_diags++];
	d->line = pos.line;
	d->col = pos.col;
	d->path = kpl_strdup(path ? path : "");
	d->message = kpl_strdup(msg);
	d->code = code;
	d->file = NULL;
	d->use_line = d->use_col = 0;
	if (pos.file > 0 && c->files && (size_t)pos.file <= c->files->n) {
		d->file = kpl_strdup(c->files->v[pos.file - 1].path);
		d->use_line = pos.use_line;
		d->use_col = pos.use_col;
	}
}

void pl_diagf(struct vctx *c, int code, struct pl_pos pos, const char *path,
	      const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	diag_v(c, code, pos, path, fmt, ap);
	va_end(ap);
}

static void diag(struct vctx *c, struct pl_pos pos, const char *path,
		 const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void diag(struct vctx *c, struct pl_pos pos, const char *path,
		 const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	diag_v(c, KPL_EINVAL, pos, path, fmt, ap);
	va_end(ap);
}

static void diag_big(struct vctx *c, struct pl_pos pos, const char *path,
		     const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void diag_big(struct vctx *c, struct pl_pos pos, const char *path,
		     const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	diag_v(c, KPL_ETOOBIG, pos, path, fmt, ap);
	va_end(ap);
}

void pl_diags_free(struct pl_diag *diags, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(diags[i].path);
		free(diags[i].message);
		free(diags[i].file);
	}
	free(diags);
}

void pl_diag_format(const struct pl_diag *d, const char *file, char *buf,
		    size_t size)
{
	if (d->file) {
		if (d->path[0])
			snprintf(buf, size, "%s:%d:%d: %s: %s (used at %s:%d:%d)", d->file,
				 d->line, d->col, d->path, d->message,
				 file ? file : "pipeline", d->use_line, d->use_col);
		else
			snprintf(buf, size, "%s:%d:%d: %s (used at %s:%d:%d)", d->file, d->line,
				 d->col, d->message, file ? file : "pipeline", d->use_line,
				 d->use_col);
		return;
	}
	if (d->path[0])
		snprintf(buf, size, "%s:%d:%d: %s: %s", file ? file : "pipeline",
			 d->line, d->col, d->path, d->message);
	else
		snprintf(buf, size, "%s:%d:%d: %s", file ? file : "pipeline",
			 d->line, d->col, d->message);
}

/* ---- paths ---- */

static void path_key(char *out, const char *base, const char *key)
{
	if (base[0])
		snprintf(out, PATH_LEN, "%s.%.200s", base, key);
	else
		snprintf(out, PATH_LEN, "%.200s", key);
}

static void path_idx(char *out, const char *base, size_t i)
{
	snprintf(out, PATH_LEN, "%.480s[%zu]", base, i);
}

/* ---- the tree ---- */

const struct pl_node *pl_map_get(const struct pl_node *map, const char *key)
{
	if (!map || map->type != PL_MAP)
		return NULL;
	for (size_t i = 0; i < map->n; i++)
		if (strcmp(map->keys[i]->scalar, key) == 0)
			return map->items[i];
	return NULL;
}

void pl_node_free(struct pl_node *n)
{
	if (!n)
		return;
	for (size_t i = 0; i < n->n; i++) {
		if (n->keys)
			pl_node_free(n->keys[i]);
		pl_node_free(n->items[i]);
	}
	free(n->keys);
	free(n->items);
	free(n->scalar);
	free(n);
}

struct frame {
	struct pl_node *node;
	size_t cap;
	struct pl_node *key; /* PL_MAP: the key waiting for its value */
	char *path;
};

struct builder {
	struct vctx *c;
	yaml_parser_t parser;
	struct frame stack[KPL_MAX_DEPTH];
	int depth;
	size_t n_nodes;
	struct pl_node *root;
	int n_docs;
	bool failed;
};

static struct pl_pos mark_pos(yaml_mark_t m)
{
	return (struct pl_pos){ (int)m.line + 1, (int)m.column + 1 };
}

/* Position of byte offset off in the text, for errors libyaml reports only
 * as an offset (bad UTF-8). Columns count characters, like libyaml. */
static struct pl_pos offset_pos(const char *text, size_t len, size_t off)
{
	struct pl_pos pos = { 1, 1 };
	for (size_t i = 0; i < off && i < len; i++) {
		if (text[i] == '\n') {
			pos.line++;
			pos.col = 1;
		} else if (((unsigned char)text[i] & 0xC0) != 0x80) {
			pos.col++;
		}
	}
	return pos;
}

/* The path of the node being read now, for syntax errors. */
static const char *builder_path(const struct builder *b)
{
	return b->depth ? b->stack[b->depth - 1].path : "";
}

static void build_fail(struct builder *b, int code, struct pl_pos pos,
		       const char *path, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));
static void build_fail(struct builder *b, int code, struct pl_pos pos,
		       const char *path, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	diag_v(b->c, code, pos, path, fmt, ap);
	va_end(ap);
	b->failed = true;
}

bool pl_scalar_is_null(const struct pl_node *n)
{
	return n->type == PL_SCALAR && n->plain &&
	       (!n->scalar[0] || !strcmp(n->scalar, "~") ||
		!strcmp(n->scalar, "null") || !strcmp(n->scalar, "Null") ||
		!strcmp(n->scalar, "NULL"));
}

static int cmp_key_ptr(const void *a, const void *b)
{
	const struct pl_node *x = *(const struct pl_node *const *)a;
	const struct pl_node *y = *(const struct pl_node *const *)b;
	int c = strcmp(x->scalar, y->scalar);
	if (c)
		return c;
	if (x->pos.line != y->pos.line)
		return x->pos.line - y->pos.line;
	return x->pos.col - y->pos.col;
}

/* Duplicate keys are checked when a mapping ends, by sorting, so a huge
 * mapping costs n log n rather than n^2. Reports the duplicate that comes
 * first in the file. */
static void check_dup_keys(struct builder *b, const struct frame *f)
{
	struct pl_node *map = f->node;
	const struct pl_node *dup = NULL, *first = NULL;

	if (map->n < 2)
		return;
	struct pl_node **keys = kpl_malloc(map->n * sizeof *keys);
	memcpy(keys, map->keys, map->n * sizeof *keys);
	qsort(keys, map->n, sizeof *keys, cmp_key_ptr);
	for (size_t i = 1; i < map->n; i++) {
		if (strcmp(keys[i]->scalar, keys[i - 1]->scalar) != 0)
			continue;
		/* keys[i - 1] is the earliest of its run only at the run's
		 * start; walk back to it. */
		size_t j = i - 1;
		while (j > 0 && !strcmp(keys[j - 1]->scalar, keys[i]->scalar))
			j--;
		if (!dup || keys[i]->pos.line < dup->pos.line ||
		    (keys[i]->pos.line == dup->pos.line &&
		     keys[i]->pos.col < dup->pos.col)) {
			dup = keys[i];
			first = keys[j];
		}
	}
	if (dup) {
		char path[PATH_LEN];
		path_key(path, f->path, dup->scalar);
		build_fail(b, KPL_EINVAL, dup->pos, path,
			   "duplicate key \"%s\" (first at %d:%d)", dup->scalar,
			   first->pos.line, first->pos.col);
	}
	free(keys);
}

static void grow(struct pl_node *n, size_t *cap, bool with_keys)
{
	if (n->n < *cap)
		return;
	*cap = *cap ? *cap * 2 : 4;
	n->items = kpl_realloc(n->items, *cap * sizeof *n->items);
	if (with_keys)
		n->keys = kpl_realloc(n->keys, *cap * sizeof *n->keys);
}

/* Links n into its parent (or makes it the root) and works out its path.
 * Takes ownership of n even on failure. */
static int attach(struct builder *b, struct pl_node *n, char *path_out)
{
	if (b->depth == 0) {
		b->root = n;
		path_out[0] = '\0';
		return 0;
	}
	struct frame *f = &b->stack[b->depth - 1];
	struct pl_node *parent = f->node;
	if (parent->type == PL_SEQ) {
		grow(parent, &f->cap, false);
		path_idx(path_out, f->path, parent->n);
		parent->items[parent->n++] = n;
		return 0;
	}
	if (!f->key) {
		/* n is a key. */
		if (n->type != PL_SCALAR || pl_scalar_is_null(n)) {
			build_fail(b, KPL_EINVAL, n->pos, f->path,
				   "keys must be strings, found %s",
				   n->type == PL_MAP   ? "a mapping as a key" :
				   n->type == PL_SEQ   ? "a list as a key" :
							 "an empty (null) key");
			pl_node_free(n);
			return -1;
		}
		f->key = n;
		path_out[0] = '\0';
		return 0;
	}
	grow(parent, &f->cap, true);
	path_key(path_out, f->path, f->key->scalar);
	parent->keys[parent->n] = f->key;
	parent->items[parent->n++] = n;
	f->key = NULL;
	return 0;
}

static struct pl_node *node_new(struct builder *b, enum pl_node_type type,
				yaml_mark_t mark)
{
	if (++b->n_nodes > PL_MAX_NODES) {
		build_fail(b, KPL_ETOOBIG, mark_pos(mark), builder_path(b),
			   "more than %d values in the document", PL_MAX_NODES);
		return NULL;
	}
	struct pl_node *n = kpl_calloc(1, sizeof *n);
	n->type = type;
	n->pos = mark_pos(mark);
	n->pos.file = b->c->origin.file;
	n->pos.use_line = b->c->origin.use_line;
	n->pos.use_col = b->c->origin.use_col;
	return n;
}

/* Anchors, aliases and tags make one value mean another; kpl files say
 * what they mean in place, so both are refused. */
static int check_props(struct builder *b, const yaml_event_t *ev,
		       const yaml_char_t *anchor, const yaml_char_t *tag)
{
	if (anchor) {
		build_fail(b, KPL_EINVAL, mark_pos(ev->start_mark),
			   builder_path(b),
			   "anchors (&%.64s) and aliases are not supported: write the value out",
			   (const char *)anchor);
		return -1;
	}
	if (tag) {
		build_fail(b, KPL_EINVAL, mark_pos(ev->start_mark),
			   builder_path(b),
			   "tags (%.64s) are not supported: remove the tag",
			   (const char *)tag);
		return -1;
	}
	return 0;
}

static void on_scalar(struct builder *b, const yaml_event_t *ev)
{
	const char *v = (const char *)ev->data.scalar.value;
	size_t len = ev->data.scalar.length;
	char path[PATH_LEN];

	if (check_props(b, ev, ev->data.scalar.anchor, ev->data.scalar.tag) < 0)
		return;
	if (len > KPL_MAX_VALUE_LEN) {
		build_fail(b, KPL_ETOOBIG, mark_pos(ev->start_mark),
			   builder_path(b),
			   "a value of %zu bytes; the limit is %d", len,
			   KPL_MAX_VALUE_LEN);
		return;
	}
	if (memchr(v, '\0', len)) {
		build_fail(b, KPL_EINVAL, mark_pos(ev->start_mark),
			   builder_path(b), "a value holds a NUL character");
		return;
	}
	struct pl_node *n = node_new(b, PL_SCALAR, ev->start_mark);
	if (!n)
		return;
	n->scalar = kpl_strndup(v, len);
	switch (ev->data.scalar.style) {
	case YAML_SINGLE_QUOTED_SCALAR_STYLE: n->style = '\''; break;
	case YAML_DOUBLE_QUOTED_SCALAR_STYLE: n->style = '"'; break;
	case YAML_LITERAL_SCALAR_STYLE: n->style = '|'; break;
	case YAML_FOLDED_SCALAR_STYLE: n->style = '>'; break;
	default: n->style = 0; break;
	}
	n->plain = n->style == 0;
	if (ev->start_mark.line == ev->end_mark.line &&
	    (n->style == 0 || n->style == '\'' || n->style == '"')) {
		/* Escapes always make the source longer than the value. */
		size_t chars = 0;
		for (size_t i = 0; i < len; i++)
			chars += ((unsigned char)v[i] & 0xC0) != 0x80;
		size_t span = ev->end_mark.column - ev->start_mark.column;
		n->verbatim = span == chars + (n->style ? 2 : 0);
	}
	attach(b, n, path);
}

static void on_start(struct builder *b, const yaml_event_t *ev,
		     enum pl_node_type type)
{
	const yaml_char_t *anchor = type == PL_MAP ? ev->data.mapping_start.anchor
						   : ev->data.sequence_start.anchor;
	const yaml_char_t *tag = type == PL_MAP ? ev->data.mapping_start.tag
						: ev->data.sequence_start.tag;
	char path[PATH_LEN];

	if (check_props(b, ev, anchor, tag) < 0)
		return;
	if (b->depth >= KPL_MAX_DEPTH) {
		build_fail(b, KPL_ETOOBIG, mark_pos(ev->start_mark),
			   builder_path(b),
			   "nested deeper than %d levels", KPL_MAX_DEPTH);
		return;
	}
	struct pl_node *n = node_new(b, type, ev->start_mark);
	if (!n || attach(b, n, path) < 0)
		return;
	struct frame *f = &b->stack[b->depth++];
	memset(f, 0, sizeof *f);
	f->node = n;
	f->path = kpl_strdup(path);
}

static void on_end(struct builder *b)
{
	if (b->depth <= 0)
		BUG("end event with an empty stack");
	struct frame *f = &b->stack[--b->depth];
	if (f->node->type == PL_MAP)
		check_dup_keys(b, f);
	free(f->path);
	f->path = NULL;
}

static void yaml_fail(struct builder *b)
{
	yaml_parser_t *y = &b->parser;
	struct pl_pos pos;
	char ctx[160] = "";

	if (y->error == YAML_READER_ERROR) {
		pos = offset_pos(b->c->text, b->c->len, y->problem_offset);
		build_fail(b, KPL_EINVAL, pos, "", "cannot read the text: %s",
			   y->problem ? y->problem : "bad encoding");
		return;
	}
	pos = mark_pos(y->problem_mark);
	if (y->context)
		snprintf(ctx, sizeof ctx, " (%s at %zu:%zu)", y->context,
			 y->context_mark.line + 1, y->context_mark.column + 1);
	build_fail(b, KPL_EINVAL, pos, builder_path(b), "syntax error: %s%s",
		   y->problem ? y->problem : "unreadable YAML", ctx);
}

/* Reads text into a tree. Returns the root (NULL for an empty document or
 * after an error, which is in c's diagnostics). */
static struct pl_node *build_tree(struct vctx *c, const char *text, size_t len)
{
	struct builder b = { .c = c };
	bool done = false;

	if (!yaml_parser_initialize(&b.parser))
		BUG("yaml_parser_initialize failed");
	yaml_parser_set_input_string(&b.parser, (const unsigned char *)text, len);
	yaml_parser_set_encoding(&b.parser, YAML_UTF8_ENCODING);
	while (!done && !b.failed) {
		yaml_event_t ev;
		if (!yaml_parser_parse(&b.parser, &ev)) {
			yaml_fail(&b);
			break;
		}
		switch (ev.type) {
		case YAML_DOCUMENT_START_EVENT:
			if (++b.n_docs > 1)
				build_fail(&b, KPL_EINVAL, mark_pos(ev.start_mark), "",
					   "a second document: one file holds one pipeline, remove the \"---\"");
			break;
		case YAML_ALIAS_EVENT:
			build_fail(&b, KPL_EINVAL, mark_pos(ev.start_mark),
				   builder_path(&b),
				   "aliases (*%.64s) and anchors are not supported: write the value out",
				   (const char *)ev.data.alias.anchor);
			break;
		case YAML_SCALAR_EVENT:
			on_scalar(&b, &ev);
			break;
		case YAML_SEQUENCE_START_EVENT:
			on_start(&b, &ev, PL_SEQ);
			break;
		case YAML_MAPPING_START_EVENT:
			on_start(&b, &ev, PL_MAP);
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			on_end(&b);
			break;
		case YAML_STREAM_END_EVENT:
			done = true;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	while (b.depth > 0) {
		struct frame *f = &b.stack[--b.depth];
		pl_node_free(f->key);
		free(f->path);
	}
	yaml_parser_delete(&b.parser);
	if (b.failed) {
		pl_node_free(b.root);
		return NULL;
	}
	return b.root;
}

struct pl_node *pl_build_tree(struct vctx *c, const char *text, size_t len,
			      struct pl_pos origin)
{
	struct pl_pos saved = c->origin;
	const char *saved_text = c->text;
	size_t saved_len = c->len;
	struct pl_node *root;

	c->origin = origin;
	c->text = text;
	c->len = len;
	root = build_tree(c, text, len);
	c->origin = saved;
	c->text = saved_text;
	c->len = saved_len;
	return root;
}

/* ---- scalar checks ---- */

static const char *node_what(const struct pl_node *n, char *buf, size_t size)
{
	if (n->type == PL_MAP)
		return "a mapping";
	if (n->type == PL_SEQ)
		return "a list";
	if (pl_scalar_is_null(n))
		return "nothing (null)";
	snprintf(buf, size, "%s \"%.60s%s\"",
		 n->plain ? "the value" : "the quoted string", n->scalar,
		 strlen(n->scalar) > 60 ? "..." : "");
	return buf;
}

static const char *want_str(struct vctx *c, const struct pl_node *n,
			    const char *path)
{
	char what[128];

	if (n->type == PL_SCALAR && !pl_scalar_is_null(n))
		return n->scalar;
	diag(c, n->pos, path, "expected a string, found %s",
	     node_what(n, what, sizeof what));
	return NULL;
}

static bool want_map(struct vctx *c, const struct pl_node *n, const char *path)
{
	char what[128];

	if (n->type == PL_MAP)
		return true;
	diag(c, n->pos, path, "expected a mapping (key: value lines), found %s",
	     node_what(n, what, sizeof what));
	return false;
}

static bool want_seq(struct vctx *c, const struct pl_node *n, const char *path)
{
	char what[128];

	if (n->type == PL_SEQ)
		return true;
	diag(c, n->pos, path, "expected a list, found %s",
	     node_what(n, what, sizeof what));
	return false;
}

static int want_bool(struct vctx *c, const struct pl_node *n, const char *path,
		     bool *out)
{
	char what[128];

	if (n->type == PL_SCALAR &&
	    (!strcmp(n->scalar, "true") || !strcmp(n->scalar, "false"))) {
		if (n->plain) {
			*out = n->scalar[0] == 't';
			return 0;
		}
		diag(c, n->pos, path,
		     "expected a bool, found the quoted string \"%s\": remove the quotes",
		     n->scalar);
		return -1;
	}
	diag(c, n->pos, path, "expected a bool (true or false), found %s",
	     node_what(n, what, sizeof what));
	return -1;
}

/* Plain decimal: optional '-', digits, within int64. */
static bool parse_int(const char *s, int64_t *out)
{
	const char *p = s;
	char *end;

	if (*p == '-')
		p++;
	if (!*p)
		return false;
	for (; *p; p++)
		if (*p < '0' || *p > '9')
			return false;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno == ERANGE)
		return false;
	*out = v;
	return true;
}

static int want_int(struct vctx *c, const struct pl_node *n, const char *path,
		    int64_t *out)
{
	char what[128];
	int64_t v;

	if (n->type == PL_SCALAR && parse_int(n->scalar, &v)) {
		if (n->plain) {
			*out = v;
			return 0;
		}
		diag(c, n->pos, path,
		     "expected a whole number, found the quoted string \"%s\": remove the quotes",
		     n->scalar);
		return -1;
	}
	diag(c, n->pos, path, "expected a whole number, found %s",
	     node_what(n, what, sizeof what));
	return -1;
}

static int want_duration(struct vctx *c, const struct pl_node *n,
			 const char *path, int64_t *out)
{
	const char *why;
	const char *s = want_str(c, n, path);

	if (!s)
		return -1;
	if (pl_duration_parse(s, out, &why) < 0) {
		diag(c, n->pos, path, "bad duration \"%.60s\": %s", s, why);
		return -1;
	}
	return 0;
}

/* Edit distance of two short strings (0 for long ones' prefixes is fine:
 * this only picks a suggestion for a typo). */
static size_t edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	size_t row[65];

	if (la > 64 || lb > 64)
		return 99;
	for (size_t j = 0; j <= lb; j++)
		row[j] = j;
	for (size_t i = 1; i <= la; i++) {
		size_t diag_prev = row[0];
		row[0] = i;
		for (size_t j = 1; j <= lb; j++) {
			size_t up = row[j];
			size_t best = diag_prev + (a[i - 1] != b[j - 1]);
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag_prev = up;
		}
	}
	return row[lb];
}

/*
 * A when written as GitHub Actions writes its conditions, wrapped whole in
 * ${{ }}, means the expression inside: sets *start and *len (the whole
 * string on entry) to the inside, trimmed. Anything else is left as it is.
 */
static void when_unwrap(const char *s, size_t *start, size_t *len)
{
	size_t b = 0, e = *len;

	while (b < e && isspace((unsigned char)s[b]))
		b++;
	while (e > b && isspace((unsigned char)s[e - 1]))
		e--;
	if (e - b < 5 || strncmp(s + b, "${{", 3) || strncmp(s + e - 2, "}}", 2))
		return;
	/* "${{ a }} == ${{ b }}" is two templates, not one wrapped expression. */
	for (size_t i = b + 3; i + 2 < e; i++)
		if (!strncmp(s + i, "${{", 3) || !strncmp(s + i, "}}", 2))
			return;
	b += 3;
	e -= 2;
	while (b < e && isspace((unsigned char)s[b]))
		b++;
	while (e > b && isspace((unsigned char)s[e - 1]))
		e--;
	*start = b;
	*len = e - b;
}

/* The allowed word closest to k, if close enough to be a typo. */
static const char *suggest(const char *k, const char *const *allowed)
{
	const char *best = NULL;
	size_t best_d = 3;

	for (size_t j = 0; allowed[j]; j++) {
		size_t d = edit_distance(k, allowed[j]);
		if (d < best_d) {
			best_d = d;
			best = allowed[j];
		}
	}
	return best;
}

/* Reports keys of map not in allowed (a NULL-ended list). */
static void check_keys(struct vctx *c, const struct pl_node *map,
		       const char *path, const char *const *allowed)
{
	char list[512] = "";
	char kpath[PATH_LEN];

	for (size_t i = 0; i < map->n; i++) {
		const char *k = map->keys[i]->scalar;
		size_t j;
		for (j = 0; allowed[j]; j++)
			if (!strcmp(k, allowed[j]))
				break;
		if (allowed[j])
			continue;
		if (!list[0])
			for (j = 0; allowed[j]; j++) {
				size_t used = strlen(list);
				snprintf(list + used, sizeof list - used, "%s%s", j ? ", " : "",
					 allowed[j]);
			}
		path_key(kpath, path, k);
		const char *near = suggest(k, allowed);
		if (near)
			diag(c, map->keys[i]->pos, kpath,
			     "unknown key \"%.60s\": did you mean \"%s\"? (allowed: %s)",
			     k, near, list);
		else
			diag(c, map->keys[i]->pos, kpath,
			     "unknown key \"%.60s\" (allowed: %s)", k, list);
	}
}

/* The value of key in map, or NULL after reporting it missing at the
 * mapping's own position. */
static const struct pl_node *require(struct vctx *c, const struct pl_node *map,
				     const char *path, const char *key)
{
	const struct pl_node *n = pl_map_get(map, key);
	char kpath[PATH_LEN];

	if (!n) {
		const char *want[] = { key, NULL };
		const char *typo = NULL;
		for (size_t i = 0; i < map->n && !typo; i++)
			if (suggest(map->keys[i]->scalar, want))
				typo = map->keys[i]->scalar;
		path_key(kpath, path, key);
		if (typo)
			diag(c, map->pos, kpath, "missing required key \"%s\" (is \"%.60s\" a typo?)",
			     key, typo);
		else
			diag(c, map->pos, kpath, "missing required key \"%s\"", key);
	}
	return n;
}

enum name_rule { NAME_PIPELINE, NAME_STAGE, NAME_PARAM, NAME_ENV };

static bool name_char_ok(enum name_rule rule, char ch, bool first)
{
	bool lower = ch >= 'a' && ch <= 'z';
	bool upper = ch >= 'A' && ch <= 'Z';
	bool digit = ch >= '0' && ch <= '9';

	switch (rule) {
	case NAME_PIPELINE:
		return lower || digit || (!first && (ch == '_' || ch == '.' || ch == '-'));
	case NAME_STAGE:
	case NAME_PARAM:
		return lower || upper || digit || ch == '_' || ch == '-';
	case NAME_ENV:
		return lower || upper || ch == '_' || (!first && digit);
	}
	return false;
}

static const char *const name_rule_text[] = {
	[NAME_PIPELINE] = "use lowercase letters, digits, '_', '.' and '-', starting with a letter or digit",
	[NAME_STAGE] = "use letters, digits, '_' and '-'",
	[NAME_PARAM] = "use letters, digits, '_' and '-'",
	[NAME_ENV] = "use letters, digits and '_', not starting with a digit",
};

/* Checks a name (from node n, for messages); 0 if good. */
static int check_name(struct vctx *c, const struct pl_node *n, const char *path,
		      const char *name, enum name_rule rule, const char *what)
{
	size_t len = strlen(name);

	if (len > KPL_MAX_NAME_LEN) {
		diag_big(c, n->pos, path, "%s is %zu characters long; the limit is %d",
			 what, len, KPL_MAX_NAME_LEN);
		return -1;
	}
	for (size_t i = 0; i < len || i == 0; i++) {
		if (i == len || !name_char_ok(rule, name[i], i == 0)) {
			diag(c, n->pos, path, "%s \"%.60s\" is not valid: %s", what,
			     name, name_rule_text[rule]);
			return -1;
		}
	}
	return 0;
}

/* ---- params ---- */

static const char *const type_names[] = {
	[PL_TYPE_STRING] = "string", [PL_TYPE_INT] = "int", [PL_TYPE_BOOL] = "bool",
};

/* Checks a default or enum value node against a type; returns its text. */
static const char *param_value(struct vctx *c, const struct pl_node *n,
			       const char *path, enum pl_param_type type)
{
	int64_t iv;
	bool bv;

	switch (type) {
	case PL_TYPE_STRING:
		return want_str(c, n, path);
	case PL_TYPE_INT:
		return want_int(c, n, path, &iv) < 0 ? NULL : n->scalar;
	case PL_TYPE_BOOL:
		return want_bool(c, n, path, &bv) < 0 ? NULL : n->scalar;
	}
	BUG("param type %d", (int)type);
}

static void parse_param(struct vctx *c, struct pl_param *pp,
			const struct pl_node *v, const char *path)
{
	static const char *const keys[] = { "type", "default", "required",
					     "enum", "description", NULL };
	const struct pl_node *n;
	char kpath[PATH_LEN], ipath[PATH_LEN];

	if (pl_scalar_is_null(v))
		return; /* `name:` alone: an optional string */
	if (!want_map(c, v, path))
		return;
	check_keys(c, v, path, keys);
	if ((n = pl_map_get(v, "type"))) {
		path_key(kpath, path, "type");
		const char *t = want_str(c, n, kpath);
		size_t i;
		for (i = 0; t && i < KPL_ARRAY_SIZE(type_names); i++)
			if (!strcmp(t, type_names[i]))
				break;
		if (t && i == KPL_ARRAY_SIZE(type_names))
			diag(c, n->pos, kpath, "unknown type \"%.60s\" (allowed: string, int, bool)", t);
		else if (t)
			pp->type = (enum pl_param_type)i;
	}
	if ((n = pl_map_get(v, "required"))) {
		path_key(kpath, path, "required");
		want_bool(c, n, kpath, &pp->required);
	}
	if ((n = pl_map_get(v, "description"))) {
		path_key(kpath, path, "description");
		want_str(c, n, kpath);
	}
	if ((n = pl_map_get(v, "enum"))) {
		path_key(kpath, path, "enum");
		if (want_seq(c, n, kpath)) {
			if (n->n == 0)
				diag(c, n->pos, kpath, "an empty enum allows no value: list the allowed values");
			pp->enum_values = kpl_calloc(n->n ? n->n : 1, sizeof *pp->enum_values);
			for (size_t i = 0; i < n->n; i++) {
				path_idx(ipath, kpath, i);
				const char *ev = param_value(c, n->items[i], ipath, pp->type);
				if (!ev)
					continue;
				bool dup = false;
				for (size_t j = 0; j < pp->n_enum; j++)
					dup |= !strcmp(pp->enum_values[j], ev);
				if (dup) {
					diag(c, n->items[i]->pos, ipath, "\"%.60s\" is listed twice", ev);
					continue;
				}
				pp->enum_values[pp->n_enum++] = kpl_strdup(ev);
			}
		}
	}
	if ((n = pl_map_get(v, "default"))) {
		path_key(kpath, path, "default");
		const char *d = param_value(c, n, kpath, pp->type);
		if (d && pp->required) {
			diag(c, n->pos, kpath, "a required param takes no default: drop one of them");
		} else if (d && pp->n_enum) {
			bool found = false;
			for (size_t j = 0; j < pp->n_enum; j++)
				found |= !strcmp(pp->enum_values[j], d);
			if (!found)
				diag(c, n->pos, kpath, "default \"%.60s\" is not one of the enum values", d);
		}
		if (d)
			pp->def = kpl_strdup(d);
	}
}

static void parse_params(struct vctx *c, const struct pl_node *n)
{
	struct pipeline *p = c->p;
	char path[PATH_LEN];

	if (!want_map(c, n, "params"))
		return;
	if (n->n > KPL_MAX_PARAMS) {
		diag_big(c, n->pos, "params", "%zu params; the limit is %d", n->n,
			 KPL_MAX_PARAMS);
		return;
	}
	p->params = kpl_calloc(n->n ? n->n : 1, sizeof *p->params);
	for (size_t i = 0; i < n->n; i++) {
		const struct pl_node *k = n->keys[i];
		path_key(path, "params", k->scalar);
		if (check_name(c, k, path, k->scalar, NAME_PARAM, "param name") < 0)
			continue;
		struct pl_param *pp = &p->params[p->n_params++];
		pp->name = kpl_strdup(k->scalar);
		pp->pos = k->pos;
		pp->type = PL_TYPE_STRING;
		parse_param(c, pp, n->items[i], path);
	}
}

/* ---- env ---- */

static void parse_env(struct vctx *c, const struct pl_node *n, const char *path,
		      struct pl_env **out, size_t *n_out)
{
	char kpath[PATH_LEN];

	if (!want_map(c, n, path))
		return;
	*out = kpl_calloc(n->n ? n->n : 1, sizeof **out);
	for (size_t i = 0; i < n->n; i++) {
		const struct pl_node *k = n->keys[i];
		path_key(kpath, path, k->scalar);
		if (check_name(c, k, kpath, k->scalar, NAME_ENV, "variable name") < 0)
			continue;
		const char *v = want_str(c, n->items[i], kpath);
		if (!v)
			continue;
		struct pl_env *e = &(*out)[(*n_out)++];
		e->name = kpl_strdup(k->scalar);
		e->value = kpl_strdup(v);
		e->pos = k->pos;
	}
}

/* ---- references in `when:` and templates ---- */

/* Position of byte offset off inside scalar n: exact for one-line scalars
 * written without escapes, else the scalar's own start. */
static struct pl_pos pos_in_scalar(const struct pl_node *n, size_t off)
{
	struct pl_pos pos = n->pos;

	if (!n->verbatim)
		return pos;
	if (n->style)
		pos.col++;
	for (size_t i = 0; i < off && n->scalar[i]; i++)
		pos.col += ((unsigned char)n->scalar[i] & 0xC0) != 0x80;
	return pos;
}

static int find_stage(const struct vctx *c, const char *name, int list)
{
	const struct pipeline *p = c->p;

	for (size_t i = 0; i < p->n_stages; i++) {
		if (!p->stages[i].name || strcmp(p->stages[i].name, name))
			continue;
		if (list < 0 || p->stages[i].is_finally == (list == 1))
			return (int)i;
	}
	return -1;
}

struct ref_ctx {
	struct vctx *c;
	const struct pl_node *n; /* the scalar holding the expression */
	const char *path;
	int stage;   /* referencing stage, -1 outside stages */
	size_t base; /* offset of the expression inside n->scalar */
};

static int check_ref(void *data, const struct expr *ref)
{
	struct ref_ctx *r = data;
	struct vctx *c = r->c;
	const struct pipeline *p = c->p;
	struct pl_pos pos = pos_in_scalar(r->n, r->base + ref->off);
	const char *root = ref->part[0];

	if (!strcmp(root, "params")) {
		for (size_t i = 0; i < p->n_params; i++)
			if (!strcmp(p->params[i].name, ref->part[1]))
				return 0;
		diag(c, pos, r->path, "unknown param \"%.60s\" in %s: declare it under params",
		     ref->part[1], ref->str);
		return 0;
	}
	if (strcmp(root, "stages") != 0)
		return 0; /* env., run.id and secrets. need nothing declared */
	const char *use = ref->n_part == 3 ? "read its state" : "use its outputs";
	if (r->stage < 0) {
		diag(c, pos, r->path, "%s: stages can only be referenced inside a stage",
		     ref->str);
		return 0;
	}
	int k = find_stage(c, ref->part[1], -1);
	if (k < 0) {
		diag(c, pos, r->path, "unknown stage \"%.60s\" in %s", ref->part[1],
		     ref->str);
		return 0;
	}
	const struct pl_stage *self = &p->stages[r->stage];
	/* Prefer the stage in the same list when a name is in both (an error
	 * reported elsewhere). */
	int same = find_stage(c, ref->part[1], self->is_finally);
	if (same >= 0)
		k = same;
	const struct pl_stage *target = &p->stages[k];
	/* Finally stages run once the whole graph has ended, so every main
	 * stage is settled by then. */
	if (self->is_finally && !target->is_finally)
		return 0;
	if (!self->is_finally && target->is_finally) {
		diag(c, pos, r->path, "%s: \"%s\" is a finally stage and runs after this one",
		     ref->str, target->name);
		return 0;
	}
	if (k == r->stage) {
		diag(c, pos, r->path, "%s: a stage cannot %s of itself", ref->str,
		     ref->n_part == 3 ? "read the state" : "use the outputs");
		return 0;
	}
	if (!c->reach || !c->reach[(size_t)r->stage * p->n_stages + (size_t)k])
		diag(c, pos, r->path,
		     "%s: stage \"%s\" is not in this stage's needs; add it to needs to %s",
		     ref->str, target->name, use);
	return 0;
}

static int check_alone(void *data, const struct expr *ref)
{
	struct ref_ctx *r = data;

	if (!strcmp(ref->part[0], "canary"))
		diag(r->c, pos_in_scalar(r->n, r->base + ref->off), r->path,
		     "%s: write it alone, as ${{ %s }} (it is filled in by the stage)",
		     ref->str, ref->str);
	return 0;
}

/* Checks the templates of one string value. */
static void check_template(struct vctx *c, const struct pl_node *n,
			   const char *path, int stage)
{
	struct tpl *t;
	struct kpl_err err = { 0 };
	size_t off = 0;

	if (n->type != PL_SCALAR || !tpl_has_template(n->scalar))
		return;
	if (tpl_parse(n->scalar, EXPR_ROOTS_TEMPLATE | c->with_roots, &t, &off, &err) < 0) {
		diag(c, pos_in_scalar(n, off), path, "%s", err.msg);
		return;
	}
	for (size_t i = 0; i < t->n_parts; i++) {
		if (!t->parts[i].expr)
			continue;
		struct ref_ctx r = { c, n, path, stage, t->parts[i].expr_off };
		/* The engine leaves a with_roots reference as written, for the
		 * kind to fill in: so it must be the whole expression. */
		if (c->with_roots && t->parts[i].expr->kind != EXPR_REF)
			expr_walk_refs(t->parts[i].expr, check_alone, &r);
		expr_walk_refs(t->parts[i].expr, check_ref, &r);
	}
	tpl_free(t);
}

static int check_secret_in_argv(void *data, const struct expr *ref)
{
	struct ref_ctx *r = data;

	if (!strcmp(ref->part[0], "secrets") && ref->n_part == 2 && r->c->in_pod_spec)
		diag(r->c, pos_in_scalar(r->n, r->base + ref->off), r->path,
		     "%s would be in the Pod spec, which every reader of pods sees: pass "
		     "secrets through env (env: { %s: \"${{ %s }}\" }), which a pod stage "
		     "gets through a Kubernetes Secret", ref->str, ref->part[1], ref->str);
	else if (!strcmp(ref->part[0], "secrets") && ref->n_part == 2)
		diag(r->c, pos_in_scalar(r->n, r->base + ref->off), r->path,
		     "%s would be in a command line, which every user of the host can read "
		     "(/proc/PID/cmdline, ps): pass secrets through env (env: { %s: "
		     "\"${{ %s }}\" }) and use $%s", ref->str, ref->part[1], ref->str,
		     ref->part[1]);
	return 0;
}

/* Refuses ${{ secrets.X }} in the strings under n, a `with` key of the
 * kind's argv_keys. */
static void check_no_secrets(struct vctx *c, const struct pl_node *n, const char *path,
			     int stage)
{
	char sub[PATH_LEN];
	struct tpl *t;
	struct kpl_err err = { 0 };
	size_t off = 0;

	if (n->type == PL_SCALAR) {
		if (!tpl_has_template(n->scalar) ||
		    tpl_parse(n->scalar, EXPR_ROOTS_TEMPLATE | c->with_roots, &t, &off, &err) < 0)
			return; /* check_template reports a bad one */
		for (size_t i = 0; i < t->n_parts; i++) {
			struct ref_ctx r = { c, n, path, stage, t->parts[i].expr_off };
			if (t->parts[i].expr)
				expr_walk_refs(t->parts[i].expr, check_secret_in_argv, &r);
		}
		tpl_free(t);
		return;
	}
	for (size_t i = 0; i < n->n; i++) {
		if (n->type == PL_MAP)
			path_key(sub, path, n->keys[i]->scalar);
		else
			path_idx(sub, path, i);
		check_no_secrets(c, n->items[i], sub, stage);
	}
}

/* Every string under n (a `with` tree), keys excluded. */
static void check_templates_deep(struct vctx *c, const struct pl_node *n,
				 const char *path, int stage)
{
	char sub[PATH_LEN];

	if (n->type == PL_SCALAR) {
		check_template(c, n, path, stage);
		return;
	}
	for (size_t i = 0; i < n->n; i++) {
		if (n->type == PL_MAP)
			path_key(sub, path, n->keys[i]->scalar);
		else
			path_idx(sub, path, i);
		check_templates_deep(c, n->items[i], sub, stage);
	}
}

/* ---- stages ---- */

static const struct pl_kind *find_kind(const struct vctx *c, const char *kind)
{
	for (size_t i = 0; i < c->n_kinds; i++)
		if (!strcmp(c->kinds[i].kind, kind))
			return &c->kinds[i];
	return NULL;
}

/* A kind's checker writes "file:line:col: path: message"; take it apart so
 * validate_all can return it like any other diagnostic. */
static void diag_from_kind(struct vctx *c, const struct pl_node *at,
			   const char *path, const struct kpl_err *err)
{
	const char *m = err->msg;
	size_t flen = strlen(c->file);
	struct pl_pos pos = at->pos;
	int line, col, used = 0;
	char p[PATH_LEN];

	snprintf(p, sizeof p, "%s", path);
	if (!strncmp(m, c->file, flen) && m[flen] == ':' &&
	    sscanf(m + flen, ":%d:%d: %n", &line, &col, &used) == 2 && used) {
		pos.line = line;
		pos.col = col;
		m += flen + (size_t)used;
	} else if (!strncmp(m, c->file, flen) && !strncmp(m + flen, ": ", 2)) {
		/* No position (a missing `with` has none): keep at's. */
		m += flen + 2;
	}
	/* The path may have grown ("stages[0].with.command"). */
	const char *sep = strstr(m, ": ");
	if (sep && !strncmp(m, path, strlen(path)) && (size_t)(sep - m) < sizeof p) {
		snprintf(p, sizeof p, "%.*s", (int)(sep - m), m);
		m = sep + 2;
	}
	diag(c, pos, p, "%s", m[0] ? m : kpl_strerror(err->code));
	if (err->code == KPL_ETOOBIG && c->n_diags)
		c->diags[c->n_diags - 1].code = KPL_ETOOBIG;
}

static void parse_needs(struct vctx *c, struct pl_stage *st,
			const struct pl_node *n, const char *path)
{
	char ipath[PATH_LEN];

	if (n->type == PL_SCALAR) {
		const char *s = want_str(c, n, path);
		if (!s)
			return;
		st->needs = kpl_calloc(1, sizeof *st->needs);
		st->needs[st->n_needs++] = kpl_strdup(s);
		return;
	}
	if (!want_seq(c, n, path))
		return;
	st->needs = kpl_calloc(n->n ? n->n : 1, sizeof *st->needs);
	for (size_t i = 0; i < n->n; i++) {
		path_idx(ipath, path, i);
		const char *s = want_str(c, n->items[i], ipath);
		/* Keep the slots aligned with the list for later messages. */
		st->needs[st->n_needs++] = kpl_strdup(s ? s : "");
	}
}

static void parse_retries(struct vctx *c, struct pl_stage *st,
			  const struct pl_node *n, const char *path)
{
	static const char *const keys[] = { "count", "backoff", "max_backoff", NULL };
	const struct pl_node *v;
	char kpath[PATH_LEN];
	int64_t count;

	st->retries.backoff_ms = DEFAULT_BACKOFF_MS;
	st->retries.max_backoff_ms = DEFAULT_MAX_BACKOFF_MS;
	if (!want_map(c, n, path))
		return;
	check_keys(c, n, path, keys);
	if ((v = require(c, n, path, "count"))) {
		path_key(kpath, path, "count");
		if (want_int(c, v, kpath, &count) == 0) {
			if (count < 0 || count > MAX_RETRIES)
				diag(c, v->pos, kpath, "%lld retries: use 0 to %d",
				     (long long)count, MAX_RETRIES);
			else
				st->retries.count = (uint32_t)count;
		}
	}
	const struct pl_node *bn = pl_map_get(n, "backoff");
	const struct pl_node *mn = pl_map_get(n, "max_backoff");
	if (bn) {
		path_key(kpath, path, "backoff");
		want_duration(c, bn, kpath, &st->retries.backoff_ms);
	}
	if (mn) {
		path_key(kpath, path, "max_backoff");
		if (want_duration(c, mn, kpath, &st->retries.max_backoff_ms) == 0 &&
		    st->retries.max_backoff_ms < st->retries.backoff_ms)
			diag(c, mn->pos, kpath, "max_backoff is shorter than backoff");
	} else if (st->retries.max_backoff_ms < st->retries.backoff_ms) {
		st->retries.max_backoff_ms = st->retries.backoff_ms;
	}
}

/* runs_on (pipelines/runs_on.h): the stage's own, merged key by key over
 * defaults.runs_on, must name a cluster and an image. */
static void parse_runs_on(struct vctx *c, struct pl_stage *st, const struct pl_node *n,
			  const char *path, const struct pl_kind *k)
{
	const struct pl_node *v = pl_map_get(n, "runs_on");
	struct kpl_err err = { 0 };
	char kpath[PATH_LEN];

	path_key(kpath, path, "runs_on");
	if (v && !k->runs_on) {
		diag(c, v->pos, kpath, "a %s stage runs in kpld and cannot run as a pod "
		     "(runs_on is for script stages and local builds)", k->kind);
		return;
	}
	if (!k->runs_on)
		return;
	if (k->pod_capable && !k->pod_capable(st->with)) {
		/* defaults.runs_on applies where it can: not here. */
		if (v && !pl_runs_on_is_local(v))
			diag(c, v->pos, kpath, "this %s stage runs in kpld and cannot run as a "
			     "pod (runs_on is for script stages and local builds)", k->kind);
		return;
	}
	if (v && pl_runs_on_check(v, c->file, kpath, &err) < 0) {
		diag_from_kind(c, v, kpath, &err);
		return;
	}
	st->runs_on = v;
	st->runs_on_defaults = c->defaults_runs_on;
	if (k->check_pod && st->with && k->check_pod(st->with, v, c->defaults_runs_on, v ? v : n,
						     c->file, path, &err) < 0)
		diag_from_kind(c, v ? v : n, path, &err);
	if (!pl_runs_on_pod(v, c->defaults_runs_on))
		return;
	for (const char *const *key = (const char *const[]){ "cluster", "image", NULL }; *key;
	     key++)
		if (!pl_runs_on_get(v, c->defaults_runs_on, *key))
			diag(c, v ? v->pos : n->pos, kpath, "%s: required (the %s to run the "
			     "command %s), here or in defaults.runs_on", *key,
			     !strcmp(*key, "cluster") ? "kubernetes endpoint of the daemon config"
						      : "container image",
			     !strcmp(*key, "cluster") ? "on" : "in");
}

static void parse_defaults(struct vctx *c, const struct pl_node *n)
{
	static const char *const keys[] = { "runs_on", NULL };
	const struct pl_node *v;
	struct kpl_err err = { 0 };

	if (!want_map(c, n, "defaults"))
		return;
	check_keys(c, n, "defaults", keys);
	if (!(v = pl_map_get(n, "runs_on")))
		return;
	if (pl_runs_on_check(v, c->file, "defaults.runs_on", &err) < 0)
		diag_from_kind(c, v, "defaults.runs_on", &err);
	else if (pl_runs_on_is_local(v))
		diag(c, v->pos, "defaults.runs_on", "local is the default already: leave "
		     "defaults.runs_on out");
	else
		c->defaults_runs_on = v;
}

static void parse_stage(struct vctx *c, struct pl_stage *st,
			const struct pl_node *n, const char *path)
{
	static const char *const keys[] = {
		"name", "kind", "needs", "when", "timeout", "retries",
		"continue_on_error", "env", "with", "runs_on", NULL,
	};
	const struct pl_node *v;
	char kpath[PATH_LEN];

	st->pos = n->pos;
	st->retries.backoff_ms = DEFAULT_BACKOFF_MS;
	st->retries.max_backoff_ms = DEFAULT_MAX_BACKOFF_MS;
	if (!want_map(c, n, path))
		return;
	check_keys(c, n, path, keys);
	if ((v = require(c, n, path, "name"))) {
		path_key(kpath, path, "name");
		const char *s = want_str(c, v, kpath);
		if (s && (v->expanded || check_name(c, v, kpath, s, NAME_STAGE, "stage name") == 0))
			st->name = kpl_strdup(s);
	}
	if ((v = pl_map_get(n, "with")) && !pl_scalar_is_null(v)) {
		path_key(kpath, path, "with");
		if (want_map(c, v, kpath))
			st->with = v;
	}
	if ((v = require(c, n, path, "kind"))) {
		path_key(kpath, path, "kind");
		const char *s = want_str(c, v, kpath);
		const struct pl_kind *k = s ? find_kind(c, s) : NULL;
		if (s && !k) {
			char known[256] = "";
			for (size_t i = 0; i < c->n_kinds; i++) {
				if (strlen(known) + strlen(c->kinds[i].kind) + 3 >= sizeof known)
					break;
				strcat(known, i ? ", " : "");
				strcat(known, c->kinds[i].kind);
			}
			diag(c, v->pos, kpath, "unknown kind \"%.60s\" (known: %s)", s,
			     known[0] ? known : "none");
		}
		if (k) {
			st->kind = kpl_strdup(s);
			const struct pl_node *w = pl_map_get(n, "with");
			bool with_ok = !w || pl_scalar_is_null(w) || w->type == PL_MAP;
			if (with_ok && st->with && k->with_keys) {
				size_t before = c->n_diags;
				path_key(kpath, path, "with");
				check_keys(c, st->with, kpath, k->with_keys);
				with_ok = c->n_diags == before;
			}
			if (k->check_with && with_ok) {
				struct kpl_err err = { 0 };
				path_key(kpath, path, "with");
				if (k->check_with(st->with, c->file, kpath, &err) < 0)
					diag_from_kind(c, st->with ? st->with : n, kpath, &err);
			}
			parse_runs_on(c, st, n, path, k);
		}
	}
	if ((v = pl_map_get(n, "needs"))) {
		path_key(kpath, path, "needs");
		parse_needs(c, st, v, kpath);
	}
	if ((v = pl_map_get(n, "when"))) {
		path_key(kpath, path, "when");
		const char *s = want_str(c, v, kpath);
		struct kpl_err err = { 0 };
		size_t off = 0, start = 0, len = s ? strlen(s) : 0;
		if (s)
			when_unwrap(s, &start, &len);
		if (s && expr_parse(s + start, len, EXPR_ROOTS_WHEN, &st->when_expr,
				    &off, &err) < 0)
			diag(c, pos_in_scalar(v, start + off), kpath, "%s", err.msg);
		else if (s)
			st->when = kpl_strndup(s + start, len);
	}
	if ((v = pl_map_get(n, "timeout"))) {
		path_key(kpath, path, "timeout");
		if (want_duration(c, v, kpath, &st->timeout_ms) == 0 &&
		    st->timeout_ms == 0)
			diag(c, v->pos, kpath, "a timeout of 0 would fail at once: leave timeout out for none");
	}
	if ((v = pl_map_get(n, "retries"))) {
		path_key(kpath, path, "retries");
		parse_retries(c, st, v, kpath);
	}
	if ((v = pl_map_get(n, "continue_on_error"))) {
		path_key(kpath, path, "continue_on_error");
		want_bool(c, v, kpath, &st->continue_on_error);
	}
	if ((v = pl_map_get(n, "env"))) {
		path_key(kpath, path, "env");
		parse_env(c, v, kpath, &st->env, &st->n_env);
	}
}

/* Stage i's node, and its path as written (a matrix instance or a stage
 * using a template is named by the stage the file has). */
static const struct pl_node *stage_node(const struct vctx *c, const struct pl_node *root,
					size_t i, char *path)
{
	const struct pipeline *p = c->p;
	const struct pl_node *stages = pl_map_get(root, "stages");
	size_t n_main = p->n_stages - p->n_finally;
	size_t shown = i < c->n_reuse ? c->reuse[i].orig : i < n_main ? i : i - n_main;

	if (i < n_main) {
		path_idx(path, "stages", shown);
		return stages->items[i];
	}
	path_idx(path, "finally", shown);
	return pl_map_get(root, "finally")->items[i - n_main];
}

/* Resolves needs to indexes in the same list; reports unknown, self and
 * repeated names. */
static void resolve_needs(struct vctx *c, const struct pl_node *root)
{
	struct pipeline *p = c->p;
	char path[PATH_LEN], npath[PATH_LEN], ipath[PATH_LEN];

	c->need_idx = kpl_calloc(p->n_stages ? p->n_stages : 1, sizeof *c->need_idx);
	for (size_t i = 0; i < p->n_stages; i++) {
		struct pl_stage *st = &p->stages[i];
		const struct pl_node *sn = stage_node(c, root, i, path);
		const struct pl_node *nn = pl_map_get(sn, "needs");
		c->need_idx[i] = kpl_malloc((st->n_needs ? st->n_needs : 1) * sizeof(int));
		path_key(npath, path, "needs");
		for (size_t j = 0; j < st->n_needs; j++) {
			const struct pl_node *at = nn->type == PL_SEQ ? nn->items[j] : nn;
			const char *need = st->needs[j];
			if (nn->type == PL_SEQ)
				path_idx(ipath, npath, j);
			else
				snprintf(ipath, sizeof ipath, "%s", npath);
			c->need_idx[i][j] = -1;
			if (!need[0])
				continue; /* not a string: reported already */
			int k = find_stage(c, need, st->is_finally);
			if (k < 0) {
				int other = find_stage(c, need, !st->is_finally);
				if (other >= 0)
					diag(c, at->pos, ipath,
					     st->is_finally
						     ? "\"%s\" is a main stage: finally stages run after all of them, so they need only other finally stages"
						     : "\"%s\" is a finally stage: stages can only need stages of their own list",
					     need);
				else
					diag(c, at->pos, ipath, "unknown stage \"%.60s\"", need);
				continue;
			}
			if ((size_t)k == i) {
				diag(c, at->pos, ipath, "a stage cannot need itself");
				continue;
			}
			bool dup = false;
			for (size_t m = 0; m < j; m++)
				dup |= c->need_idx[i][m] == k;
			if (dup) {
				diag(c, at->pos, ipath, "\"%s\" is listed twice", need);
				continue;
			}
			c->need_idx[i][j] = k;
		}
	}
}

/* Depth-first search for cycles; reports each back edge with the cycle it
 * closes, written in needs order ("a -> b -> a": a needs b, b needs a). */
static void find_cycles(struct vctx *c, const struct pl_node *root, size_t i,
			char *color, size_t *stack, size_t depth)
{
	struct pipeline *p = c->p;
	char path[PATH_LEN], ipath[PATH_LEN];

	color[i] = 1;
	stack[depth] = i;
	for (size_t j = 0; j < p->stages[i].n_needs; j++) {
		int k = c->need_idx[i][j];
		if (k < 0)
			continue;
		if (color[k] == 0) {
			find_cycles(c, root, (size_t)k, color, stack, depth + 1);
			continue;
		}
		if (color[k] != 1)
			continue;
		char cycle[1024] = "";
		size_t from = 0;
		while (stack[from] != (size_t)k)
			from++;
		for (size_t m = from; m <= depth; m++) {
			size_t used = strlen(cycle);
			snprintf(cycle + used, sizeof cycle - used, "%s -> ",
				 p->stages[stack[m]].name);
		}
		size_t used = strlen(cycle);
		snprintf(cycle + used, sizeof cycle - used, "%s", p->stages[k].name);
		const struct pl_node *sn = stage_node(c, root, i, path);
		const struct pl_node *nn = pl_map_get(sn, "needs");
		path_key(ipath, path, "needs");
		if (nn->type == PL_SEQ) {
			char tmp[PATH_LEN];
			snprintf(tmp, sizeof tmp, "%s", ipath);
			path_idx(ipath, tmp, j);
			nn = nn->items[j];
		}
		diag(c, nn->pos, ipath, "dependency cycle: %s", cycle);
	}
	color[i] = 2;
}

static void mark_reach(struct vctx *c, size_t from, size_t i)
{
	const struct pipeline *p = c->p;

	for (size_t j = 0; j < p->stages[i].n_needs; j++) {
		int k = c->need_idx[i][j];
		if (k < 0 || c->reach[from * p->n_stages + (size_t)k])
			continue;
		c->reach[from * p->n_stages + (size_t)k] = true;
		mark_reach(c, from, (size_t)k);
	}
}

static void check_graph(struct vctx *c, const struct pl_node *root)
{
	struct pipeline *p = c->p;
	size_t n = p->n_stages;
	char path[PATH_LEN], kpath[PATH_LEN];

	/* Names are unique across stages and finally: runs, events and
	 * outputs are keyed by stage name alone. */
	for (size_t i = 0; i < n; i++) {
		if (!p->stages[i].name)
			continue;
		for (size_t j = 0; j < i; j++) {
			if (!p->stages[j].name || strcmp(p->stages[i].name, p->stages[j].name))
				continue;
			const struct pl_node *sn = stage_node(c, root, i, path);
			const struct pl_node *nm = pl_map_get(sn, "name");
			path_key(kpath, path, "name");
			diag(c, nm->pos, kpath, "duplicate stage name \"%s\" (first at %d:%d)",
			     p->stages[i].name, p->stages[j].pos.line, p->stages[j].pos.col);
			break;
		}
	}
	resolve_needs(c, root);
	char *color = kpl_calloc(n ? n : 1, 1);
	size_t *stack = kpl_calloc(n ? n : 1, sizeof *stack);
	for (size_t i = 0; i < n; i++)
		if (!color[i])
			find_cycles(c, root, i, color, stack, 0);
	free(color);
	free(stack);
	c->reach = kpl_calloc(n ? n * n : 1, sizeof *c->reach);
	for (size_t i = 0; i < n; i++)
		mark_reach(c, i, i);
}

/* References in when, env and with, once the graph is known. */
static void check_stage_refs(struct vctx *c, const struct pl_node *root)
{
	struct pipeline *p = c->p;
	char path[PATH_LEN], kpath[PATH_LEN];

	for (size_t i = 0; i < p->n_stages; i++) {
		struct pl_stage *st = &p->stages[i];
		const struct pl_node *sn = stage_node(c, root, i, path);
		const struct pl_node *v;
		if (sn->type != PL_MAP)
			continue;
		if (st->when_expr) {
			path_key(kpath, path, "when");
			const struct pl_node *wn = pl_map_get(sn, "when");
			size_t start = 0, len = strlen(wn->scalar);
			when_unwrap(wn->scalar, &start, &len);
			struct ref_ctx r = { c, wn, kpath, (int)i, start };
			expr_walk_refs(st->when_expr, check_ref, &r);
		}
		if ((v = pl_map_get(sn, "env")) && v->type == PL_MAP) {
			for (size_t j = 0; j < v->n; j++) {
				path_key(kpath, path, "env");
				char epath[PATH_LEN];
				path_key(epath, kpath, v->keys[j]->scalar);
				check_template(c, v->items[j], epath, (int)i);
			}
		}
		if (st->with) {
			const struct pl_kind *k = st->kind ? find_kind(c, st->kind) : NULL;
			path_key(kpath, path, "with");
			c->with_roots = k ? k->with_roots : 0;
			check_templates_deep(c, st->with, kpath, (int)i);
			for (const char *const *a = k ? k->argv_keys : NULL; a && *a; a++) {
				const struct pl_node *an = st->with->type == PL_MAP
							   ? pl_map_get(st->with, *a) : NULL;
				char apath[PATH_LEN];
				if (!an)
					continue;
				path_key(apath, kpath, *a);
				check_no_secrets(c, an, apath, (int)i);
			}
			c->with_roots = 0;
		}
		if (st->runs_on && st->runs_on->type == PL_MAP) {
			/* Every value lands in the Pod spec, which any reader of
			 * pods sees: no secret there. */
			path_key(kpath, path, "runs_on");
			check_templates_deep(c, st->runs_on, kpath, (int)i);
			c->in_pod_spec = true;
			check_no_secrets(c, st->runs_on, kpath, (int)i);
			c->in_pod_spec = false;
		}
	}
	if (c->defaults_runs_on) {
		check_templates_deep(c, c->defaults_runs_on, "defaults.runs_on", -1);
		c->in_pod_spec = true;
		check_no_secrets(c, c->defaults_runs_on, "defaults.runs_on", -1);
		c->in_pod_spec = false;
	}
}

static void parse_stages(struct vctx *c, const struct pl_node *root)
{
	struct pipeline *p = c->p;
	const struct pl_node *stages = require(c, root, "", "stages");
	const struct pl_node *fin = pl_map_get(root, "finally");
	bool ok = true;
	char path[PATH_LEN];

	if (stages && !want_seq(c, stages, "stages"))
		ok = false;
	else if (stages && stages->n == 0) {
		diag(c, stages->pos, "stages", "no stages: a pipeline needs at least one");
		ok = false;
	}
	if (fin && !pl_scalar_is_null(fin) && !want_seq(c, fin, "finally"))
		ok = false;
	if (!stages || !ok)
		return;
	size_t n_fin = fin && fin->type == PL_SEQ ? fin->n : 0;
	if (stages->n + n_fin > KPL_MAX_STAGES) {
		diag_big(c, stages->pos, "stages",
			 "%zu stages (finally included); the limit is %d",
			 stages->n + n_fin, KPL_MAX_STAGES);
		return;
	}
	p->n_stages = stages->n + n_fin;
	p->n_finally = n_fin;
	p->stages = kpl_calloc(p->n_stages, sizeof *p->stages);
	for (size_t i = 0; i < p->n_stages; i++) {
		const struct pl_node *sn = stage_node(c, root, i, path);
		p->stages[i].is_finally = i >= stages->n;
		parse_stage(c, &p->stages[i], sn, path);
		if (i < c->n_reuse && c->reuse[i].matrix) {
			p->stages[i].matrix = kpl_strdup(c->reuse[i].matrix);
			p->stages[i].max_parallel = c->reuse[i].max_parallel;
		}
		if (i < c->n_reuse && c->reuse[i].uses)
			p->stages[i].uses = kpl_strdup(c->reuse[i].uses);
	}
	check_graph(c, root);
	check_stage_refs(c, root);
}

/* ---- the pipeline ---- */

static void parse_concurrency(struct vctx *c, const struct pl_node *n)
{
	static const char *const keys[] = { "group", "cancel_in_progress", NULL };
	struct pipeline *p = c->p;
	const struct pl_node *v;

	if (n->type == PL_SCALAR) {
		const char *s = want_str(c, n, "concurrency");
		if (s) {
			check_template(c, n, "concurrency", -1);
			p->concurrency.group = kpl_strdup(s);
		}
		return;
	}
	if (n->type != PL_MAP) {
		diag(c, n->pos, "concurrency",
		     "expected a group name or a mapping {group, cancel_in_progress}, found a list");
		return;
	}
	check_keys(c, n, "concurrency", keys);
	if ((v = require(c, n, "concurrency", "group"))) {
		const char *s = want_str(c, v, "concurrency.group");
		if (s) {
			check_template(c, v, "concurrency.group", -1);
			p->concurrency.group = kpl_strdup(s);
		}
	}
	if ((v = pl_map_get(n, "cancel_in_progress")))
		want_bool(c, v, "concurrency.cancel_in_progress",
			  &p->concurrency.cancel_in_progress);
}

static const char *const notify_event_names[] = {
#define PL_NOTIFY_EVENT_NAME(id, name) name,
	PL_NOTIFY_EVENT_MAP(PL_NOTIFY_EVENT_NAME)
#undef PL_NOTIFY_EVENT_NAME
	NULL
};

const char *pl_notify_event_name(enum pl_notify_event ev)
{
	return (unsigned)ev < PL_NOTIFY_LAST ? notify_event_names[ev] : "?";
}

/* notify: a list of {notifier, events}. Only the shape: which notifiers
 * exist is the daemon config's business, checked at submit. */
static void parse_notify(struct vctx *c, const struct pl_node *n)
{
	/* "kind" only to say where it goes instead. */
	static const char *const keys[] = { "notifier", "events", "kind", NULL };
	struct pipeline *p = c->p;
	char path[PATH_LEN], kpath[PATH_LEN], ipath[PATH_LEN];

	if (pl_scalar_is_null(n) || !want_seq(c, n, "notify"))
		return;
	if (n->n > PL_MAX_NOTIFY) {
		diag_big(c, n->pos, "notify", "%zu entries; the limit is %d", n->n,
			 PL_MAX_NOTIFY);
		return;
	}
	p->notify = kpl_calloc(n->n ? n->n : 1, sizeof *p->notify);
	for (size_t i = 0; i < n->n; i++) {
		const struct pl_node *e = n->items[i], *v;
		struct pl_notify *pn = &p->notify[p->n_notify++];

		path_idx(path, "notify", i);
		pn->pos = e->pos;
		pn->events = (1u << PL_NOTIFY_LAST) - 1;
		if (!want_map(c, e, path))
			continue;
		check_keys(c, e, path, keys);
		for (size_t j = 0; j < e->n; j++)
			if (strcmp(e->keys[j]->scalar, "kind") == 0) {
				path_key(kpath, path, "kind");
				diag(c, e->keys[j]->pos, kpath, "a notifier's kind (wecom, "
				     "dingtalk, slack) is declared with its url in the daemon "
				     "config (notifiers.NAME.kind), not here");
			}
		if ((v = require(c, e, path, "notifier"))) {
			const char *s;

			path_key(kpath, path, "notifier");
			s = want_str(c, v, kpath);
			if (s && check_name(c, v, kpath, s, NAME_PARAM, "notifier name") == 0) {
				for (size_t j = 0; j + 1 < p->n_notify; j++)
					if (p->notify[j].notifier &&
					    strcmp(p->notify[j].notifier, s) == 0)
						diag(c, v->pos, kpath,
						     "notifier \"%s\" is listed twice (first at "
						     "%d:%d): put all its events in one entry",
						     s, p->notify[j].pos.line, p->notify[j].pos.col);
				pn->notifier = kpl_strdup(s);
			}
		}
		if (!(v = pl_map_get(e, "events")))
			continue;
		path_key(kpath, path, "events");
		if (!want_seq(c, v, kpath))
			continue;
		if (v->n == 0) {
			diag(c, v->pos, kpath, "an empty list sends nothing: list the events "
			     "(%s), or leave events out for all of them",
			     "started, stage_failed, waiting, succeeded, failed, cancelled");
			continue;
		}
		pn->events = 0;
		for (size_t j = 0; j < v->n; j++) {
			const struct pl_node *ev = v->items[j];
			const char *s;
			int k;

			path_idx(ipath, kpath, j);
			if (!(s = want_str(c, ev, ipath)))
				continue;
			for (k = 0; k < PL_NOTIFY_LAST; k++)
				if (strcmp(s, notify_event_names[k]) == 0)
					break;
			if (k == PL_NOTIFY_LAST) {
				const char *near = suggest(s, notify_event_names);
				diag(c, ev->pos, ipath, "unknown event \"%.60s\"%s%s%s (known: "
				     "started, stage_failed, waiting, succeeded, failed, cancelled)",
				     s, near ? ": did you mean \"" : "", near ? near : "",
				     near ? "\"?" : "");
				continue;
			}
			if (pn->events & (1u << k))
				diag(c, ev->pos, ipath, "\"%s\" is listed twice", s);
			pn->events |= 1u << k;
		}
	}
}

static void validate(struct vctx *c, const struct pl_node *root)
{
	static const char *const keys[] = { "name", "description", "params", "env",
					     "concurrency", "notify", "stages", "finally",
					     "defaults", "timeout", NULL };
	struct pipeline *p = c->p;
	const struct pl_node *v;
	char what[128];

	if (!root || pl_scalar_is_null(root)) {
		diag(c, (struct pl_pos){ 1, 1 }, "",
		     "the pipeline is empty: it needs at least name and stages");
		return;
	}
	if (root->type != PL_MAP) {
		diag(c, root->pos, "", "a pipeline is a mapping (name:, stages:, ...), found %s",
		     node_what(root, what, sizeof what));
		return;
	}
	check_keys(c, root, "", keys);
	if ((v = require(c, root, "", "name"))) {
		const char *s = want_str(c, v, "name");
		if (s && check_name(c, v, "name", s, NAME_PIPELINE, "pipeline name") == 0)
			p->name = kpl_strdup(s);
	}
	if ((v = pl_map_get(root, "description"))) {
		const char *s = want_str(c, v, "description");
		if (s)
			p->description = kpl_strdup(s);
	}
	/* params first: env, concurrency and stages refer to them. */
	if ((v = pl_map_get(root, "params")))
		parse_params(c, v);
	if ((v = pl_map_get(root, "env"))) {
		parse_env(c, v, "env", &p->env, &p->n_env);
		for (size_t i = 0; v->type == PL_MAP && i < v->n; i++) {
			char path[PATH_LEN];
			path_key(path, "env", v->keys[i]->scalar);
			check_template(c, v->items[i], path, -1);
		}
	}
	if ((v = pl_map_get(root, "concurrency")))
		parse_concurrency(c, v);
	if ((v = pl_map_get(root, "timeout")) &&
	    want_duration(c, v, "timeout", &p->timeout_ms) == 0 && p->timeout_ms == 0)
		diag(c, v->pos, "timeout",
		     "a timeout of 0 would fail the run at once: leave timeout out for none");
	if ((v = pl_map_get(root, "notify")))
		parse_notify(c, v);
	if ((v = pl_map_get(root, "defaults")))
		parse_defaults(c, v);
	parse_stages(c, root);
}

static bool looks_like_json(const char *text, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		char ch = text[i];
		if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r')
			continue;
		return ch == '{';
	}
	return false;
}

/* File order, stable (equal positions keep the order found); insertion
 * sort, as there are at most PL_MAX_DIAGS. */
static bool diag_after(const struct pl_diag *a, const struct pl_diag *b)
{
	/* A template's diagnostic sorts where the pipeline file uses it. */
	int al = a->file ? a->use_line : a->line, ac = a->file ? a->use_col : a->col;
	int bl = b->file ? b->use_line : b->line, bc = b->file ? b->use_col : b->col;

	if (al != bl)
		return al > bl;
	if (ac != bc)
		return ac > bc;
	if (!a->file != !b->file)
		return !b->file; /* the pipeline file's own first */
	return a->line > b->line || (a->line == b->line && a->col > b->col);
}

static void sort_diags(struct pl_diag *d, size_t n)
{
	for (size_t i = 1; i < n; i++) {
		struct pl_diag x = d[i];
		size_t j = i;
		while (j > 0 && diag_after(&d[j - 1], &x)) {
			d[j] = d[j - 1];
			j--;
		}
		d[j] = x;
	}
}

/* Runs everything; the pipeline in *out is valid only if c->n_diags is 0. */
static void run(struct vctx *c, const char *text, size_t len, struct pipeline **out)
{
	struct pipeline *p = kpl_calloc(1, sizeof *p);
	char *copy = NULL;

	c->p = p;
	c->text = text;
	c->len = len;
	*out = p;
	if (len > KPL_MAX_PIPELINE_BYTES) {
		diag_big(c, (struct pl_pos){ 1, 1 }, "",
			 "the pipeline is %zu bytes; the limit is %d", len,
			 KPL_MAX_PIPELINE_BYTES);
		return;
	}
	if (looks_like_json(text, len)) {
		json_error_t jerr;
		json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
		if (!j) {
			diag(c, (struct pl_pos){ jerr.line > 0 ? jerr.line : 1,
						 jerr.column > 0 ? jerr.column : 1 },
			     "", "invalid JSON: %s", jerr.text);
			return;
		}
		json_decref(j);
		/* Valid JSON holds tabs only as whitespace (never inside
		 * strings), and YAML refuses some tabs; a space in their
		 * place keeps every column. */
		copy = kpl_malloc(len ? len : 1);
		memcpy(copy, text, len);
		for (size_t i = 0; i < len; i++)
			if (copy[i] == '\t')
				copy[i] = ' ';
		text = copy;
	}
	p->root = build_tree(c, text, len);
	free(copy);
	if (c->n_diags)
		return;
	/* matrix: and uses: make plain stages; their own mistakes end the
	 * check (the rest would be read from a half-made tree). */
	reuse_expand(c, p->root);
	if (c->n_diags) {
		sort_diags(c->diags, c->n_diags);
		return;
	}
	validate(c, p->root);
	sort_diags(c->diags, c->n_diags);
}

static void vctx_release(struct vctx *c)
{
	if (c->need_idx) {
		for (size_t i = 0; i < c->p->n_stages; i++)
			free(c->need_idx[i]);
		free(c->need_idx);
	}
	free(c->reach);
	reuse_release(c);
}

int pipeline_validate_all(const char *text, size_t len, const char *file,
			  const struct pl_kind *kinds, size_t n_kinds,
			  struct pl_diag **diags, size_t *n_diags)
{
	return pipeline_validate_files(text, len, file, NULL, kinds, n_kinds, diags, n_diags);
}

int pipeline_validate_files(const char *text, size_t len, const char *file,
			    const struct pl_files *files, const struct pl_kind *kinds,
			    size_t n_kinds, struct pl_diag **diags, size_t *n_diags)
{
	struct vctx c = { .file = file ? file : "pipeline", .kinds = kinds,
			  .n_kinds = n_kinds, .files = files };
	struct pipeline *p;

	run(&c, text, len, &p);
	vctx_release(&c);
	pipeline_free(p);
	*diags = c.diags;
	*n_diags = c.n_diags;
	return c.n_diags ? c.diags[0].code : 0;
}

int pipeline_parse(const char *text, size_t len, const char *file,
		   const struct pl_kind *kinds, size_t n_kinds,
		   struct pipeline **out, struct kpl_err *err)
{
	return pipeline_parse_files(text, len, file, NULL, kinds, n_kinds, out, err);
}

int pipeline_parse_files(const char *text, size_t len, const char *file,
			 const struct pl_files *files, const struct pl_kind *kinds,
			 size_t n_kinds, struct pipeline **out, struct kpl_err *err)
{
	struct vctx c = { .file = file ? file : "pipeline", .kinds = kinds,
			  .n_kinds = n_kinds, .files = files };
	struct pipeline *p;
	int rc = 0;

	*out = NULL;
	run(&c, text, len, &p);
	vctx_release(&c);
	if (c.n_diags) {
		char msg[sizeof err->msg];
		pl_diag_format(&c.diags[0], c.file, msg, sizeof msg);
		rc = kpl_errf(err, c.diags[0].code, "%s", msg);
		pipeline_free(p);
	} else {
		*out = p;
	}
	pl_diags_free(c.diags, c.n_diags);
	return rc;
}

int pl_doc_parse(const char *text, size_t len, const char *file, struct pl_node **root,
		 struct kpl_err *err)
{
	struct vctx c = { .file = file ? file : "document" };
	int rc = 0;

	*root = NULL;
	if (len > KPL_MAX_PIPELINE_BYTES)
		return kpl_errf(err, KPL_ETOOBIG, "%s: %zu bytes, over the limit of %d", c.file,
				len, KPL_MAX_PIPELINE_BYTES);
	*root = build_tree(&c, text, len);
	if (c.n_diags) {
		char msg[sizeof err->msg];
		pl_diag_format(&c.diags[0], c.file, msg, sizeof msg);
		rc = kpl_errf(err, c.diags[0].code, "%s", msg);
		pl_node_free(*root);
		*root = NULL;
	} else if (!*root) {
		rc = kpl_errf(err, KPL_EINVAL, "%s: empty document", c.file);
	}
	pl_diags_free(c.diags, c.n_diags);
	return rc;
}

void pl_doc_free(struct pl_node *root)
{
	pl_node_free(root);
}

struct pipeline *pipeline_ref(struct pipeline *p)
{
	p->refs++;
	return p;
}

void pipeline_free(struct pipeline *p)
{
	if (!p)
		return;
	if (p->refs > 0) {
		p->refs--;
		return;
	}
	free(p->name);
	free(p->description);
	for (size_t i = 0; i < p->n_params; i++) {
		struct pl_param *pp = &p->params[i];
		free(pp->name);
		free(pp->def);
		for (size_t j = 0; j < pp->n_enum; j++)
			free(pp->enum_values[j]);
		free(pp->enum_values);
	}
	free(p->params);
	for (size_t i = 0; i < p->n_env; i++) {
		free(p->env[i].name);
		free(p->env[i].value);
	}
	free(p->env);
	free(p->concurrency.group);
	for (size_t i = 0; i < p->n_notify; i++)
		free(p->notify[i].notifier);
	free(p->notify);
	for (size_t i = 0; i < p->n_stages; i++) {
		struct pl_stage *st = &p->stages[i];
		free(st->name);
		free(st->kind);
		free(st->matrix);
		free(st->uses);
		for (size_t j = 0; j < st->n_needs; j++)
			free(st->needs[j]);
		free(st->needs);
		free(st->when);
		expr_free(st->when_expr);
		for (size_t j = 0; j < st->n_env; j++) {
			free(st->env[j].name);
			free(st->env[j].value);
		}
		free(st->env);
	}
	free(p->stages);
	pl_node_free(p->root);
	free(p);
}

/* ---- params at run time ---- */

static int check_param_text(const struct pl_param *pp, const char *v,
			    struct kpl_err *err)
{
	int64_t iv;

	if (strlen(v) > KPL_MAX_VALUE_LEN)
		return kpl_errf(err, KPL_ETOOBIG, "params.%s: value is over %d bytes",
				pp->name, KPL_MAX_VALUE_LEN);
	if (pp->type == PL_TYPE_INT && !parse_int(v, &iv))
		return kpl_errf(err, KPL_EINVAL, "params.%s: \"%.60s\" is not a whole number",
				pp->name, v);
	if (pp->type == PL_TYPE_BOOL && strcmp(v, "true") && strcmp(v, "false"))
		return kpl_errf(err, KPL_EINVAL, "params.%s: \"%.60s\" is not true or false",
				pp->name, v);
	if (pp->n_enum) {
		for (size_t i = 0; i < pp->n_enum; i++)
			if (!strcmp(pp->enum_values[i], v))
				return 0;
		char list[256] = "";
		for (size_t i = 0; i < pp->n_enum && strlen(list) < 200; i++) {
			strcat(list, i ? ", " : "");
			strncat(list, pp->enum_values[i], 40);
		}
		return kpl_errf(err, KPL_EINVAL, "params.%s: \"%.60s\" is not one of: %s",
				pp->name, v, list);
	}
	return 0;
}

int pipeline_resolve_params(const struct pipeline *p, const char *const *names,
			    const char *const *values, size_t n, char ***out_names,
			    char ***out_values, size_t *out_n, struct kpl_err *err)
{
	char **on = NULL, **ov = NULL;
	size_t k = 0;
	int rc;

	*out_names = NULL;
	*out_values = NULL;
	*out_n = 0;
	for (size_t i = 0; i < n; i++) {
		size_t j;
		for (j = 0; j < p->n_params; j++)
			if (!strcmp(p->params[j].name, names[i]))
				break;
		if (j == p->n_params) {
			/* Name what may be passed: the typo is then plain to see. */
			char list[256] = "";
			const char *near = NULL;
			size_t best = 3;
			for (j = 0; j < p->n_params; j++) {
				size_t used = strlen(list), d;
				snprintf(list + used, sizeof list - used, "%s%s", j ? ", " : "",
					 p->params[j].name);
				if ((d = edit_distance(names[i], p->params[j].name)) < best) {
					best = d;
					near = p->params[j].name;
				}
			}
			if (!p->n_params)
				return kpl_errf(err, KPL_EINVAL, "params.%.128s: the pipeline declares "
						"no params", names[i]);
			return kpl_errf(err, KPL_EINVAL, "params.%.128s: the pipeline declares no "
					"such param%s%s%s (declared: %s)", names[i],
					near ? ": did you mean \"" : "", near ? near : "",
					near ? "\"?" : "", list);
		}
		for (size_t m = 0; m < i; m++)
			if (!strcmp(names[m], names[i]))
				return kpl_errf(err, KPL_EINVAL, "params.%.128s: given twice", names[i]);
		if ((rc = check_param_text(&p->params[j], values[i], err)) < 0)
			return rc;
	}
	on = kpl_calloc(p->n_params ? p->n_params : 1, sizeof *on);
	ov = kpl_calloc(p->n_params ? p->n_params : 1, sizeof *ov);
	for (size_t j = 0; j < p->n_params; j++) {
		const struct pl_param *pp = &p->params[j];
		const char *v = NULL;
		for (size_t i = 0; i < n && !v; i++)
			if (!strcmp(names[i], pp->name))
				v = values[i];
		if (!v && pp->required) {
			rc = kpl_errf(err, KPL_EINVAL, "params.%s: required, and no value was given",
				      pp->name);
			goto fail;
		}
		if (!v)
			v = pp->def;
		/* Optional without a default: the type's zero value, so every
		 * declared param has a value to expand. */
		if (!v)
			v = pp->type == PL_TYPE_INT ? "0" : pp->type == PL_TYPE_BOOL ? "false" : "";
		on[k] = kpl_strdup(pp->name);
		ov[k] = kpl_strdup(v);
		k++;
	}
	*out_names = on;
	*out_values = ov;
	*out_n = k;
	return 0;
fail:
	for (size_t i = 0; i < k; i++) {
		free(on[i]);
		free(ov[i]);
	}
	free(on);
	free(ov);
	return rc;
}

/* ---- durations ---- */

int pl_duration_parse(const char *s, int64_t *ms, const char **why)
{
	static const struct {
		const char *unit;
		int64_t ms;
	} units[] = { { "h", 3600000 }, { "ms", 1 }, { "m", 60000 }, { "s", 1000 } };
	/* Rank from largest to smallest, to require that order. */
	static const int rank[] = { 0, 3, 1, 2 };
	int last_rank = -1;
	int64_t total = 0;
	const char *p = s;

	*ms = -1;
	if (!s || !*s) {
		*why = "empty duration: write e.g. 90s, 5m or 1h30m";
		return KPL_EINVAL;
	}
	if (*s == '-') {
		*why = "durations cannot be negative";
		return KPL_EINVAL;
	}
	while (*p) {
		if (*p < '0' || *p > '9') {
			*why = "expected a whole number followed by ms, s, m or h (e.g. 1h30m)";
			return KPL_EINVAL;
		}
		int64_t v = 0;
		while (*p >= '0' && *p <= '9') {
			v = v * 10 + (*p - '0');
			if (v > PL_MAX_DURATION_MS) {
				*why = "longer than the 30 day limit";
				return KPL_EINVAL;
			}
			p++;
		}
		size_t u;
		for (u = 0; u < KPL_ARRAY_SIZE(units); u++)
			if (!strncmp(p, units[u].unit, strlen(units[u].unit)))
				break;
		if (u == KPL_ARRAY_SIZE(units)) {
			*why = *p ? "unknown unit: use ms, s, m or h"
				  : "missing unit: use ms, s, m or h (e.g. 90s)";
			return KPL_EINVAL;
		}
		if (rank[u] <= last_rank) {
			*why = "units must go from largest to smallest, each once (e.g. 1h30m)";
			return KPL_EINVAL;
		}
		last_rank = rank[u];
		p += strlen(units[u].unit);
		/* v <= 30 days in ms, so v * 3600000 fits in int64. */
		total += v * units[u].ms;
		if (total > PL_MAX_DURATION_MS) {
			*why = "longer than the 30 day limit";
			return KPL_EINVAL;
		}
	}
	*ms = total;
	return 0;
}

int64_t pl_parse_duration(const char *s)
{
	int64_t ms;
	const char *why;

	return pl_duration_parse(s, &ms, &why) < 0 ? -1 : ms;
}

/* ---- secret references ---- */

struct secret_walk {
	const struct pl_node *n; /* the scalar */
	size_t base;             /* the expression's offset in it */
	int (*fn)(void *data, const char *name, struct pl_pos pos);
	void *data;
};

static int secret_ref(void *data, const struct expr *ref)
{
	struct secret_walk *w = data;

	if (strcmp(ref->part[0], "secrets") || ref->n_part != 2)
		return 0;
	return w->fn(w->data, ref->part[1], pos_in_scalar(w->n, w->base + ref->off));
}

static int secret_refs_in(const struct pl_node *n, struct secret_walk *w)
{
	int rc = 0;

	if (!n)
		return 0;
	if (n->type == PL_SCALAR) {
		struct tpl *t = NULL;
		struct kpl_err err = { 0 };
		size_t off = 0;

		if (!n->scalar || !tpl_has_template(n->scalar))
			return 0;
		/* Every root: whatever parses as a template may be expanded. */
		if (tpl_parse(n->scalar, EXPR_ROOTS_TEMPLATE | EXPR_ROOT_CANARY, &t, &off, &err) < 0)
			return 0;
		w->n = n;
		for (size_t i = 0; i < t->n_parts && !rc; i++) {
			if (!t->parts[i].expr)
				continue;
			w->base = t->parts[i].expr_off;
			rc = expr_walk_refs(t->parts[i].expr, secret_ref, w);
		}
		tpl_free(t);
		return rc;
	}
	for (size_t i = 0; i < n->n && !rc; i++)
		rc = secret_refs_in(n->items[i], w);
	return rc;
}

int pipeline_secret_refs(const struct pipeline *p,
			 int (*fn)(void *data, const char *name, struct pl_pos pos), void *data)
{
	struct secret_walk w = { .fn = fn, .data = data };

	return secret_refs_in(p->root, &w);
}
