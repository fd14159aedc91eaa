/*
 * textdiff.c - unified diffs of two texts (textdiff.h).
 */
#include "clients/textdiff.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"

#define CONTEXT 3

struct line {
	const char *p;
	size_t len;   /* without its '\n' */
	int newline;  /* ends with '\n' (only a last line may not) */
};

/* The lines of text; *n of them, the caller frees the array. */
static struct line *split(const char *text, size_t *n)
{
	size_t cap = 16;
	struct line *v = kpl_malloc(cap * sizeof *v);

	*n = 0;
	for (const char *p = text; *p;) {
		const char *nl = strchr(p, '\n');
		size_t len = nl ? (size_t)(nl - p) : strlen(p);

		if (*n == cap) {
			cap *= 2;
			v = kpl_realloc(v, cap * sizeof *v);
		}
		v[*n].p = p;
		v[*n].len = len;
		v[*n].newline = nl != NULL;
		(*n)++;
		p += len + (nl ? 1 : 0);
	}
	return v;
}

static int same(const struct line *x, const struct line *y)
{
	return x->len == y->len && x->newline == y->newline && memcmp(x->p, y->p, x->len) == 0;
}

/* One step of the edit script: ' ' keeps a[ai] (= b[bi]), '-' drops a[ai],
 * '+' adds b[bi]. */
struct op {
	char kind;
	size_t ai, bi;
};

static void push(struct op **ops, size_t *n, size_t *cap, char kind, size_t ai, size_t bi)
{
	if (*n == *cap) {
		*cap = *cap ? *cap * 2 : 64;
		*ops = kpl_realloc(*ops, *cap * sizeof **ops);
	}
	(*ops)[*n].kind = kind;
	(*ops)[*n].ai = ai;
	(*ops)[*n].bi = bi;
	(*n)++;
}

static void middle(const struct line *a, size_t a0, size_t n, const struct line *b, size_t b0,
		   size_t m, struct op **ops, size_t *nops, size_t *cap)
{
	uint32_t *dp;
	size_t i = 0, j = 0, w = m + 1;

	if (n == 0 || m == 0 || (n + 1) * (m + 1) > TEXTDIFF_MAX_CELLS) {
		for (i = 0; i < n; i++)
			push(ops, nops, cap, '-', a0 + i, b0);
		for (j = 0; j < m; j++)
			push(ops, nops, cap, '+', a0 + n, b0 + j);
		return;
	}
	/* dp[i][j]: the LCS length of a[i..] and b[j..]. */
	dp = kpl_calloc((n + 1) * w, sizeof *dp);
	for (size_t ii = n; ii-- > 0;)
		for (size_t jj = m; jj-- > 0;)
			dp[ii * w + jj] = same(&a[a0 + ii], &b[b0 + jj])
						  ? dp[(ii + 1) * w + jj + 1] + 1
					  : dp[(ii + 1) * w + jj] >= dp[ii * w + jj + 1]
						  ? dp[(ii + 1) * w + jj]
						  : dp[ii * w + jj + 1];
	while (i < n || j < m) {
		if (i < n && j < m && same(&a[a0 + i], &b[b0 + j])) {
			push(ops, nops, cap, ' ', a0 + i, b0 + j);
			i++;
			j++;
		} else if (j == m || (i < n && dp[(i + 1) * w + j] >= dp[i * w + j + 1])) {
			push(ops, nops, cap, '-', a0 + i, b0 + j);
			i++;
		} else {
			push(ops, nops, cap, '+', a0 + i, b0 + j);
			j++;
		}
	}
	free(dp);
}

static void print_line(FILE *out, char mark, const struct line *l)
{
	fputc(mark, out);
	fwrite(l->p, 1, l->len, out);
	fputc('\n', out);
	if (!l->newline)
		fputs("\\ No newline at end of file\n", out);
}

int textdiff_unified(const char *a, const char *b, const char *label_a, const char *label_b,
		     FILE *out)
{
	size_t na, nb, pre = 0, suf = 0, nops = 0, cap = 0;
	struct line *la = split(a, &na), *lb = split(b, &nb);
	struct op *ops = NULL;
	int differ = 0;

	while (pre < na && pre < nb && same(&la[pre], &lb[pre]))
		pre++;
	while (suf < na - pre && suf < nb - pre && same(&la[na - 1 - suf], &lb[nb - 1 - suf]))
		suf++;
	for (size_t i = 0; i < pre; i++)
		push(&ops, &nops, &cap, ' ', i, i);
	middle(la, pre, na - pre - suf, lb, pre, nb - pre - suf, &ops, &nops, &cap);
	for (size_t i = suf; i-- > 0;)
		push(&ops, &nops, &cap, ' ', na - 1 - i, nb - 1 - i);

	for (size_t k = 0; k < nops; k++) {
		size_t start, end, last, a_before = 0, b_before = 0, ac = 0, bc = 0;

		if (ops[k].kind == ' ')
			continue;
		if (!differ)
			fprintf(out, "--- %s\n+++ %s\n", label_a, label_b);
		differ = 1;
		/* A hunk: changes no more than 2 * CONTEXT unchanged lines
		 * apart, with CONTEXT lines around them. */
		last = k;
		for (size_t x = k + 1; x < nops && x <= last + 2 * CONTEXT + 1; x++)
			if (ops[x].kind != ' ')
				last = x;
		start = k > CONTEXT ? k - CONTEXT : 0;
		end = last + CONTEXT + 1 < nops ? last + CONTEXT + 1 : nops;
		for (size_t x = 0; x < start; x++) {
			a_before += ops[x].kind != '+';
			b_before += ops[x].kind != '-';
		}
		for (size_t x = start; x < end; x++) {
			ac += ops[x].kind != '+';
			bc += ops[x].kind != '-';
		}
		fprintf(out, "@@ -%zu,%zu +%zu,%zu @@\n", ac ? a_before + 1 : a_before, ac,
			bc ? b_before + 1 : b_before, bc);
		for (size_t x = start; x < end; x++)
			print_line(out, ops[x].kind,
				   ops[x].kind == '+' ? &lb[ops[x].bi] : &la[ops[x].ai]);
		k = end - 1;
	}
	free(ops);
	free(la);
	free(lb);
	return differ;
}
