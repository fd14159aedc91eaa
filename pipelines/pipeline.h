/*
 * pipeline.h - the pipeline file: parse YAML or JSON text into one model,
 * and validate it before anything runs.
 *
 * A parsed pipeline owns all its memory (one pipeline_free releases it).
 * Nothing here does I/O or touches the loop; any thread may call it.
 */
#ifndef KPL_PIPELINE_H
#define KPL_PIPELINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"
#include "pipelines/expr.h"

/* Cap on the nodes of one document, so a small file of tiny items cannot
 * make a huge tree. */
#define PL_MAX_NODES 100000

/* Where a node starts in the source text, 1-based. file is 0 for the
 * pipeline file itself, k for the k-th of its template files (struct
 * pl_files, pipelines/reuse.h); then use_line:use_col is where the pipeline
 * file's `uses:` brought it in. */
struct pl_pos {
	int line;
	int col;
	int file;
	int use_line, use_col;
};

/*
 * The document tree, as written: mappings keep key order, scalars keep their
 * text (JSON numbers and booleans arrive as scalars too, with plain=true).
 */
enum pl_node_type { PL_SCALAR, PL_SEQ, PL_MAP };

struct pl_node {
	enum pl_node_type type;
	struct pl_pos pos;
	/* PL_SCALAR: NUL-terminated text; plain is false if it was quoted. */
	char *scalar;
	bool plain;
	/* PL_SCALAR: how it was written: 0 plain, '\'' or '"' quoted, '|' or
	 * '>' block. Lets messages point inside one-line scalars. */
	char style;
	/* PL_SCALAR: scalar holds the source characters exactly, on one line
	 * (no escapes, no folding), so an offset in it maps to a column. */
	bool verbatim;
	/* Made by matrix expansion (pipelines/reuse.c): a stage name such as
	 * "build[os=linux]" that the name rules would refuse as written. */
	bool expanded;
	/* PL_SEQ: items[0..n). PL_MAP: keys[i] (scalars) map to items[i]. */
	struct pl_node **items;
	struct pl_node **keys;
	size_t n;
};

/* Returns the value of key in a PL_MAP node, or NULL (borrowed). */
const struct pl_node *pl_map_get(const struct pl_node *map, const char *key);

enum pl_param_type { PL_TYPE_STRING, PL_TYPE_INT, PL_TYPE_BOOL };

struct pl_param {
	char *name;
	enum pl_param_type type;
	char *def; /* default as text, NULL if none */
	bool required;
	char **enum_values; /* NULL-free array of n_enum strings */
	size_t n_enum;
	struct pl_pos pos;
};

/* One KEY: value pair of an `env` mapping. */
struct pl_env {
	char *name;
	char *value; /* may hold ${{ ... }} templates, expanded at run time */
	struct pl_pos pos;
};

struct pl_retries {
	uint32_t count;          /* extra attempts after the first; 0 = none */
	int64_t backoff_ms;      /* first delay */
	int64_t max_backoff_ms;  /* cap on the exponential delay */
};

struct pl_stage {
	char *name;
	char *kind;
	char **needs; /* names of stages in the same graph */
	size_t n_needs;
	char *when;   /* expression text, NULL if none */
	struct expr *when_expr; /* when, parsed (owned); NULL if none */
	int64_t timeout_ms; /* 0 = none */
	struct pl_retries retries;
	bool continue_on_error;
	struct pl_env *env;
	size_t n_env;
	/* The kind-specific `with` mapping (borrowed from the tree; NULL if
	 * absent or written as an empty `with:`). Stage kinds read it
	 * through their own validate/start. */
	const struct pl_node *with;
	bool is_finally; /* listed under `finally:` */
	struct pl_pos pos;
	/* Where its command runs (pipelines/runs_on.h): the stage's own
	 * `runs_on` and the pipeline's `defaults.runs_on`, borrowed from the
	 * tree, NULL if absent; both NULL for kinds without runs_on. */
	const struct pl_node *runs_on;
	const struct pl_node *runs_on_defaults;
	/* An instance of a `matrix:` stage: the stage's name as written
	 * ("build" for "build[os=linux]"), else NULL; and its max_parallel
	 * (0: no bound), which the engine holds across the instances. */
	char *matrix;
	uint32_t max_parallel;
	/* Made from a stage template: its path (a pl_files key), else NULL. */
	char *uses;
};

struct pl_concurrency {
	char *group; /* template text, NULL if none */
	bool cancel_in_progress;
};

/*
 * Pipeline-level notifications, sent by kpld itself (engine/notify.h):
 *
 *   notify:
 *     - notifier: team-chat        # a name under `notifiers:` in the daemon
 *       events: [failed, waiting]  # config; checked at submit, not here
 *
 * events defaults to every one. The list is in the same order as the first
 * entries of clients/chatbot/notice.h's NOTICE_KIND_MAP, so bit i of
 * pl_notify.events is that notice kind (engine/notify.c checks the names).
 */
