/*
 * reuse.c - matrix stages and stage templates (reuse.h): the tree is
 * rewritten into plain stages, so the validator and the engine see nothing
 * new but a stage's matrix name and max_parallel.
 *
 * Values go in by text: ${{ matrix.os }} and ${{ inputs.env }} are
 * replaced where they stand. A whole-value reference takes the given value
 * as it is (with its type: `replicas: ${{ inputs.replicas }}` stays a
 * number). Inside a longer string, a value of plain characters (or one
 * that is itself a ${{ }} template) goes in as written; any other becomes
 * a quoted expression, ${{ 'it is' }}, so that a script stage's shell sees
 * it through a variable like any template (template.h) and never as shell
 * text. Inside an expression (`when:`, ${{ a == b }}) a value becomes a
 * literal.
 */
#include "pipelines/reuse.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipelines/pl_internal.h"
#include "pipelines/template.h"

#define PATH_LEN 512
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* Keys a stage that uses a template may have, and keys a template's
 * `stage:` may have. */
static const char *const using_keys[] = {
	"name", "uses", "with", "needs", "when", "timeout", "retries",
	"continue_on_error", "env", "runs_on", "matrix", "max_parallel", NULL,
};
static const char *const tpl_stage_keys[] = {
	"kind", "with", "env", "when", "timeout", "retries", "continue_on_error", "runs_on", NULL,
};

enum in_type { IN_STRING, IN_NUMBER, IN_BOOLEAN };
static const char *const in_type_names[] = { "string", "number", "boolean" };

struct tpl_input {
	const char *name;
	enum in_type type;
	bool required;
	const struct pl_node *def; /* borrowed from the template tree */
	struct pl_pos pos;
};

/* One template file, read once however often it is used. */
struct tfile {
	bool tried, ok;
	struct pl_node *root;      /* owned */
	const struct pl_node *stage;
	struct tpl_input *inputs;  /* owned array */
	size_t n_inputs;
};

/* Values to put in for ${{ ROOT.NAME }}. */
struct subst {
	const char *root; /* "matrix" or "inputs" */
	const char *const *names;
	const struct pl_node *const *values; /* scalars */
	const bool *literal; /* per value: goes into expressions unquoted */
	size_t n;
};

struct rx {
	struct vctx *c;
	size_t n_nodes;
	bool too_big;
	struct tfile *tf; /* per c->files entry */
	struct reuse_stage *out;
	size_t n_out;
};

/* ---- nodes ---- */

static struct pl_node *node_alloc(struct rx *x, enum pl_node_type type, struct pl_pos pos)
{
	if (++x->n_nodes > PL_MAX_NODES && !x->too_big) {
		x->too_big = true;
		pl_diagf(x->c, KPL_ETOOBIG, pos, "",
			 "matrix and templates make more than %d values; the limit is %d",
			 PL_MAX_NODES, PL_MAX_NODES);
	}
	struct pl_node *n = kpl_calloc(1, sizeof *n);
	n->type = type;
	n->pos = pos;
	return n;
}

static struct pl_node *scalar_new(struct rx *x, const char *s, struct pl_pos pos, bool plain)
{
	struct pl_node *n = node_alloc(x, PL_SCALAR, pos);
	n->scalar = kpl_strdup(s);
	n->plain = plain;
	n->style = plain ? 0 : '"';
	return n;
}

static void add_item(struct pl_node *parent, struct pl_node *key, struct pl_node *item)
{
	parent->items = kpl_realloc(parent->items, (parent->n + 1) * sizeof *parent->items);
	if (parent->type == PL_MAP) {
		parent->keys = kpl_realloc(parent->keys, (parent->n + 1) * sizeof *parent->keys);
		parent->keys[parent->n] = key;
	}
	parent->items[parent->n++] = item;
}

/* A deep copy; with use set, nodes from a template file get that use
 * position (the same template used twice says which use). */
static struct pl_node *clone(struct rx *x, const struct pl_node *n, const struct pl_pos *use)
{
	struct pl_node *m = node_alloc(x, n->type, n->pos);

	if (use && m->pos.file) {
		m->pos.use_line = use->line;
		m->pos.use_col = use->col;
	}
	m->plain = n->plain;
	m->style = n->style;
	m->verbatim = n->verbatim;
	m->expanded = n->expanded;
	if (n->scalar)
		m->scalar = kpl_strdup(n->scalar);
	if (x->too_big)
		return m; /* reported; the tree is not used */
	for (size_t i = 0; i < n->n; i++)
		add_item(m, n->keys ? clone(x, n->keys[i], use) : NULL, clone(x, n->items[i], use));
	return m;
}

/* ---- text ---- */

static bool plain_char(char ch)
{
	return isalnum((unsigned char)ch) || ch == '.' || ch == '_' || ch == '-' || ch == '+';
}

static bool plain_text(const char *s)
{
	for (; *s; s++)
		if (!plain_char(*s))
			return false;
	return true;
}

static bool ident_char(char ch)
{
	return isalnum((unsigned char)ch) || ch == '_' || ch == '-';
}

static const char *list_names(const struct subst *sb, char *buf, size_t size)
{
	buf[0] = '\0';
	for (size_t i = 0; i < sb->n; i++) {
		size_t used = strlen(buf);
		snprintf(buf + used, size - used, "%s%s", i ? ", " : "", sb->names[i]);
	}
	return sb->n ? buf : "none";
}

/* The value index of NAME, or -1 after a diagnostic at n. */
static int lookup(struct rx *x, const struct subst *sb, const char *name, size_t len,
		  const struct pl_node *n, const char *path)
{
	char list[300];

	for (size_t i = 0; i < sb->n; i++)
		if (strlen(sb->names[i]) == len && !strncmp(sb->names[i], name, len))
			return (int)i;
	pl_diagf(x->c, KPL_EINVAL, n->pos, path, "unknown %s \"%.*s\" in ${{ %s.%.*s }} (%s: %s)",
		 !strcmp(sb->root, "matrix") ? "matrix key" : "input", (int)(len > 60 ? 60 : len),
		 name, sb->root, (int)(len > 60 ? 60 : len), name,
		 !strcmp(sb->root, "matrix") ? "the matrix has" : "the template declares",
		 list_names(sb, list, sizeof list));
	return -1;
}

/* Replaces ROOT.NAME references inside an expression (outside quotes) by
 * literals. Returns false after a diagnostic. */
