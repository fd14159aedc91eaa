/*
 * pl_internal.h - what pipeline.c shares with reuse.c (matrix and stage
 * templates rewrite the tree before it is validated). Not an API: only
 * files of //pipelines include it.
 */
#ifndef KPL_PL_INTERNAL_H
#define KPL_PL_INTERNAL_H

#include "pipelines/pipeline.h"

struct reuse_stage;

struct vctx {
	const char *file;
	const char *text;
	size_t len;
	const struct pl_kind *kinds;
	size_t n_kinds;
	struct pipeline *p;
	struct pl_diag *diags;
	size_t n_diags;
	size_t n_dropped;
	/* Per stage (index into p->stages): needs resolved to indexes (-1 if
	 * unresolved), and reach[i * n + k] = k is in i's transitive needs. */
	int **need_idx;
	bool *reach;
	/* Extra roots for the `with` being checked (its kind's with_roots). */
	unsigned with_roots;
	/* check_no_secrets is looking at runs_on (a Pod spec). */
	bool in_pod_spec;
	/* defaults.runs_on, once checked (NULL if absent or bad). */
	const struct pl_node *defaults_runs_on;
	/* The template files `uses:` may name (NULL: none). */
	const struct pl_files *files;
	/* While a template file is read: its file index and use position,
	 * given to diagnostics whose position has none. */
	struct pl_pos origin;
	/* After reuse_expand: per stage of the rewritten lists (main, then
	 * finally), where it came from; NULL if nothing was rewritten. */
	struct reuse_stage *reuse;
	size_t n_reuse;
};

/* A diagnostic, as pipeline.c's own (code KPL_EINVAL or KPL_ETOOBIG). */
void pl_diagf(struct vctx *c, int code, struct pl_pos pos, const char *path,
	      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Reads text into a tree with c->origin set to origin (so syntax errors
 * name the template file); NULL after an error (diagnosed) or for an
 * empty document. Every node's pos gets origin's file and use position. */
struct pl_node *pl_build_tree(struct vctx *c, const char *text, size_t len,
			      struct pl_pos origin);

void pl_node_free(struct pl_node *n);
bool pl_scalar_is_null(const struct pl_node *n);

#endif