#define PL_NOTIFY_EVENT_MAP(X)                  \
	X(STARTED, "started")                   \
	X(STAGE_FAILED, "stage_failed")         \
	X(WAITING, "waiting")                   \
	X(SUCCEEDED, "succeeded")               \
	X(FAILED, "failed")                     \
	X(CANCELLED, "cancelled")

enum pl_notify_event {
#define PL_NOTIFY_EVENT_ENUM(id, name) PL_NOTIFY_##id,
	PL_NOTIFY_EVENT_MAP(PL_NOTIFY_EVENT_ENUM)
#undef PL_NOTIFY_EVENT_ENUM
	PL_NOTIFY_LAST
};

/* Static name ("stage_failed"); "?" outside the range. */
const char *pl_notify_event_name(enum pl_notify_event ev);

/* At most this many notify entries in a pipeline. */
#define PL_MAX_NOTIFY 16

struct pl_notify {
	char *notifier;  /* the daemon config's notifier name */
	unsigned events; /* bit (1u << pl_notify_event) per wanted event */
	struct pl_pos pos; /* of the entry, for submit-time errors */
};

struct pipeline {
	char *name;
	char *description;
	struct pl_param *params;
	size_t n_params;
	struct pl_env *env;
	size_t n_env;
	struct pl_concurrency concurrency;
	/* The run's `timeout:` (0 = none): counted from the run's start;
	 * past it the run is stopped like a cancel (finally runs) and fails. */
	int64_t timeout_ms;
	struct pl_notify *notify; /* n_notify of them, file order */
	size_t n_notify;
	/* stages, then the finally stages (is_finally), in file order.
	 * n_stages counts every entry, finally ones included; the last
	 * n_finally of them are the finally stages. */
	struct pl_stage *stages;
	size_t n_stages;
	size_t n_finally;
	struct pl_node *root; /* owns every node */
	/* Owners beyond the first (pipeline_ref); pipeline_free drops one. A
	 * parsed pipeline is never changed, so runs of the same text may share
	 * it (engine.c's parse cache). Loop thread only. */
	int refs;
};

/*
 * How the parser checks a stage kind's `with`. kind names a kind; check_with
 * (may be NULL) reports the first problem in with (which may be NULL) into
 * err, naming "file:line:col: path: message" with the path it is given
 * (e.g. "stages[2].with"). Returns 0 or a negative KPL_E* code.
 */
struct pl_kind {
	const char *kind;
	int (*check_with)(const struct pl_node *with, const char *file,
			  const char *path, struct kpl_err *err);
	/* Roots its `with` templates may use beyond EXPR_ROOTS_TEMPLATE
	 * (EXPR_ROOT_CANARY), each only as a whole ${{ root.NAME }}. */
	unsigned with_roots;
	/* `with` keys (NULL-terminated; may be NULL) whose strings reach a
	 * process's command line or a build's arguments, where any user of
	 * the host can read them: a ${{ secrets.X }} there is refused. */
	const char *const *argv_keys;
	/* The keys `with` may hold (NULL-terminated; NULL: the kind checks
	 * them itself). An unknown one is reported with the closest allowed
	 * key ("did you mean"), and check_with is not called. The docs test
	 * (tests/e2e/docs_test.py) reads these tables. */
	const char *const *with_keys;
	/* The kind may run as a pod (`runs_on`, pipelines/runs_on.h). */
	bool runs_on;
	/* Optional, with runs_on: whether a stage with this `with` may run as
	 * a pod (NULL: every one). One that may not stays on kpld's host under
	 * defaults.runs_on; its own runs_on is an error. */
	bool (*pod_capable)(const struct pl_node *with);
	/* Optional, with runs_on: what a stage that runs as a pod needs beyond
	 * runs_on's own keys (runs_on and defaults as pl_runs_on_get takes
	 * them; at: where to report a missing key). 0 or KPL_EINVAL with err
	 * "file:line:col: path: message" (path: the stage's). */
	int (*check_pod)(const struct pl_node *with, const struct pl_node *runs_on,
			 const struct pl_node *defaults, const struct pl_node *at,
			 const char *file, const char *path, struct kpl_err *err);
};

/*
 * Parses and validates text (YAML, or JSON when it starts with '{') of len
 * bytes. file names the source in messages ("pipeline" if NULL). kinds lists
 * the known stage kinds. On success *out owns a new pipeline (free it with
 * pipeline_free). On error returns KPL_EINVAL (or KPL_ETOOBIG over a limit)
 * and err says "file:line:col: key.path: what is wrong".
 */
int pipeline_parse(const char *text, size_t len, const char *file,
		   const struct pl_kind *kinds, size_t n_kinds,
		   struct pipeline **out, struct kpl_err *err);