static bool subst_expr(struct rx *x, const char *s, size_t len, const struct subst *sb,
		       const struct pl_node *n, const char *path, struct kpl_buf *out)
{
	size_t rl = strlen(sb->root);
	char quote = 0;

	for (size_t i = 0; i < len;) {
		char ch = s[i];
		if (quote) {
			if (ch == quote)
				quote = 0;
			kpl_buf_add(out, s + i++, 1);
			continue;
		}
		if (ch == '\'' || ch == '"') {
			quote = ch;
			kpl_buf_add(out, s + i++, 1);
			continue;
		}
		bool start = i == 0 || !(ident_char(s[i - 1]) || s[i - 1] == '.');
		if (!start || i + rl + 1 > len || strncmp(s + i, sb->root, rl) || s[i + rl] != '.') {
			kpl_buf_add(out, s + i++, 1);
			continue;
		}
		size_t b = i + rl + 1, e = b;
		while (e < len && ident_char(s[e]))
			e++;
		int k = lookup(x, sb, s + b, e - b, n, path);
		if (k < 0)
			return false;
		const char *v = sb->values[k]->scalar;
		if (sb->literal[k]) {
			kpl_buf_str(out, v);
		} else if (strstr(v, "${{")) {
			pl_diagf(x->c, KPL_EINVAL, n->pos, path,
				 "%s.%s holds a ${{ }} template, which cannot go inside an expression: "
				 "use it as a whole value", sb->root, sb->names[k]);
			return false;
		} else if (!strchr(v, '\'')) {
			kpl_buf_str(out, "'");
			kpl_buf_str(out, v);
			kpl_buf_str(out, "'");
		} else if (!strchr(v, '"')) {
			kpl_buf_str(out, "\"");
			kpl_buf_str(out, v);
			kpl_buf_str(out, "\"");
		} else {
			pl_diagf(x->c, KPL_EINVAL, n->pos, path,
				 "%s.%s holds both ' and \", which an expression cannot quote",
				 sb->root, sb->names[k]);
			return false;
		}
		i = e;
	}
	return true;
}

/* If s is exactly one ${{ ROOT.NAME }} (spaces allowed), its value index. */
static int whole_ref(struct rx *x, const char *s, const struct subst *sb,
		     const struct pl_node *n, const char *path, bool *bad)
{
	size_t rl = strlen(sb->root);
	const char *p = s;

	while (*p == ' ')
		p++;
	if (strncmp(p, "${{", 3))
		return -1;
	p += 3;
	while (*p == ' ' || *p == '\t')
		p++;
	if (strncmp(p, sb->root, rl) || p[rl] != '.')
		return -1;
	const char *name = p + rl + 1, *e = name;
	while (ident_char(*e))
		e++;
	const char *q = e;
	while (*q == ' ' || *q == '\t')
		q++;
	if (strncmp(q, "}}", 2))
		return -1;
	q += 2;
	while (*q == ' ')
		q++;
	if (*q)
		return -1;
	int k = lookup(x, sb, name, (size_t)(e - name), n, path);
	if (k < 0)
		*bad = true;
	return k;
}

/*
 * The scalar n with its references replaced: a new node, or NULL if n has
 * none (or after a diagnostic, *bad set). is_when: n is a `when:`, an
 * expression as a whole.
 */
static struct pl_node *subst_scalar(struct rx *x, const struct pl_node *n, const struct subst *sb,
				    bool is_when, const char *path, bool *bad)
{
	const char *s = n->scalar;
	struct kpl_buf out = { 0 };
	size_t rl = strlen(sb->root);
	int k;

	if (!strstr(s, sb->root))
		return NULL;
	if (is_when) {
		kpl_buf_add(&out, "", 0);
		if (!subst_expr(x, s, strlen(s), sb, n, path, &out))
			goto fail;
		goto done;
	}
	if ((k = whole_ref(x, s, sb, n, path, bad)) >= 0) {
		struct pl_node *v = clone(x, sb->values[k], NULL);
		/* Where the reference was: what the value is checked as. */
		v->pos = n->pos;
		v->verbatim = false;
		return v;
	}
	if (*bad)
		return NULL;
	kpl_buf_add(&out, "", 0);
	for (size_t i = 0; s[i];) {
		if (s[i] == '$' && !strncmp(s + i + 1, "${{", 3)) {
			kpl_buf_add(&out, s + i, 4);
			i += 4;
			continue;
		}
		if (strncmp(s + i, "${{", 3)) {
			kpl_buf_add(&out, s + i++, 1);
			continue;
		}
		long close = tpl_find_close(s, i + 3);
		if (close < 0) {
			kpl_buf_str(&out, s + i); /* the validator says what is wrong */
			break;
		}
		size_t b = i + 3, e = (size_t)close;
		while (b < e && (s[b] == ' ' || s[b] == '\t'))
			b++;
		size_t te = e;
		while (te > b && (s[te - 1] == ' ' || s[te - 1] == '\t'))
			te--;
		size_t ne = b + rl + 1;
		while (ne < te && ident_char(s[ne]))
			ne++;
		if (te - b > rl + 1 && !strncmp(s + b, sb->root, rl) && s[b + rl] == '.' && ne == te) {
			/* ${{ ROOT.NAME }} alone: the value itself. */
			if ((k = lookup(x, sb, s + b + rl + 1, te - b - rl - 1, n, path)) < 0)
				goto fail;
			const char *v = sb->values[k]->scalar;
			if (plain_text(v) || strstr(v, "${{")) {
				kpl_buf_str(&out, v);
			} else {
				kpl_buf_str(&out, "${{ ");
				if (!subst_expr(x, s + b, te - b, sb, n, path, &out))
					goto fail;
				kpl_buf_str(&out, " }}");
			}
		} else {
			kpl_buf_str(&out, "${{");
			if (!subst_expr(x, s + i + 3, e - i - 3, sb, n, path, &out))
				goto fail;
			kpl_buf_str(&out, "}}");
		}
		i = e + 2;
	}
done:
	if (out.len > KPL_MAX_VALUE_LEN) {
		pl_diagf(x->c, KPL_ETOOBIG, n->pos, path, "a value of %zu bytes once %s are put in; "
			 "the limit is %d", out.len, sb->root, KPL_MAX_VALUE_LEN);
		goto fail;
	}
	struct pl_node *m = node_alloc(x, PL_SCALAR, n->pos);
	m->scalar = out.s;
	m->plain = n->plain;
	m->style = n->style;
	return m;
fail:
	*bad = true;
	free(out.s);
	return NULL;
}

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

/* clone with substitution in every scalar value (keys stay). top: n is a
 * stage, whose `when` is an expression. */
