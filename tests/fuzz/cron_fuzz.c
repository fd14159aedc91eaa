/*
 * cron_fuzz.c - engine/cron.c and engine/tzfile.c. The first byte picks:
 * even, a cron expression (the rest, as text), parsed and, when it parses,
 * its next fire times after a few instants in UTC, America/New_York (the
 * system's zoneinfo) and a zone whose DST never ends; odd, a TZif file (the
 * rest, as bytes), parsed and asked for offsets and wall-time lookups.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/cron.h"
#include "engine/tzfile.h"
#include "tests/fuzz/fuzz.h"

static struct tz *zones[3];

static void load_zones(void)
{
	struct kpl_err err;

	if (zones[0])
		return;
	zones[0] = tz_utc();
	if (tz_load(NULL, "America/New_York", &zones[1], &err) != 0)
		zones[1] = tz_utc();
	if (tz_load(NULL, "Australia/Lord_Howe", &zones[2], &err) != 0)
		zones[2] = tz_utc();
}

static const int64_t instants[] = { 0, 1805414400 /* 2027-03-14 */, 1825570800,
				    4000000000, -2000000000 };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kpl_err err = { 0 };

	if (size < 1)
		return 0;
	load_zones();
	if (data[0] & 1) {
		struct tz *tz;
		int64_t inst[2], gap_end, gap_len;

		if (tz_parse("fuzz", data + 1, size - 1, &tz, &err) != 0)
			return 0;
		for (size_t i = 0; i < sizeof instants / sizeof *instants; i++) {
			struct cron c;
			int64_t next;

			(void)tz_offset_at(tz, instants[i]);
			(void)tz_from_wall(tz, instants[i], inst, &gap_end, &gap_len);
			if (cron_parse("30 2 * * *", &c, &err) == 0)
				(void)cron_next(&c, tz, instants[i], &next);
		}
		tz_free(tz);
		return 0;
	}
	{
		char text[CRON_MAX_TEXT + 2];
		size_t n = size - 1 > CRON_MAX_TEXT + 1 ? CRON_MAX_TEXT + 1 : size - 1;
		struct cron c;

		memcpy(text, data + 1, n);
		text[n] = '\0';
		if (cron_parse(text, &c, &err) != 0) {
			if (!err.msg[0])
				abort(); /* an error without a message */
			return 0;
		}
		for (size_t z = 0; z < 3; z++) {
			for (size_t i = 0; i < sizeof instants / sizeof *instants; i++) {
				int64_t next;

				if (cron_next(&c, zones[z], instants[i], &next) == 0 &&
				    next <= instants[i])
					abort(); /* not after */
			}
		}
	}
	return 0;
}