/* Drops one owner of p; frees it with the last. */
void pipeline_free(struct pipeline *p);

/* Adds an owner to p; returns p. */
struct pipeline *pipeline_ref(struct pipeline *p);

/*
 * The files a pipeline's `uses:` may read (stage templates,
 * pipelines/reuse.h): path as `uses:` names it without the leading "./"
 * (relative to the pipeline file's directory), and its text. Borrowed for
 * the call.
 */
struct pl_file {
	const char *path;
	const char *text;
	size_t len;
};
struct pl_files {
	const struct pl_file *v;
	size_t n;
};

/* pipeline_parse and pipeline_validate_all with the template files a
 * `uses:` may name (files NULL: none, and any `uses:` is an error). */
int pipeline_parse_files(const char *text, size_t len, const char *file,
			 const struct pl_files *files, const struct pl_kind *kinds,
			 size_t n_kinds, struct pipeline **out, struct kpl_err *err);

/*
 * Calls fn for each ${{ secrets.NAME }} in any string value of the file
 * (keys are never expanded), in file order, with where it is; stops at the
 * first non-zero return, which it returns. For the submit-time check of
 * which pipelines may use a secret (engine/secrets.h).
 */
int pipeline_secret_refs(const struct pipeline *p,
			 int (*fn)(void *data, const char *name, struct pl_pos pos),
			 void *data);

/*
 * Reads any YAML/JSON document (the daemon's config file, say) into the same
 * positioned tree, with the same rules (no anchors, no duplicate keys, one
 * document, the size and depth limits). *root is new (pl_doc_free it).
 */
int pl_doc_parse(const char *text, size_t len, const char *file, struct pl_node **root,
		 struct kpl_err *err);
void pl_doc_free(struct pl_node *root);

/*
 * Resolves run parameters against the declared params: given values must be
 * declared and well-typed, missing ones take their default, required ones
 * must be present. names/values (n of them) are the caller's input; on
 * success *out_names and *out_values (*out_n of them) are new malloc'd arrays of
 * malloc'd strings in declaration order (caller frees each and the arrays).
 */
int pipeline_resolve_params(const struct pipeline *p, const char *const *names,
			    const char *const *values, size_t n, char ***out_names,
			    char ***out_values, size_t *out_n, struct kpl_err *err);

/* Parses "90s", "5m", "1h", "250ms", "1h30m" into milliseconds; -1 if bad. */
int64_t pl_parse_duration(const char *s);

/* Longest duration anywhere in a pipeline. */
#define PL_MAX_DURATION_MS (30LL * 24 * 3600 * 1000)

/*
 * pl_parse_duration that says why: returns 0 and sets *ms, or returns
 * KPL_EINVAL and sets *why to static text ("unknown unit \"d\": use ms, s,
 * m or h"). Sequences of <whole number><unit> with units ms, s, m, h, each
 * unit once and from largest to smallest; at most PL_MAX_DURATION_MS.
 */
int pl_duration_parse(const char *s, int64_t *ms, const char **why);

/*
 * One problem found in a pipeline. path is the key path ("stages[1].needs[0]",
 * "" for the document itself); message says what is wrong, without file,
 * position or path. code is KPL_EINVAL, or KPL_ETOOBIG over a limit.
 */
struct pl_diag {
	int line, col;
	char *path;
	char *message;
	int code;
	/* In a template file (pos.file != 0): its path as `uses:` names it
	 * (without "./"), and where the pipeline file uses it; else NULL. */
	char *file;
	int use_line, use_col;
};

/* At most this many diagnostics come back from one validation. */
#define PL_MAX_DIAGS 100

/*
 * Checks text like pipeline_parse but reports every problem it finds, in
 * file order (by line, then column), for editors and a ValidatePipeline
 * RPC. A syntax error ends the scan (the rest cannot be read); semantic
 * errors do not (three bad stages give three diagnostics). Returns 0 if the
 * pipeline is valid (then *n_diags is 0), else the first diagnostic's code.
 * *diags is malloc'd (pl_diags_free it; NULL when there are none).
 */
int pipeline_validate_all(const char *text, size_t len, const char *file,
			  const struct pl_kind *kinds, size_t n_kinds,
			  struct pl_diag **diags, size_t *n_diags);

void pl_diags_free(struct pl_diag *diags, size_t n);

int pipeline_validate_files(const char *text, size_t len, const char *file,
			    const struct pl_files *files, const struct pl_kind *kinds,
			    size_t n_kinds, struct pl_diag **diags, size_t *n_diags);

/* Formats d as "file:line:col: path: message" (no "path: " if path is
 * empty) into buf, like the messages of pipeline_parse; a diagnostic in a
 * template file reads "TEMPLATE:line:col: path: message (used at
 * file:line:col)". */
void pl_diag_format(const struct pl_diag *d, const char *file, char *buf,
		    size_t size);

#endif