static struct pl_node *clone_subst(struct rx *x, const struct pl_node *n, const struct subst *sb,
				   const struct pl_pos *use, bool top, const char *path, bool *bad)
{
	char sub[PATH_LEN];

	if (n->type == PL_SCALAR) {
		struct pl_node *m = subst_scalar(x, n, sb, false, path, bad);
		if (!m)
			return clone(x, n, use);
		if (use && m->pos.file) {
			m->pos.use_line = use->line;
			m->pos.use_col = use->col;
		}
		return m;
	}
	struct pl_node *m = node_alloc(x, n->type, n->pos);
	if (use && m->pos.file) {
		m->pos.use_line = use->line;
		m->pos.use_col = use->col;
	}
	for (size_t i = 0; i < n->n && !x->too_big; i++) {
		struct pl_node *v = NULL;
		if (n->type == PL_MAP)
			path_key(sub, path, n->keys[i]->scalar);
		else
			path_idx(sub, path, i);
		if (top && n->type == PL_MAP && !strcmp(n->keys[i]->scalar, "when") &&
		    n->items[i]->type == PL_SCALAR) {
			v = subst_scalar(x, n->items[i], sb, true, sub, bad);
			if (v && use && v->pos.file) {
				v->pos.use_line = use->line;
				v->pos.use_col = use->col;
			}
		}
		if (!v)
			v = clone_subst(x, n->items[i], sb, use, false, sub, bad);
		add_item(m, n->keys ? clone(x, n->keys[i], use) : NULL, v);
	}
	return m;
}

/* ---- paths ---- */

int reuse_path(const char *written, char out[REUSE_MAX_PATH + 1], const char **why)
{
	const char *p;

	if (strncmp(written, "./", 2)) {
		*why = strstr(written, "://") ? "templates come from this repository only, never from a URL: "
						"write a path starting with ./"
		       : written[0] == '/' ? "an absolute path: write a path relative to the pipeline "
					     "file's directory, starting with ./"
					   : "write a path relative to the pipeline file's directory, "
					     "starting with ./";
		return KPL_EINVAL;
	}
	p = written + 2;
	if (!*p || strlen(p) > REUSE_MAX_PATH) {
		*why = !*p ? "no file after ./" : "a path longer than 256 bytes";
		return KPL_EINVAL;
	}
	for (const char *seg = p; *seg;) {
		size_t n = strcspn(seg, "/");
		if (n == 0 || (n == 1 && seg[0] == '.') || (n == 2 && !strncmp(seg, "..", 2))) {
			*why = n == 2 ? "\"..\" would leave the pipeline's directory: templates live "
					"beside or below it"
				      : "an empty or \".\" part in the path";
			return KPL_EINVAL;
		}
		for (size_t i = 0; i < n; i++)
			if (!(isalnum((unsigned char)seg[i]) || seg[i] == '.' || seg[i] == '_' ||
			      seg[i] == '-')) {
				*why = "use letters, digits, '.', '_', '-' and '/' in a template path";
				return KPL_EINVAL;
			}
		seg += n;
		if (*seg == '/' && !seg[1]) {
			*why = "a path ending in '/' names a directory, not a file";
			return KPL_EINVAL;
		}
		if (*seg)
			seg++;
	}
	snprintf(out, REUSE_MAX_PATH + 1, "%s", p);
	return 0;
}

int reuse_check_files(const struct pl_files *files, struct kpl_err *err)
{
	char key[REUSE_MAX_PATH + 1], *w;
	const char *why;
	size_t total = 0;

	if (!files)
		return 0;
	if (files->n > REUSE_MAX_FILES)
		return kpl_errf(err, KPL_ETOOBIG, "files: %zu template files; the limit is %d",
				files->n, REUSE_MAX_FILES);
	for (size_t i = 0; i < files->n; i++) {
		const struct pl_file *f = &files->v[i];
		if (!f->path || strlen(f->path) > REUSE_MAX_PATH)
			return kpl_errf(err, KPL_EINVAL, "files: a path longer than %d bytes",
					REUSE_MAX_PATH);
		w = kpl_asprintf("./%s", f->path);
		int rc = reuse_path(w, key, &why);
		free(w);
		if (rc || strcmp(key, f->path))
			return kpl_errf(err, KPL_EINVAL, "files[%.100s]: %s", f->path,
					rc ? why : "not a path as `uses:` names it");
		if (f->len > REUSE_MAX_FILE_BYTES)
			return kpl_errf(err, KPL_ETOOBIG, "files[%.100s]: %zu bytes; the limit is %d",
					f->path, f->len, REUSE_MAX_FILE_BYTES);
		total += f->len;
	}
	(void)total; /* each is bounded, and so is their number */
	return 0;
}

void reuse_list_paths(const char *text, size_t len, char ***paths, size_t *n)
{
	static const char *const lists[] = { "stages", "finally" };
	struct pl_node *root = NULL;
	struct kpl_err err = { 0 };
	char key[REUSE_MAX_PATH + 1];
	const char *why;

	*paths = NULL;
	*n = 0;
	if (pl_doc_parse(text, len, NULL, &root, &err) || root->type != PL_MAP) {
		pl_doc_free(root);
		return;
	}
	for (size_t l = 0; l < 2; l++) {
		const struct pl_node *seq = pl_map_get(root, lists[l]);
		for (size_t i = 0; seq && seq->type == PL_SEQ && i < seq->n; i++) {
			const struct pl_node *u = pl_map_get(seq->items[i], "uses");
			bool dup = false;
			if (!u || u->type != PL_SCALAR || reuse_path(u->scalar, key, &why))
				continue;
			for (size_t k = 0; k < *n; k++)
				dup |= !strcmp((*paths)[k], key);
			if (dup || *n >= REUSE_MAX_FILES)
				continue;
			*paths = kpl_realloc(*paths, (*n + 1) * sizeof **paths);
			(*paths)[(*n)++] = kpl_strdup(key);
		}
	}
	pl_doc_free(root);
}

/* ---- templates ---- */

static bool is_key(const char *k, const char *const *allowed)
{
	for (size_t i = 0; allowed[i]; i++)
		if (!strcmp(k, allowed[i]))
			return true;
	return false;
}

static const char *key_list(const char *const *allowed, char *buf, size_t size)
{
	buf[0] = '\0';
	for (size_t i = 0; allowed[i]; i++) {
		size_t used = strlen(buf);
		snprintf(buf + used, size - used, "%s%s", i ? ", " : "", allowed[i]);
	}
	return buf;
}

static bool is_number(const char *s)
{
	char *end;

	if (!*s || isspace((unsigned char)*s))
		return false;
	for (const char *p = s; *p; p++)
		if (!(isdigit((unsigned char)*p) || *p == '-' || *p == '.' || *p == 'e' ||
		      *p == 'E' || *p == '+'))
			return false; /* no inf, nan or hex */
	strtod(s, &end);
	return *end == '\0';
}

