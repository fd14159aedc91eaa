/*
 * expr.h - the small expression language of `when:` and of ${{ }}
 * templates.
 *
 *   expr    := or
 *   or      := and ( "||" and )*
 *   and     := cmp ( "&&" cmp )*
 *   cmp     := unary [ ( "==" | "!=" ) unary ]      (no chaining)
 *   unary   := "!" unary | primary
 *   primary := "(" expr ")" | 'string' | "string" | [-]digits
 *            | true | false | reference
 *
 * A reference is a dotted path whose first word (its root) says what it
 * names: params.X, stages.NAME.state, stages.NAME.outputs.KEY, env.X,
 * run.id, secrets.NAME, canary.NAME. The caller says which roots a context allows.
 * Strings have no escapes: write 'it"s' or "it's".
 *
 * Values are strings (every reference yields text), int64 numbers and
 * bools. == and != compare like types directly and compare a string with a
 * number or bool through the other's text ("3" == 3, "true" == true).
 * !, && and || want bools; the strings "true" and "false" count as bools.
 * && and || short-circuit, so the right side is not looked up when the left
 * decides.
 *
 * Nothing here does I/O or keeps global state; any thread may call it.
 */
#ifndef KPL_EXPR_H
#define KPL_EXPR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

/* Roots a context allows, or'ed together for expr_parse. */
#define EXPR_ROOT_PARAMS (1u << 0)
#define EXPR_ROOT_STAGES (1u << 1)
#define EXPR_ROOT_ENV (1u << 2)
#define EXPR_ROOT_RUN (1u << 3)
#define EXPR_ROOT_SECRETS (1u << 4)
/* canary.NAME: the version a canary analysis is about. Not in any default
 * set: only the `with` of a kind that lists it in its with_roots (verify,
 * canary), where the engine leaves it as written for the kind to fill in. */
#define EXPR_ROOT_CANARY (1u << 5)
/* What `when:` allows, and what templates allow. */
#define EXPR_ROOTS_WHEN (EXPR_ROOT_PARAMS | EXPR_ROOT_STAGES)
#define EXPR_ROOTS_TEMPLATE                                                   \
	(EXPR_ROOT_PARAMS | EXPR_ROOT_STAGES | EXPR_ROOT_ENV | EXPR_ROOT_RUN |\
	 EXPR_ROOT_SECRETS)

/* Bounds that keep recursion in parse, eval and free shallow. */
#define EXPR_MAX_NODES 1000
#define EXPR_MAX_NESTING 64

enum expr_kind {
	EXPR_STR,
	EXPR_NUM,
	EXPR_BOOL,
	EXPR_REF,
	EXPR_NOT,
	EXPR_EQ,
	EXPR_NE,
	EXPR_AND,
	EXPR_OR,
	EXPR_KIND_LAST_
};

/* The parts of a reference; stages.NAME.outputs.KEY has 4. */
#define EXPR_MAX_REF_PARTS 4

struct expr {
	enum expr_kind kind;
	size_t off;   /* byte offset of this node in the parsed text */
	char *str;    /* EXPR_STR: the value; EXPR_REF: the dotted text */
	int64_t num;  /* EXPR_NUM */
	bool b;       /* EXPR_BOOL */
	/* EXPR_REF: part[0] is the root ("params"), then the rest. */
	char *part[EXPR_MAX_REF_PARTS];
	size_t n_part;
	struct expr *l, *r; /* operands: NOT uses l; binary ops use both */
};

/*
 * Parses len bytes of s. roots (EXPR_ROOT_*) says which references are
 * allowed. On success *out owns a new tree (expr_free it). On error returns
 * KPL_EINVAL, *err_off is the byte offset in s of the problem and err->msg
 * says what is wrong, without a position: the caller knows where s came
 * from and prefixes "file:line:col: path: ".
 */
int expr_parse(const char *s, size_t len, unsigned roots, struct expr **out,
	       size_t *err_off, struct kpl_err *err);

void expr_free(struct expr *e);

/*
 * Calls fn for each reference in e, left to right, and stops at the first
 * non-zero return, which it returns. For validation: "is this param
 * declared?", "is this stage in needs?".
 */
int expr_walk_refs(const struct expr *e,
		   int (*fn)(void *data, const struct expr *ref), void *data);

/*
 * Looks up a reference (ref->str is its text, ref->part its parts). Sets
 * *value to text that must stay valid until the evaluation returns, and
 * returns 0; or returns a negative KPL_E* code (KPL_ENOTFOUND for "no such
 * value", KPL_ESTATE for a secret withheld from a fork's pull request), and
 * evaluation fails naming the reference.
 */
typedef int (*expr_lookup_fn)(void *data, const struct expr *ref,
			      const char **value);

enum expr_type { EXPR_T_STR, EXPR_T_NUM, EXPR_T_BOOL };

struct expr_value {
	enum expr_type type;
	char *str; /* EXPR_T_STR: malloc'd, owned by the value */
	int64_t num;
	bool b;
};

void expr_value_release(struct expr_value *v);

/*
 * Evaluates e. On success *out holds the value (expr_value_release it). On
 * error returns a negative code and err says what failed ("params.x: no
 * such value", "expected a bool, found the string \"abc\"").
 */
int expr_eval(const struct expr *e, expr_lookup_fn lookup, void *data,
	      struct expr_value *out, struct kpl_err *err);

/* Evaluates e and wants a bool (for `when:`); the strings "true" and
 * "false" count. */
int expr_eval_bool(const struct expr *e, expr_lookup_fn lookup, void *data,
		   bool *out, struct kpl_err *err);

/* The value as text: strings as they are, numbers in decimal, bools as
 * "true"/"false". Returns a malloc'd string; caller frees. */
char *expr_value_text(const struct expr_value *v);

#endif
