/*
 * textdiff_test.c - clients/textdiff.c: exact output for small cases, and
 * random edits whose diff, applied back, gives the new text and changes no
 * more lines than a minimal diff (an LCS computed here independently).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "clients/textdiff.h"

/* textdiff_unified's output as a malloc'd string; *differ its result. */
static char *diff(const char *a, const char *b, int *differ)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	*differ = textdiff_unified(a, b, "a", "b", f);
	fclose(f);
	return buf;
}

static void expect(const char *a, const char *b, const char *want)
{
	int differ;
	char *got = diff(a, b, &differ);

	assert_string_equal(got, want);
	assert_int_equal(differ, *want != '\0');
	free(got);
}

static void test_small_cases(void **state)
{
	(void)state;
	expect("", "", "");
	expect("x\ny\n", "x\ny\n", "");
	expect("a\nb\nc\n", "a\nB\nc\n", "--- a\n+++ b\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n");
	expect("", "new\n", "--- a\n+++ b\n@@ -0,0 +1,1 @@\n+new\n");
	expect("old\n", "", "--- a\n+++ b\n@@ -1,1 +0,0 @@\n-old\n");
	/* Only the last newline differs. */
	expect("a\nb", "a\nb\n",
	       "--- a\n+++ b\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+b\n");
	/* 7 unchanged lines between two changes: two hunks; 6: one (as
	 * diff -u makes them). */
	expect("1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n", "X\n2\n3\n4\n5\n6\n7\n8\nY\n10\n",
	       "--- a\n+++ b\n@@ -1,4 +1,4 @@\n-1\n+X\n 2\n 3\n 4\n"
	       "@@ -6,5 +6,5 @@\n 6\n 7\n 8\n-9\n+Y\n 10\n");
	expect("1\n2\n3\n4\n5\n6\n7\n8\n9\n", "X\n2\n3\n4\n5\n6\n7\nY\n9\n",
	       "--- a\n+++ b\n@@ -1,9 +1,9 @@\n-1\n+X\n 2\n 3\n 4\n 5\n 6\n 7\n-8\n+Y\n 9\n");
}

/* Applies a unified diff to a (lines); the result, malloc'd. Checks that
 * every context and removed line matches a. */
static char *apply(const char *a, const char *patch)
{
	size_t cap = strlen(a) + strlen(patch) + 1, n = 0;
	char *out = calloc(1, cap);
	const char *ap = a, *p = patch;

	/* Skip the --- and +++ lines. */
	for (int i = 0; i < 2 && *p; i++)
		p = strchr(p, '\n') + 1;
	while (*p) {
		const char *nl = strchr(p, '\n');
		size_t len = (size_t)(nl - p);
		unsigned long astart, acount, bstart, bcount;

		assert_non_null(nl);
		if (*p == '@') {
			assert_int_equal(sscanf(p, "@@ -%lu,%lu +%lu,%lu @@", &astart, &acount,
						&bstart, &bcount), 4);
			/* Copy a's lines before the hunk. */
			{
				unsigned long at = 1;
				/* The lines of a consumed so far. */
				for (const char *r = a; r < ap; r++)
					at += *r == '\n';
				while (at < (acount ? astart : astart + 1)) {
					const char *e = strchr(ap, '\n');
					size_t l = e ? (size_t)(e - ap) + 1 : strlen(ap);
					memcpy(out + n, ap, l);
					n += l;
					ap += l;
					at++;
				}
			}
		} else if (*p == ' ' || *p == '-') {
			const char *e = strchr(ap, '\n');
			size_t l = e ? (size_t)(e - ap) : strlen(ap);
			assert_int_equal(l, len - 1);
			assert_memory_equal(ap, p + 1, l);
			if (*p == ' ') {
				memcpy(out + n, ap, l + (e ? 1 : 0));
				n += l + (e ? 1 : 0);
			}
			ap += l + (e ? 1 : 0);
		} else if (*p == '+') {
			memcpy(out + n, p + 1, len - 1);
			n += len - 1;
			out[n++] = '\n';
		} else if (*p == '\\') {
			/* The line before ends its text without a newline: if it
			 * was written out, so was a newline too many. */
			const char *s = p - 1;
			while (s > patch && s[-1] != '\n')
				s--;
			if (*s == '+' || *s == ' ')
				n--;
		} else {
			fail_msg("bad patch line: %.*s", (int)len, p);
		}
		p = nl + 1;
	}
	strcpy(out + n, ap);
	return out;
}

static size_t lcs(char **x, size_t n, char **y, size_t m)
{
	size_t *dp = calloc((n + 1) * (m + 1), sizeof *dp), r;

	for (size_t i = n; i-- > 0;)
		for (size_t j = m; j-- > 0;)
			dp[i * (m + 1) + j] = strcmp(x[i], y[j]) == 0 ? dp[(i + 1) * (m + 1) + j + 1] + 1
					      : dp[(i + 1) * (m + 1) + j] > dp[i * (m + 1) + j + 1]
						      ? dp[(i + 1) * (m + 1) + j]
						      : dp[i * (m + 1) + j + 1];
	r = dp[0];
	free(dp);
	return r;
}

static void test_random_edits(void **state)
{
	static char letters[][2] = { "a", "b", "c", "d", "e", "x", "z" };
	(void)state;
	srand(13);
	for (int t = 0; t < 300; t++) {
		char *av[40], *bv[60], a[200] = "", b[300] = "", *got, *patched;
		size_t na = (size_t)(rand() % 30), nb, changed = 0;
		int differ;

		for (size_t i = 0; i < na; i++) {
			av[i] = letters[rand() % 5];
			bv[i] = av[i];
		}
		nb = na;
		for (int e = rand() % 6; e > 0; e--) {
			int op = rand() % 3;
			if (op == 0 && nb) {
				size_t at = (size_t)rand() % nb;
				memmove(&bv[at], &bv[at + 1], (nb - at - 1) * sizeof *bv);
				nb--;
			} else if (op == 1) {
				size_t at = (size_t)rand() % (nb + 1);
				memmove(&bv[at + 1], &bv[at], (nb - at) * sizeof *bv);
				bv[at] = letters[rand() % 7];
				nb++;
			} else if (nb) {
				bv[rand() % nb] = letters[6];
			}
		}
		for (size_t i = 0; i < na; i++)
			strcat(strcat(a, av[i]), "\n");
		for (size_t i = 0; i < nb; i++)
			strcat(strcat(b, bv[i]), "\n");
		got = diff(a, b, &differ);
		assert_int_equal(differ, strcmp(a, b) != 0);
		patched = differ ? apply(a, got) : strdup(a);
		assert_string_equal(patched, b);
		for (const char *p = got; *p; p = strchr(p, '\n') + 1)
			if ((*p == '+' && p[1] != '+') || (*p == '-' && p[1] != '-'))
				changed++;
		assert_int_equal(changed, na + nb - 2 * lcs(av, na, bv, nb));
		free(got);
		free(patched);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_small_cases),
		cmocka_unit_test(test_random_edits),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