/* Whether n is a value of type t; else a diagnostic at n. */
static bool type_ok(struct rx *x, const struct pl_node *n, enum in_type t, const char *path,
		    const char *what)
{
	const char *found = n->type == PL_MAP ? "a mapping" : n->type == PL_SEQ ? "a list"
			    : pl_scalar_is_null(n) ? "nothing (null)" : NULL;

	if (!found && t == IN_STRING)
		return true;
	if (!found && n->plain && t == IN_NUMBER && is_number(n->scalar))
		return true;
	if (!found && n->plain && t == IN_BOOLEAN &&
	    (!strcmp(n->scalar, "true") || !strcmp(n->scalar, "false")))
		return true;
	if (!found && strstr(n->scalar, "${{"))
		pl_diagf(x->c, KPL_EINVAL, n->pos, path, "%s is a %s: write it out (a ${{ }} "
			 "template can be given to a string input only)", what, in_type_names[t]);
	else if (!found && !n->plain && t != IN_STRING)
		pl_diagf(x->c, KPL_EINVAL, n->pos, path, "%s is a %s, found the quoted string "
			 "\"%.60s\": remove the quotes", what, in_type_names[t], n->scalar);
	else
		pl_diagf(x->c, KPL_EINVAL, n->pos, path, "%s is a %s, found %s%.60s%s", what,
			 in_type_names[t], found ? found : "\"", found ? "" : n->scalar,
			 found ? "" : "\"");
	return false;
}

/* Reads and checks template file k (1-based) once; false if unusable. */
static bool tfile_load(struct rx *x, int k, struct pl_pos use)
{
	struct tfile *t = &x->tf[k - 1];
	const struct pl_file *f = &x->c->files->v[k - 1];
	struct pl_pos origin = { 0, 0, k, use.line, use.col };
	const struct pl_node *in, *v;
	char path[PATH_LEN], kpath[PATH_LEN], list[300];
	size_t before = x->c->n_diags;

	if (t->tried)
		return t->ok;
	t->tried = true;
	if (f->len > REUSE_MAX_FILE_BYTES) {
		origin.line = origin.col = 1;
		pl_diagf(x->c, KPL_ETOOBIG, origin, "", "the template is %zu bytes; the limit is %d",
			 f->len, REUSE_MAX_FILE_BYTES);
		return false;
	}
	t->root = pl_build_tree(x->c, f->text, f->len, origin);
	if (x->c->n_diags > before)
		return false;
	origin.line = origin.col = 1;
	if (!t->root || t->root->type != PL_MAP) {
		pl_diagf(x->c, KPL_EINVAL, t->root ? t->root->pos : origin, "",
			 "a template is a mapping (inputs:, stage:)");
		return false;
	}
	for (size_t i = 0; i < t->root->n; i++) {
		const char *key = t->root->keys[i]->scalar;
		if (strcmp(key, "inputs") && strcmp(key, "stage") && strcmp(key, "description"))
			pl_diagf(x->c, KPL_EINVAL, t->root->keys[i]->pos, key,
				 "unknown key \"%.60s\" (a template has: description, inputs, stage)%s",
				 key, !strcmp(key, "stages") ? ": one template holds one stage, under stage:" : "");
	}
	if (!(t->stage = pl_map_get(t->root, "stage"))) {
		pl_diagf(x->c, KPL_EINVAL, t->root->pos, "stage", "missing required key \"stage\"");
	} else if (t->stage->type != PL_MAP) {
		pl_diagf(x->c, KPL_EINVAL, t->stage->pos, "stage",
			 "expected a mapping (kind:, with:, ...)");
	} else {
		for (size_t i = 0; i < t->stage->n; i++) {
			const char *key = t->stage->keys[i]->scalar;
			if (is_key(key, tpl_stage_keys))
				continue;
			path_key(kpath, "stage", key);
			if (!strcmp(key, "uses"))
				pl_diagf(x->c, KPL_EINVAL, t->stage->keys[i]->pos, kpath,
					 "a template cannot use another template");
			else if (!strcmp(key, "name") || !strcmp(key, "needs") ||
				 !strcmp(key, "matrix") || !strcmp(key, "max_parallel"))
				pl_diagf(x->c, KPL_EINVAL, t->stage->keys[i]->pos, kpath,
					 "%s belongs to the stage that uses the template", key);
			else
				pl_diagf(x->c, KPL_EINVAL, t->stage->keys[i]->pos, kpath,
					 "unknown key \"%.60s\" (allowed: %s)", key,
					 key_list(tpl_stage_keys, list, sizeof list));
		}
		if (!pl_map_get(t->stage, "kind"))
			pl_diagf(x->c, KPL_EINVAL, t->stage->pos, "stage.kind",
				 "missing required key \"kind\"");
	}
	if ((in = pl_map_get(t->root, "inputs")) && !pl_scalar_is_null(in)) {
		if (in->type != PL_MAP) {
			pl_diagf(x->c, KPL_EINVAL, in->pos, "inputs",
				 "expected a mapping (NAME: {type, required, default, description})");
		} else if (in->n > REUSE_MAX_INPUTS) {
			pl_diagf(x->c, KPL_ETOOBIG, in->pos, "inputs", "%zu inputs; the limit is %d",
				 in->n, REUSE_MAX_INPUTS);
		} else {
			t->inputs = kpl_calloc(in->n ? in->n : 1, sizeof *t->inputs);
			for (size_t i = 0; i < in->n; i++) {
				const struct pl_node *d = in->items[i];
				struct tpl_input *ti = &t->inputs[t->n_inputs++];
				static const char *const keys[] = { "type", "required", "default",
								     "description", NULL };
				ti->name = in->keys[i]->scalar;
				ti->pos = in->keys[i]->pos;
				path_key(path, "inputs", ti->name);
				bool name_ok = ti->name[0] && strlen(ti->name) <= 64;
				for (const char *p = ti->name; *p; p++)
					name_ok &= ident_char(*p);
				if (!name_ok)
					pl_diagf(x->c, KPL_EINVAL, ti->pos, path, "input name \"%.60s\" is "
						 "not valid: use letters, digits, '_' and '-'", ti->name);
				if (pl_scalar_is_null(d))
					continue;
				if (d->type != PL_MAP) {
					pl_diagf(x->c, KPL_EINVAL, d->pos, path,
						 "expected a mapping {type, required, default, description}");
					continue;
				}
				for (size_t j = 0; j < d->n; j++)
					if (!is_key(d->keys[j]->scalar, keys)) {
						path_key(kpath, path, d->keys[j]->scalar);
						pl_diagf(x->c, KPL_EINVAL, d->keys[j]->pos, kpath,
							 "unknown key \"%.60s\" (allowed: %s)",
							 d->keys[j]->scalar, key_list(keys, list, sizeof list));
					}
				if ((v = pl_map_get(d, "type"))) {
					path_key(kpath, path, "type");
					size_t ty;
					for (ty = 0; ty < 3; ty++)
						if (v->type == PL_SCALAR && !strcmp(v->scalar, in_type_names[ty]))
							break;
					if (ty == 3)
						pl_diagf(x->c, KPL_EINVAL, v->pos, kpath, "unknown type "
							 "(allowed: string, number, boolean)");
					else
						ti->type = (enum in_type)ty;
				}
				if ((v = pl_map_get(d, "required"))) {
					path_key(kpath, path, "required");
					if (v->type != PL_SCALAR || !v->plain ||
					    (strcmp(v->scalar, "true") && strcmp(v->scalar, "false")))
						pl_diagf(x->c, KPL_EINVAL, v->pos, kpath,
							 "expected a bool (true or false)");
					else
						ti->required = v->scalar[0] == 't';
				}
				if ((v = pl_map_get(d, "description")) && v->type != PL_SCALAR) {
					path_key(kpath, path, "description");
					pl_diagf(x->c, KPL_EINVAL, v->pos, kpath, "expected a string");
				}
				if ((v = pl_map_get(d, "default"))) {
					path_key(kpath, path, "default");
					if (ti->required)
						pl_diagf(x->c, KPL_EINVAL, v->pos, kpath, "a required input "
							 "takes no default: drop one of them");
					else if (type_ok(x, v, ti->type, kpath, "the default"))
						ti->def = v;
				}
			}
		}
	}
	t->ok = x->c->n_diags == before;
	return t->ok;
}

