/*
 * textdiff.h - a unified diff of two texts (kplctl diff), in process: no
 * diff(1), no temporary files.
 *
 * Common leading and trailing lines are set aside, then the middle is an
 * LCS (dynamic programming) when it has at most TEXTDIFF_MAX_CELLS line
 * pairs, else every middle line of a removed and every one of b added: a
 * correct diff, only not a minimal one. Pipeline files (at most 1 MiB) with
 * a few changed lines always get the minimal one.
 */
#ifndef KPL_TEXTDIFF_H
#define KPL_TEXTDIFF_H

#include <stdio.h>

#define TEXTDIFF_MAX_CELLS (4u * 1024 * 1024)

/*
 * Writes to out the unified diff (3 lines of context, "--- label_a",
 * "+++ label_b", "@@ -l,n +l,n @@" hunks, "\ No newline at end of file"
 * where one text ends without one) that turns a into b. Writes nothing and
 * returns 0 when they are equal; returns 1 when they differ.
 */
int textdiff_unified(const char *a, const char *b, const char *label_a, const char *label_b,
		     FILE *out);

#endif
