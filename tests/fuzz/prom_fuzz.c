/*
 * prom_fuzz.c - what a Prometheus instant query's reply means
 * (stages/prom.c prom_parse_reply, which the verify analysis and the
 * canary steps trust), and its sample-value and number formats. Input: a
 * reply in fuzz.h's text form.
 */
#include <stdlib.h>

#include "base/kpl.h"
#include "stages/prom.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { (const char *)data, size };
	struct fz_reply r;

	while (fz_next_reply(&in, &r)) {
		struct prom_sample s;
		struct kpl_err err = { 0 };
		double v;
		char buf[32];

		if (prom_parse_reply(r.status, r.body, r.body_len, &s, &err) == 0 &&
		    s.outcome == PROM_VALUE)
			prom_format_value(s.value, buf, sizeof buf);
		if (prom_parse_value(r.body, &v) == 0)
			prom_format_value(v, buf, sizeof buf);
		free(prom_query_url("http://prom:9090/", r.body, r.status));
		fz_reply_release(&r);
	}
	return 0;
}