/*
 * The stage sn (which has `uses:`) made from its template: a new node, or
 * NULL after diagnostics.
 */
static struct pl_node *expand_uses(struct rx *x, const struct pl_node *sn, const char *path,
				   char **uses)
{
	const struct pl_node *u = pl_map_get(sn, "uses"), *with = pl_map_get(sn, "with");
	char key[REUSE_MAX_PATH + 1], kpath[PATH_LEN], list[400];
	const char *why;
	size_t before = x->c->n_diags;
	int k = 0;

	path_key(kpath, path, "uses");
	if (u->type != PL_SCALAR || pl_scalar_is_null(u)) {
		pl_diagf(x->c, KPL_EINVAL, u->pos, kpath, "expected a path such as ./ci/deploy.kpl.yaml");
		return NULL;
	}
	if (reuse_path(u->scalar, key, &why)) {
		pl_diagf(x->c, KPL_EINVAL, u->pos, kpath, "\"%.100s\": %s", u->scalar, why);
		return NULL;
	}
	for (size_t i = 0; x->c->files && i < x->c->files->n; i++)
		if (!strcmp(x->c->files->v[i].path, key))
			k = (int)i + 1;
	if (!k) {
		pl_diagf(x->c, KPL_EINVAL, u->pos, kpath,
			 "\"%.100s\": no such file beside the pipeline (kplctl sends the files "
			 "next to the pipeline file; a registered pipeline reads them from its "
			 "repository at the same commit)", u->scalar);
		return NULL;
	}
	for (size_t i = 0; i < sn->n; i++) {
		const char *kk = sn->keys[i]->scalar;
		if (is_key(kk, using_keys))
			continue;
		char p2[PATH_LEN];
		path_key(p2, path, kk);
		if (!strcmp(kk, "kind"))
			pl_diagf(x->c, KPL_EINVAL, sn->keys[i]->pos, p2,
				 "the template sets the kind: a stage with uses: has no kind");
		else
			pl_diagf(x->c, KPL_EINVAL, sn->keys[i]->pos, p2,
				 "unknown key \"%.60s\" (a stage with uses: takes %s)", kk,
				 key_list(using_keys, list, sizeof list));
	}
	if (!tfile_load(x, k, u->pos))
		return NULL;
	struct tfile *t = &x->tf[k - 1];
	const char *tname = x->c->files->v[k - 1].path;

	/* The inputs given, checked against the declaration. */
	path_key(kpath, path, "with");
	if (with && !pl_scalar_is_null(with) && with->type != PL_MAP) {
		pl_diagf(x->c, KPL_EINVAL, with->pos, kpath, "expected a mapping of the "
			 "template's inputs (NAME: value)");
		return NULL;
	}
	const char **names = kpl_calloc(t->n_inputs + 1, sizeof *names);
	const struct pl_node **values = kpl_calloc(t->n_inputs + 1, sizeof *values);
	bool *literal = kpl_calloc(t->n_inputs + 1, sizeof *literal);
	struct pl_node **made = kpl_calloc(t->n_inputs + 1, sizeof *made);
	struct pl_node *out = NULL;
	bool bad = false;

	for (size_t i = 0; with && with->type == PL_MAP && i < with->n; i++) {
		const char *name = with->keys[i]->scalar;
		size_t j;
		char ipath[PATH_LEN];
		for (j = 0; j < t->n_inputs; j++)
			if (!strcmp(t->inputs[j].name, name))
				break;
		path_key(ipath, kpath, name);
		if (j == t->n_inputs) {
			char decl[300] = "";
			for (size_t m = 0; m < t->n_inputs; m++) {
				size_t used = strlen(decl);
				snprintf(decl + used, sizeof decl - used, "%s%s", m ? ", " : "",
					 t->inputs[m].name);
			}
			pl_diagf(x->c, KPL_EINVAL, with->keys[i]->pos, ipath,
				 "unknown input \"%.60s\": %s declares %s", name, tname,
				 t->n_inputs ? decl : "no inputs");
			continue;
		}
		char what[200];
		snprintf(what, sizeof what, "input \"%s\" (declared at %s:%d:%d)", name, tname,
			 t->inputs[j].pos.line, t->inputs[j].pos.col);
		if (type_ok(x, with->items[i], t->inputs[j].type, ipath, what))
			values[j] = with->items[i];
	}
	for (size_t j = 0; j < t->n_inputs; j++) {
		const struct tpl_input *ti = &t->inputs[j];
		names[j] = ti->name;
		literal[j] = ti->type != IN_STRING;
		if (values[j])
			continue;
		if (pl_map_get(with, ti->name))
			continue; /* given, of the wrong type: said */
		if (ti->required) {
			struct pl_pos at = ti->pos;
			at.use_line = u->pos.line;
			at.use_col = u->pos.col;
			pl_diagf(x->c, KPL_EINVAL, at, "", "input \"%s\" is required, and the stage "
				 "that uses the template gives no with.%s", ti->name, ti->name);
			continue;
		}
		if (ti->def) {
			values[j] = ti->def;
			continue;
		}
		/* Optional without a default: the type's zero, as params have. */
		made[j] = scalar_new(x, ti->type == IN_NUMBER ? "0" : ti->type == IN_BOOLEAN ? "false" : "",
				     ti->pos, ti->type != IN_STRING);
		values[j] = made[j];
	}
	if (x->c->n_diags > before)
		goto done;

	struct subst sb = { "inputs", names, values, literal, t->n_inputs };
	struct pl_node *body = clone_subst(x, t->stage, &sb, &u->pos, true, path, &bad);
	if (bad) {
		pl_node_free(body);
		goto done;
	}
	/* The stage: name and needs from the user, the rest from the
	 * template unless the user sets it; env is both, the user's winning. */
	static const char *const order[] = { "name", "kind", "needs", "when", "timeout", "retries",
					     "continue_on_error", "env", "with", "runs_on",
					     "matrix", "max_parallel", NULL };
	out = node_alloc(x, PL_MAP, sn->pos);
	for (size_t o = 0; order[o]; o++) {
		const char *kk = order[o];
		const struct pl_node *mine = !strcmp(kk, "with") ? NULL : pl_map_get(sn, kk);
		const struct pl_node *theirs = pl_map_get(body, kk);
		const struct pl_node *from = mine ? sn : body;
		struct pl_node *v;
		size_t idx;

		if (!mine && !theirs)
			continue;
		for (idx = 0; idx + 1 < from->n && strcmp(from->keys[idx]->scalar, kk); idx++)
			;
		if (!strcmp(kk, "env") && mine && theirs && mine->type == PL_MAP &&
		    theirs->type == PL_MAP) {
			v = clone(x, mine, NULL);
			for (size_t i = 0; i < theirs->n; i++)
				if (!pl_map_get(mine, theirs->keys[i]->scalar))
					add_item(v, clone(x, theirs->keys[i], NULL),
						 clone(x, theirs->items[i], NULL));
		} else {
			v = clone(x, mine ? mine : theirs, NULL);
		}
		add_item(out, clone(x, from->keys[idx], NULL), v);
	}
	pl_node_free(body);
done:
	for (size_t j = 0; j < t->n_inputs; j++)
		pl_node_free(made[j]);
	free(made);
	free(names);
	free(values);
	free(literal);
	if (x->c->n_diags > before) {
		pl_node_free(out);
		return NULL;
	}
	*uses = kpl_strdup(key);
	return out;
}

