/*
 * reuse.h - matrix stages and stage templates: rewriting a pipeline's tree
 * into plain stages before it is validated (pipeline.c calls it).
 *
 * A stage with `matrix:` becomes one stage per combination of its values,
 * named "NAME[k1=v1,k2=v2]" (keys in the order written), with each
 * ${{ matrix.KEY }} replaced by the value; `needs: [NAME]` anywhere in the
 * same list means every instance. A stage with `uses: ./PATH` takes its
 * kind, with, env, ... from a template file (its `stage:`), with each
 * ${{ inputs.NAME }} replaced by the using stage's `with:` value, checked
 * against the template's `inputs:`. A template cannot use another.
 *
 * Template paths: "./" then a path relative to the pipeline file's
 * directory, without "..", absolute paths or URLs (no network fetch, ever);
 * the caller supplies the texts (struct pl_files): kpld reads them from the
 * repository at the pipeline file's commit, kplctl from the disk next to
 * the file it submits.
 *
 * Nothing here does I/O; any thread may call it.
 */
#ifndef KPL_REUSE_H
#define KPL_REUSE_H

#include "pipelines/pipeline.h"

/* Limits. */
#define REUSE_MAX_INSTANCES 256   /* of one matrix stage */
#define REUSE_MAX_KEYS 8          /* matrix keys of one stage */
#define REUSE_MAX_VALUES 64       /* values of one matrix key */
#define REUSE_MAX_VALUE_LEN 64    /* bytes of one matrix value */
#define REUSE_MAX_FILES 16        /* template files of one pipeline */
#define REUSE_MAX_FILE_BYTES (64 * 1024)
#define REUSE_MAX_PATH 256
#define REUSE_MAX_INPUTS 64

struct vctx;

/* One stage of the rewritten lists (pl_internal.h's vctx.reuse). */
struct reuse_stage {
	size_t orig;          /* its index in its list as written */
	char *matrix;         /* owned: the matrix stage's name, or NULL */
	char *uses;           /* owned: the template's path (pl_files key), or NULL */
	uint32_t max_parallel;
};

/* Rewrites root's stages and finally lists in place (pipeline.c, before
 * validate); problems go to c's diagnostics. Sets c->reuse. */
void reuse_expand(struct vctx *c, struct pl_node *root);
/* Frees c->reuse. */
void reuse_release(struct vctx *c);

/*
 * Checks a `uses:` path as written ("./ci/deploy.kpl.yaml") and writes its
 * key in struct pl_files ("ci/deploy.kpl.yaml") into out. Returns 0, or
 * KPL_EINVAL with *why static text.
 */
int reuse_path(const char *written, char out[REUSE_MAX_PATH + 1], const char **why);

/*
 * The template files a pipeline text uses, for whoever supplies them:
 * *paths (*n of them, in file order, each once) are keys as in struct
 * pl_files, malloc'd (free each and the array). A text that does not parse
 * or names a bad path lists what it can (the parser reports the rest).
 */
void reuse_list_paths(const char *text, size_t len, char ***paths, size_t *n);

/*
 * Checks template files a caller sent (SubmitRun, ValidatePipeline): at
 * most REUSE_MAX_FILES, each path a valid key (no "..", not absolute, not a
 * URL), each text at most REUSE_MAX_FILE_BYTES. Returns 0 or KPL_EINVAL /
 * KPL_ETOOBIG with err naming the file.
 */
int reuse_check_files(const struct pl_files *files, struct kpl_err *err);

#endif
