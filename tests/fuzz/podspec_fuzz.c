/*
 * podspec_fuzz.c - what a pod stage reads from Kubernetes and from its own
 * store (stages/podspec.c): the input as a Pod (its status: phase, waiting
 * reasons, conditions, the termination message and the outputs in it), as
 * a log stream (timestamps, the resume filter over every line, twice: as
 * after a restart from sinceTime), and as a stored attempt record.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "stages/podspec.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

static void count(void *data, const char *key, const char *value)
{
	(void)key;
	(void)value;
	++*(int *)data;
}

/* Feeds every line of text to pos; returns how many were stored. */
static size_t stream(struct podspec_logpos *pos, const char *text, size_t n)
{
	size_t stored = 0;

	podspec_log_stream_begins(pos);
	for (const char *p = text, *end = text + n; p < end;) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
		const char *t;
		size_t tl;
		if (podspec_log_accept(pos, p, len, &t, &tl)) {
			if (t < p || t + tl > p + len)
				abort(); /* the text is inside the line */
			stored++;
		}
		p += len + 1;
	}
	return stored;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *text = malloc(size + 1);
	struct podspec_status st;
	struct podspec_logpos pos = { 0 };
	struct podspec_record rec;
	struct podspec_time t;
	json_t *pod;
	char since[48];
	int outs = 0;

	memcpy(text, data, size);
	text[size] = '\0';
	if ((pod = json_loadb(text, size, 0, NULL))) {
		podspec_status_of(pod, &st);
		if (st.phase >= PODSPEC_PHASE_LAST || strlen(st.why) >= sizeof st.why)
			abort();
		podspec_outputs(st.message, count, &outs);
		json_decref(pod);
	}
	podspec_outputs(text, count, &outs);
	if (podspec_time_parse(text, size < 40 ? size : 40, &t) == 0)
		podspec_time_format(&t, true, since, sizeof since);
	/* The same stream again from its start stores nothing twice. */
	stream(&pos, text, size);
	if (stream(&pos, text, size) != 0 && pos.any) {
		/* Only lines without a timestamp may be stored again. */
	}
	podspec_log_since(&pos, since, sizeof since);
	if (podspec_record_decode(text, &rec) == 0) {
		char *again = podspec_record_encode(&rec);
		struct podspec_record back;
		if (podspec_record_decode(again, &back))
			abort(); /* what it writes, it reads */
		podspec_record_release(&back);
		free(again);
		podspec_record_release(&rec);
	}
	free(podspec_name(text, text, (uint32_t)size));
	free(podspec_label_value(text));
	free(podspec_escape_expansion(text));
	free(text);
	return 0;
}