/* ---- matrix ---- */

struct dim {
	const char *name;
	const struct pl_node *key, *vals;
};

static bool matrix_value_ok(struct rx *x, const struct pl_node *v, const char *path)
{
	if (v->type != PL_SCALAR || pl_scalar_is_null(v)) {
		pl_diagf(x->c, KPL_EINVAL, v->pos, path, "a matrix value is a string or number");
		return false;
	}
	if (!v->scalar[0] || strlen(v->scalar) > REUSE_MAX_VALUE_LEN || !plain_text(v->scalar)) {
		pl_diagf(x->c, KPL_EINVAL, v->pos, path, "matrix value \"%.60s\" is not valid: it "
			 "names the stage, so use 1 to %d letters, digits, '.', '_', '-' and '+'",
			 v->scalar, REUSE_MAX_VALUE_LEN);
		return false;
	}
	return true;
}

/* Whether the combination (values per dim) is matched by entry e (a map
 * of some keys to values). */
static bool combo_matches(const struct pl_node *e, const struct dim *d, size_t nd,
			  const struct pl_node *const *combo)
{
	for (size_t i = 0; i < e->n; i++) {
		size_t k;
		for (k = 0; k < nd; k++)
			if (!strcmp(d[k].name, e->keys[i]->scalar))
				break;
		if (k == nd || e->items[i]->type != PL_SCALAR ||
		    strcmp(e->items[i]->scalar, combo[k]->scalar))
			return false;
	}
	return true;
}

/* Checks an include/exclude entry: a mapping of matrix keys (all of them
 * for include) to valid values. */
static bool entry_ok(struct rx *x, const struct pl_node *e, const struct dim *d, size_t nd,
		     bool include, const char *path)
{
	char kpath[PATH_LEN];

	if (e->type != PL_MAP || e->n == 0) {
		pl_diagf(x->c, KPL_EINVAL, e->pos, path, "expected a mapping of matrix keys to values");
		return false;
	}
	for (size_t i = 0; i < e->n; i++) {
		size_t k;
		path_key(kpath, path, e->keys[i]->scalar);
		for (k = 0; k < nd; k++)
			if (!strcmp(d[k].name, e->keys[i]->scalar))
				break;
		if (k == nd) {
			pl_diagf(x->c, KPL_EINVAL, e->keys[i]->pos, kpath, "\"%.60s\" is not a key of "
				 "this matrix", e->keys[i]->scalar);
			return false;
		}
		if (!matrix_value_ok(x, e->items[i], kpath))
			return false;
	}
	if (include && e->n != nd) {
		pl_diagf(x->c, KPL_EINVAL, e->pos, path, "an include entry gives a value for every "
			 "matrix key (%zu of %zu given)", e->n, nd);
		return false;
	}
	return true;
}

/*
 * Appends sn's instances (sn has matrix:) to list; false after
 * diagnostics. name: the stage's name.
 */
static bool expand_matrix(struct rx *x, const struct pl_node *sn, const char *path, size_t orig,
			  struct pl_node *list)
{
	const struct pl_node *m = pl_map_get(sn, "matrix"), *mp = pl_map_get(sn, "max_parallel");
	const struct pl_node *nm = pl_map_get(sn, "name");
	const struct pl_node *inc = NULL, *exc = NULL;
	struct dim d[REUSE_MAX_KEYS];
	size_t nd = 0, before = x->c->n_diags;
	char mpath[PATH_LEN], kpath[PATH_LEN], ipath[PATH_LEN];
	uint32_t max_parallel = 0;

	path_key(mpath, path, "matrix");
	if (mp) {
		path_key(kpath, path, "max_parallel");
		char *end = NULL;
		long v = mp->type == PL_SCALAR && mp->plain ? strtol(mp->scalar, &end, 10) : 0;
		if (!m)
			pl_diagf(x->c, KPL_EINVAL, mp->pos, kpath, "max_parallel bounds the instances "
				 "of a matrix stage: this stage has no matrix");
		else if (!end || *end || !mp->scalar[0] || v < 1 || v > REUSE_MAX_INSTANCES)
			pl_diagf(x->c, KPL_EINVAL, mp->pos, kpath, "expected a whole number from 1 to %d",
				 REUSE_MAX_INSTANCES);
		else
			max_parallel = (uint32_t)v;
	}
	if (!m)
		return false;
	if (!nm || nm->type != PL_SCALAR || !nm->scalar[0] || strlen(nm->scalar) > 64) {
		pl_diagf(x->c, KPL_EINVAL, nm ? nm->pos : sn->pos, path, "a matrix stage needs a "
			 "name of at most 64 characters (its instances are named after it)");
		return false;
	}
	for (const char *p = nm->scalar; *p; p++)
		if (!ident_char(*p)) {
			path_key(kpath, path, "name");
			pl_diagf(x->c, KPL_EINVAL, nm->pos, kpath, "stage name \"%.60s\" is not valid: "
				 "use letters, digits, '_' and '-'", nm->scalar);
			return false;
		}
	if (m->type != PL_MAP || m->n == 0) {
		pl_diagf(x->c, KPL_EINVAL, m->pos, mpath, "expected a mapping of keys to lists of "
			 "values, e.g. { os: [linux, darwin] }");
		return false;
	}
	for (size_t i = 0; i < m->n; i++) {
		const char *k = m->keys[i]->scalar;
		path_key(kpath, mpath, k);
		if (!strcmp(k, "include")) {
			inc = m->items[i];
			continue;
		}
		if (!strcmp(k, "exclude")) {
			exc = m->items[i];
			continue;
		}
		if (nd == REUSE_MAX_KEYS) {
			pl_diagf(x->c, KPL_ETOOBIG, m->keys[i]->pos, kpath, "more than %d matrix keys",
				 REUSE_MAX_KEYS);
			return false;
		}
		bool ok = k[0] && strlen(k) <= 64;
		for (const char *p = k; *p; p++)
			ok &= ident_char(*p);
		if (!ok) {
			pl_diagf(x->c, KPL_EINVAL, m->keys[i]->pos, kpath, "matrix key \"%.60s\" is not "
				 "valid: use letters, digits, '_' and '-'", k);
			continue;
		}
		const struct pl_node *vals = m->items[i];
		if (vals->type != PL_SEQ || vals->n == 0) {
			pl_diagf(x->c, KPL_EINVAL, vals->pos, kpath, "expected a non-empty list of values");
			continue;
		}
		if (vals->n > REUSE_MAX_VALUES) {
			pl_diagf(x->c, KPL_ETOOBIG, vals->pos, kpath, "%zu values; the limit is %d",
				 vals->n, REUSE_MAX_VALUES);
			continue;
		}
		for (size_t j = 0; j < vals->n; j++) {
			path_idx(ipath, kpath, j);
			if (!matrix_value_ok(x, vals->items[j], ipath))
				continue;
			for (size_t p = 0; p < j; p++)
				if (vals->items[p]->type == PL_SCALAR &&
				    !strcmp(vals->items[p]->scalar, vals->items[j]->scalar)) {
					pl_diagf(x->c, KPL_EINVAL, vals->items[j]->pos, ipath,
						 "\"%s\" is listed twice", vals->items[j]->scalar);
					break;
				}
		}
		d[nd].name = k;
		d[nd].key = m->keys[i];
		d[nd].vals = vals;
		nd++;
	}
	if (!nd && x->c->n_diags == before)
		pl_diagf(x->c, KPL_EINVAL, m->pos, mpath, "a matrix needs at least one key with values");
	if (inc && inc->type != PL_SEQ) {
		path_key(kpath, mpath, "include");
		pl_diagf(x->c, KPL_EINVAL, inc->pos, kpath, "expected a list of {key: value} entries");
	}
	if (exc && exc->type != PL_SEQ) {
		path_key(kpath, mpath, "exclude");
		pl_diagf(x->c, KPL_EINVAL, exc->pos, kpath, "expected a list of {key: value} entries");
	}
	for (size_t i = 0; inc && inc->type == PL_SEQ && i < inc->n; i++) {
		path_key(kpath, mpath, "include");
		path_idx(ipath, kpath, i);
		entry_ok(x, inc->items[i], d, nd, true, ipath);
	}
	for (size_t i = 0; exc && exc->type == PL_SEQ && i < exc->n; i++) {
		path_key(kpath, mpath, "exclude");
		path_idx(ipath, kpath, i);
		entry_ok(x, exc->items[i], d, nd, false, ipath);
	}
	if (x->c->n_diags > before)
		return false;

	/* The product, key by key (the last varies fastest), minus excluded,
	 * plus included; bounded before anything is made. */
	size_t total = 1;
	for (size_t k = 0; k < nd; k++) {
		total *= d[k].vals->n;
		if (total > 100000)
			break;
	}
	size_t n_inc = inc && inc->type == PL_SEQ ? inc->n : 0;
	if (total > 100000) {
		pl_diagf(x->c, KPL_ETOOBIG, m->pos, mpath, "over 100000 combinations; the limit is "
			 "%d instances", REUSE_MAX_INSTANCES);
		return false;
	}
	const struct pl_node *(*combos)[REUSE_MAX_KEYS] =
		kpl_calloc(total + n_inc, sizeof *combos);
	size_t n = 0, idx[REUSE_MAX_KEYS] = { 0 };
	for (size_t c = 0; c < total; c++) {
		const struct pl_node *combo[REUSE_MAX_KEYS];
		bool excluded = false;
		for (size_t k = 0; k < nd; k++)
			combo[k] = d[k].vals->items[idx[k]];
		for (size_t e = 0; exc && exc->type == PL_SEQ && e < exc->n && !excluded; e++)
			excluded = combo_matches(exc->items[e], d, nd, combo);
		if (!excluded)
			memcpy(combos[n++], combo, sizeof combo);
		for (size_t k = nd; k-- > 0;) {
			if (++idx[k] < d[k].vals->n)
				break;
			idx[k] = 0;
		}
	}
	for (size_t e = 0; e < n_inc; e++) {
		const struct pl_node *combo[REUSE_MAX_KEYS];
		const struct pl_node *en = inc->items[e];
		for (size_t k = 0; k < nd; k++)
			combo[k] = pl_map_get(en, d[k].name);
		bool dup = false;
		for (size_t c = 0; c < n && !dup; c++)
			dup = combo_matches(en, d, nd, combos[c]);
		if (!dup)
			memcpy(combos[n++], combo, sizeof combo);
	}
	if (n == 0)
		pl_diagf(x->c, KPL_EINVAL, m->pos, mpath, "every combination is excluded: the stage "
			 "would have no instance");
	else if (n > REUSE_MAX_INSTANCES)
		pl_diagf(x->c, KPL_ETOOBIG, m->pos, mpath, "%zu instances; the limit is %d", n,
			 REUSE_MAX_INSTANCES);
	for (size_t c = 0; c < n && x->c->n_diags == before && !x->too_big; c++) {
		const char *names[REUSE_MAX_KEYS];
		bool literal[REUSE_MAX_KEYS], bad = false;
		struct kpl_buf name = { 0 };
		kpl_buf_str(&name, nm->scalar);
		for (size_t k = 0; k < nd; k++) {
			kpl_buf_str(&name, k ? "," : "[");
			kpl_buf_str(&name, d[k].name);
			kpl_buf_str(&name, "=");
			kpl_buf_str(&name, combos[c][k]->scalar);
			names[k] = d[k].name;
			literal[k] = combos[c][k]->plain && (is_number(combos[c][k]->scalar) ||
							      !strcmp(combos[c][k]->scalar, "true") ||
							      !strcmp(combos[c][k]->scalar, "false"));
		}
		kpl_buf_str(&name, "]");
		if (name.len > KPL_MAX_NAME_LEN) {
			path_key(kpath, path, "name");
			pl_diagf(x->c, KPL_EINVAL, nm->pos, kpath, "instance name \"%.60s...\" is %zu "
				 "characters long; the limit is %d: shorten the name, keys or values",
				 name.s, name.len, KPL_MAX_NAME_LEN);
			free(name.s);
			break;
		}
		struct subst sb = { "matrix", names, combos[c], literal, nd };
		struct pl_node *inst = node_alloc(x, PL_MAP, sn->pos);
		for (size_t i = 0; i < sn->n && !bad; i++) {
			const char *k = sn->keys[i]->scalar;
			struct pl_node *v;
			if (!strcmp(k, "matrix") || !strcmp(k, "max_parallel"))
				continue;
			path_key(kpath, path, k);
			if (!strcmp(k, "name")) {
				v = scalar_new(x, name.s, nm->pos, false);
				v->expanded = true;
			} else if (!strcmp(k, "when") && sn->items[i]->type == PL_SCALAR) {
				v = subst_scalar(x, sn->items[i], &sb, true, kpath, &bad);
				if (!v && !bad)
					v = clone(x, sn->items[i], NULL);
			} else {
				v = clone_subst(x, sn->items[i], &sb, NULL, false, kpath, &bad);
			}
			if (v)
				add_item(inst, clone(x, sn->keys[i], NULL), v);
		}
		free(name.s);
		add_item(list, NULL, inst);
		x->out = kpl_realloc(x->out, (x->n_out + 1) * sizeof *x->out);
		x->out[x->n_out++] = (struct reuse_stage){ orig, kpl_strdup(nm->scalar), NULL,
							   max_parallel };
		if (bad)
			break;
	}
	free(combos);
	return x->c->n_diags == before;
}

/* ---- the lists ---- */

static bool needs_reuse(const struct pl_node *sn)
{
	return sn->type == PL_MAP && (pl_map_get(sn, "matrix") || pl_map_get(sn, "uses") ||
				      pl_map_get(sn, "max_parallel"));
}

/* needs naming a matrix stage mean all its instances: list[from..) are
 * this list's rewritten stages, out[from..) their origins. */
static void rewrite_needs(struct rx *x, struct pl_node *list, size_t from)
{
	for (size_t i = 0; i < list->n; i++) {
		struct pl_node *sn = list->items[i];
		struct pl_node *nn = NULL;
		size_t at;
		if (sn->type != PL_MAP)
			continue;
		for (at = 0; at < sn->n; at++)
			if (!strcmp(sn->keys[at]->scalar, "needs"))
				break;
		if (at == sn->n)
			continue;
		nn = sn->items[at];
		const struct pl_node *const *ents = nn->type == PL_SEQ ? (const struct pl_node *const *)nn->items
				       : (const struct pl_node *const *)&sn->items[at];
		size_t n_ents = nn->type == PL_SEQ ? nn->n : nn->type == PL_SCALAR ? 1 : 0;
		bool any = false;
		for (size_t j = 0; j < n_ents && !any; j++)
			for (size_t s = 0; s < list->n && !any; s++)
				any = ents[j]->type == PL_SCALAR && x->out[from + s].matrix &&
				      !strcmp(x->out[from + s].matrix, ents[j]->scalar);
		if (!any)
			continue;
		struct pl_node *seq = node_alloc(x, PL_SEQ, nn->pos);
		for (size_t j = 0; j < n_ents; j++) {
			bool expanded = false;
			for (size_t s = 0; s < list->n; s++) {
				const struct pl_node *nm = pl_map_get(list->items[s], "name");
				if (ents[j]->type != PL_SCALAR || !x->out[from + s].matrix ||
				    strcmp(x->out[from + s].matrix, ents[j]->scalar) || !nm)
					continue;
				struct pl_node *e = scalar_new(x, nm->scalar, ents[j]->pos, ents[j]->plain);
				e->expanded = true;
				add_item(seq, NULL, e);
				expanded = true;
			}
			if (!expanded)
				add_item(seq, NULL, clone(x, ents[j], NULL));
		}
		pl_node_free(nn);
		sn->items[at] = seq;
	}
}

void reuse_expand(struct vctx *c, struct pl_node *root)
{
	static const char *const lists[] = { "stages", "finally" };
	struct rx x = { .c = c };
	bool any = false;
	char path[PATH_LEN];

	if (!root || root->type != PL_MAP)
		return;
	for (size_t l = 0; l < 2; l++) {
		const struct pl_node *seq = pl_map_get(root, lists[l]);
		for (size_t i = 0; seq && seq->type == PL_SEQ && i < seq->n; i++)
			any |= needs_reuse(seq->items[i]);
	}
	if (!any)
		return; /* the tree as written: nothing to do */
	x.tf = kpl_calloc(c->files && c->files->n ? c->files->n : 1, sizeof *x.tf);
	for (size_t l = 0; l < 2; l++) {
		size_t at, from = x.n_out;
		for (at = 0; at < root->n; at++)
			if (!strcmp(root->keys[at]->scalar, lists[l]))
				break;
		if (at == root->n || root->items[at]->type != PL_SEQ)
			continue;
		struct pl_node *seq = root->items[at];
		struct pl_node *list = node_alloc(&x, PL_SEQ, seq->pos);
		for (size_t i = 0; i < seq->n; i++) {
			struct pl_node *sn = seq->items[i], *made = NULL;
			size_t first = list->n;
			path_idx(path, lists[l], i);
			/* The matrix first, so an instance's `with:` inputs hold
			 * its values; then each instance's template. */
			if (needs_reuse(sn) && (pl_map_get(sn, "matrix") ||
						pl_map_get(sn, "max_parallel")) &&
			    expand_matrix(&x, sn, path, i, list)) {
				for (size_t j = first; j < list->n; j++) {
					if (!pl_map_get(list->items[j], "uses"))
						continue;
					made = expand_uses(&x, list->items[j], path,
							   &x.out[from + j].uses);
					if (!made)
						break;
					pl_node_free(list->items[j]);
					list->items[j] = made;
				}
				continue;
			}
			char *uses = NULL;
			if (needs_reuse(sn) && pl_map_get(sn, "uses"))
				made = expand_uses(&x, sn, path, &uses);
			add_item(list, NULL, made ? made : clone(&x, sn, NULL));
			x.out = kpl_realloc(x.out, (x.n_out + 1) * sizeof *x.out);
			x.out[x.n_out++] = (struct reuse_stage){ i, NULL, uses, 0 };
		}
		/* A failed matrix left fewer entries than stages: the rest
		 * is not validated (diagnostics stop it), only freed. */
		if (list->n == x.n_out - from)
			rewrite_needs(&x, list, from);
		pl_node_free(seq);
		root->items[at] = list;
	}
	for (size_t i = 0; c->files && i < c->files->n; i++) {
		pl_node_free(x.tf[i].root);
		free(x.tf[i].inputs);
	}
	free(x.tf);
	c->reuse = x.out;
	c->n_reuse = x.n_out;
}

void reuse_release(struct vctx *c)
{
	for (size_t i = 0; i < c->n_reuse; i++) {
		free(c->reuse[i].matrix);
		free(c->reuse[i].uses);
	}
	free(c->reuse);
	c->reuse = NULL;
	c->n_reuse = 0;
}
