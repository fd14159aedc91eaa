/*
 * cron_test.c - engine/cron.c and engine/tzfile.c: the parser (fields,
 * lists, ranges, steps, names, descriptors, errors with field and column),
 * fire times in UTC and in zones read from the system's zoneinfo, with the
 * DST transitions of America/New_York and Europe/Berlin and a zone without
 * DST (Asia/Shanghai). Offsets are checked against glibc's localtime_r
 * (this test is single-threaded, so setting TZ here is fine), and fire
 * times against a minute-by-minute search.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "engine/cron.h"
#include "engine/tzfile.h"

/* "2027-03-14T07:00" (UTC) as seconds. */
static int64_t utc(const char *s)
{
	int y, mo, d, h, mi;

	if (sscanf(s, "%d-%d-%dT%d:%d", &y, &mo, &d, &h, &mi) != 5)
		fail_msg("bad time %s", s);
	return tz_days_from_civil(y, (unsigned)mo, (unsigned)d) * 86400 + h * 3600 + mi * 60;
}

static void fmt(int64_t t, char *buf, size_t size)
{
	int64_t days = t >= 0 ? t / 86400 : -((-t + 86399) / 86400), y;
	int64_t s = t - days * 86400;
	unsigned m, d;

	tz_civil_from_days(days, &y, &m, &d);
	snprintf(buf, size, "%04lld-%02u-%02uT%02lld:%02lld", (long long)y, m, d,
		 (long long)(s / 3600), (long long)(s % 3600 / 60));
}

static struct tz *zone(const char *name)
{
	struct tz *tz;
	struct kpl_err err = { 0 };

	if (tz_load(NULL, name, &tz, &err) != 0)
		fail_msg("%s: %s", name, err.msg);
	return tz;
}

/* next(expr, zone, after) == want (UTC text); want NULL: never. */
static void expect_next(const char *expr, const char *zname, const char *after, const char *want)
{
	struct cron c;
	struct kpl_err err = { 0 };
	struct tz *tz = zone(zname);
	int64_t got;
	char buf[40];
	int rc;

	if (cron_parse(expr, &c, &err) != 0)
		fail_msg("%s: %s", expr, err.msg);
	rc = cron_next(&c, tz, utc(after), &got);
	if (!want) {
		assert_int_equal(rc, KPL_ENOTFOUND);
	} else {
		assert_int_equal(rc, 0);
		fmt(got, buf, sizeof buf);
		if (strcmp(buf, want) != 0)
			fail_msg("%s in %s after %s: got %s, want %s", expr, zname, after, buf, want);
	}
	tz_free(tz);
}

static void expect_error(const char *expr, const char *want)
{
	struct cron c;
	struct kpl_err err = { 0 };

	assert_int_equal(cron_parse(expr, &c, &err), KPL_EINVAL);
	if (strcmp(err.msg, want) != 0)
		fail_msg("%s: got \"%s\", want \"%s\"", expr, err.msg, want);
}

static void test_parse_fields(void **state)
{
	struct cron c;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(cron_parse("*/15 1-5/2 * * *", &c, &err), 0);
	assert_true(c.minutes == (1ULL << 0 | 1ULL << 15 | 1ULL << 30 | 1ULL << 45));
	assert_int_equal(c.hours, 1U << 1 | 1U << 3 | 1U << 5);
	assert_int_equal(c.days, 0xfffffffeU);
	assert_int_equal(c.months, 0x1ffe);
	assert_int_equal(c.weekdays, 0x7f);
	assert_true(c.dom_star && c.dow_star);
	assert_false(c.fixed_time);

	/* Names in any case, in lists and ranges; 7 is Sunday. */
	assert_int_equal(cron_parse("0 2 1,15 jan-MAR,Dec MON-fri,7", &c, &err), 0);
	assert_int_equal(c.months, 1U << 1 | 1U << 2 | 1U << 3 | 1U << 12);
	assert_int_equal(c.weekdays, 0x3f);
	assert_int_equal(c.days, 1U << 1 | 1U << 15);
	assert_false(c.dom_star || c.dow_star);
	assert_true(c.fixed_time);

	/* N/S runs to the maximum; a step past the range keeps the start. */
	assert_int_equal(cron_parse("50/5 */61 ? * 5/1", &c, &err), 0);
	assert_true(c.minutes == (1ULL << 50 | 1ULL << 55));
	assert_int_equal(c.hours, 1);
	assert_true(c.dom_star);
	assert_int_equal(c.weekdays, 1U << 5 | 1U << 6);

	/* Descriptors, surrounding blanks. */
	assert_int_equal(cron_parse("  @Weekly ", &c, &err), 0);
	assert_int_equal(c.weekdays, 1);
	assert_int_equal(c.hours, 1);
	assert_int_equal(cron_parse("@hourly", &c, &err), 0);
	assert_int_equal(c.hours, 0xffffff);
	assert_true(c.minutes == 1);
	assert_int_equal(cron_parse("0\t0  1 1\t*", &c, &err), 0);
}

static void test_parse_errors(void **state)
{
	(void)state;
	expect_error("61 * * * *", "field 1 (minute), column 1: 61 is above the maximum 59");
	expect_error("0 0 32 * *", "field 3 (day of month), column 5: 32 is above the maximum 31");
	expect_error("0 0 0 * *", "field 3 (day of month), column 5: 0 is below the minimum 1");
	expect_error("0 0 * FOO *", "field 4 (month), column 7: unknown name \"FOO\"");
	expect_error("0 0 * * MON-Fx", "field 5 (day of week), column 13: unknown name \"Fx\"");
	expect_error("0 x * * *", "field 2 (hour), column 3: \"x\" is not a number");
	expect_error("* * *", "3 fields where 5 are needed: minute hour day-of-month month "
			      "day-of-week");
	expect_error("", "0 fields where 5 are needed: minute hour day-of-month month "
			 "day-of-week");
	expect_error("* * * * * *", "6 fields where 5 are needed: minute hour day-of-month "
				    "month day-of-week");
	expect_error("5-2 * * * *",
		     "field 1 (minute), column 1: the range 5-2 goes backwards (write it as two "
		     "ranges)");
	expect_error("*/0 * * * *", "field 1 (minute), column 3: the step must be at least 1");
	expect_error("*/ * * * *", "field 1 (minute), column 3: a step is missing after '/'");
	expect_error("1,,2 * * * *", "field 1 (minute), column 3: an empty list item");
	expect_error("1, * * * *", "field 1 (minute), column 3: an empty list item");
	expect_error("0 0 * * 1-", "field 5 (day of week), column 11: a number is missing");
	expect_error("0 ? * * *", "field 2 (hour), column 3: unexpected '?'");
	expect_error("1-2-3 * * * *", "field 1 (minute), column 4: unexpected '-'");
	expect_error("99999 * * * *", "field 1 (minute), column 1: 99999 is above the maximum 59");
	expect_error("0 0 * * 8", "field 5 (day of week), column 9: 8 is above the maximum 7");
	expect_error("@often", "column 1: unknown descriptor \"@often\" (@yearly, @monthly, "
			       "@weekly, @daily, @hourly)");
	expect_error("@daily 0", "column 8: nothing may follow @daily");
	expect_error("TZ=UTC 0 0 * * *",
		     "TZ= and CRON_TZ= are not allowed here; give the schedule's timezone "
		     "instead");
}

static void test_next_utc(void **state)
{
	(void)state;
	/* Friday 2026-12-04: weekdays at 02:00 go on on Monday. */
	expect_next("0 2 * * 1-5", "UTC", "2026-12-04T03:00", "2026-12-07T02:00");
	expect_next("0 2 * * MON-FRI", "UTC", "2026-12-04T01:59", "2026-12-04T02:00");
	/* Strictly after. */
	expect_next("*/15 * * * *", "UTC", "2026-12-04T10:15", "2026-12-04T10:30");
	expect_next("*/15 * * * *", "UTC", "2026-12-31T23:50", "2027-01-01T00:00");
	/* Vixie: both days restricted: the 13th or a Friday. */
	expect_next("0 0 13 * 5", "UTC", "2026-12-04T01:00", "2026-12-11T00:00");
	expect_next("0 0 13 * 5", "UTC", "2026-12-11T01:00", "2026-12-13T00:00");
	/* One starts with '*' (also with a step): both must match. */
	expect_next("0 0 13 * *", "UTC", "2026-12-04T01:00", "2026-12-13T00:00");
	expect_next("0 0 */2 * 5", "UTC", "2026-12-04T01:00", "2026-12-11T00:00");
	expect_next("0 0 1 * SUN", "UTC", "2026-12-04T01:00", "2026-12-06T00:00");
	expect_next("0 0 1 * SUN", "UTC", "2026-12-27T01:00", "2027-01-01T00:00");
	/* Leap day. */
	expect_next("0 12 29 2 *", "UTC", "2026-12-04T00:00", "2028-02-29T12:00");
	expect_next("@yearly", "Etc/UTC", "2026-12-04T00:00", "2027-01-01T00:00");
	/* Never within five years. */
	expect_next("0 0 30 2 *", "UTC", "2026-12-04T00:00", NULL);
	expect_next("0 0 31 4,6,9,11 *", "UTC", "2026-12-04T00:00", NULL);
}

static void test_next_shanghai(void **state)
{
	(void)state;
	/* +08:00 all year: 02:00 local is 18:00 UTC the day before. */
	expect_next("0 2 * * *", "Asia/Shanghai", "2026-12-04T00:00", "2026-12-04T18:00");
	expect_next("0 2 * * 1-5", "Asia/Shanghai", "2026-12-04T18:00", "2026-12-06T18:00");
	expect_next("30 7 * 7 *", "Asia/Shanghai", "2027-06-01T00:00", "2027-06-30T23:30");
}

static void test_next_new_york(void **state)
{
	(void)state;
	/* 2027-03-14 02:00 EST -> 03:00 EDT (07:00 UTC). A fixed-time job in
	 * the skipped hour runs at the jump, then at its time again. */
	expect_next("30 2 * * *", "America/New_York", "2027-03-13T08:00", "2027-03-14T07:00");
	expect_next("30 2 * * *", "America/New_York", "2027-03-14T07:00", "2027-03-15T06:30");
	expect_next("0,15,30 2 * * *", "America/New_York", "2027-03-13T08:00", "2027-03-14T07:00");
	expect_next("0,15,30 2 * * *", "America/New_York", "2027-03-14T07:00", "2027-03-15T06:00");
	/* Wildcard jobs follow the wall clock: 02:xx does not exist. */
	expect_next("*/30 * * * *", "America/New_York", "2027-03-14T06:45", "2027-03-14T07:00");
	expect_next("30 * * * *", "America/New_York", "2027-03-14T06:30", "2027-03-14T07:30");
	expect_next("30 2-3 * * *", "America/New_York", "2027-03-14T06:00", "2027-03-14T07:00");
	expect_next("30 */1 * * *", "America/New_York", "2027-03-14T06:30", "2027-03-14T07:30");

	/* 2027-11-07 02:00 EDT -> 01:00 EST (06:00 UTC): 01:30 happens twice.
	 * A fixed-time job runs at the first only. */
	expect_next("30 1 * * *", "America/New_York", "2027-11-07T04:00", "2027-11-07T05:30");
	expect_next("30 1 * * *", "America/New_York", "2027-11-07T05:30", "2027-11-08T06:30");
	/* A wildcard-hour job runs in both. */
	expect_next("30 * * * *", "America/New_York", "2027-11-07T05:30", "2027-11-07T06:30");
	expect_next("*/20 * * * *", "America/New_York", "2027-11-07T05:40", "2027-11-07T06:00");
	/* 00:30 and 02:30 are unambiguous. */
	expect_next("30 2 * * *", "America/New_York", "2027-11-07T04:00", "2027-11-07T07:30");

	/* Past the zone's table (2037 in "fat" files): the footer's rule. */
	expect_next("30 2 * * *", "America/New_York", "2045-03-11T08:00", "2045-03-12T07:00");
	expect_next("30 1 * * *", "America/New_York", "2045-11-05T05:30", "2045-11-06T06:30");
	expect_next("0 12 * * *", "America/New_York", "2045-07-01T00:00", "2045-07-01T16:00");
}

static void test_next_berlin(void **state)
{
	(void)state;
	/* 2027-03-28 02:00 CET -> 03:00 CEST (01:00 UTC). */
	expect_next("30 2 * * *", "Europe/Berlin", "2027-03-27T12:00", "2027-03-28T01:00");
	expect_next("30 2 * * *", "Europe/Berlin", "2027-03-28T01:00", "2027-03-29T00:30");
	expect_next("0 3 * * *", "Europe/Berlin", "2027-03-27T12:00", "2027-03-28T01:00");
	expect_next("*/15 * * * *", "Europe/Berlin", "2027-03-28T00:50", "2027-03-28T01:00");
	/* 2027-10-31 03:00 CEST -> 02:00 CET (01:00 UTC): 02:30 twice. */
	expect_next("30 2 * * *", "Europe/Berlin", "2027-10-30T12:00", "2027-10-31T00:30");
	expect_next("30 2 * * *", "Europe/Berlin", "2027-10-31T00:30", "2027-11-01T01:30");
	expect_next("30 * * * *", "Europe/Berlin", "2027-10-31T00:30", "2027-10-31T01:30");
	/* Weekday names in the zone's own days: Monday 00:05 local is Sunday
	 * 23:05 UTC in winter. */
	expect_next("5 0 * * MON", "Europe/Berlin", "2027-01-01T00:00", "2027-01-03T23:05");
}

/* Offsets against glibc's, from 1900 to 2100 (this covers the table and
 * the footer's rule past it). */
static void test_offsets_match_libc(void **state)
{
	static const char *zones[] = { "America/New_York", "Europe/Berlin", "Asia/Shanghai",
				       "Australia/Sydney", "America/Sao_Paulo",
				       "Australia/Lord_Howe", "Europe/Dublin", "Pacific/Apia",
				       "America/Santiago", "Asia/Tehran" };

	(void)state;
	for (size_t z = 0; z < sizeof zones / sizeof *zones; z++) {
		struct tz *tz = zone(zones[z]);

		setenv("TZ", zones[z], 1);
		tzset();
		for (int64_t t = utc("1901-12-20T00:00"); t < utc("2100-01-01T00:00");
		     t += 86400 * 5 + 3637) {
			time_t tt = (time_t)t;
			struct tm tm;

			localtime_r(&tt, &tm);
			if (tm.tm_gmtoff != tz_offset_at(tz, t)) {
				char buf[40];

				fmt(t, buf, sizeof buf);
				fail_msg("%s at %s: libc %ld, tzfile %d", zones[z], buf,
					 tm.tm_gmtoff, tz_offset_at(tz, t));
			}
		}
		tz_free(tz);
	}
	unsetenv("TZ");
}

/* Every instant whose wall time is w: tz_from_wall against a scan. */
static void test_from_wall(void **state)
{
	struct tz *tz = zone("Europe/Berlin");
	int64_t inst[2], gap_end, gap_len;

	(void)state;
	/* 02:30 on the spring day does not exist: the jump is at 01:00Z. */
	assert_int_equal(tz_from_wall(tz, utc("2027-03-28T02:30"), inst, &gap_end, &gap_len), 0);
	assert_int_equal(gap_end, utc("2027-03-28T01:00"));
	assert_int_equal(gap_len, 3600);
	assert_int_equal(tz_from_wall(tz, utc("2027-10-31T02:30"), inst, NULL, NULL), 2);
	assert_int_equal(inst[0], utc("2027-10-31T00:30"));
	assert_int_equal(inst[1], utc("2027-10-31T01:30"));
	assert_int_equal(tz_from_wall(tz, utc("2027-07-01T12:00"), inst, NULL, NULL), 1);
	assert_int_equal(inst[0], utc("2027-07-01T10:00"));
	tz_free(tz);
}

/* Fire times without DST against a minute-by-minute search. */
static void test_next_against_scan(void **state)
{
	static const char *exprs[] = { "*/7 * * * *",   "0 */5 * * *",   "15 3 * * 1-5",
				       "0 0 13 * FRI",  "0 0 */10 * 2",  "59 23 L * *",
				       "1-10/3 8-18 * JAN,JUL *", "0 12 29 2 *", "30 6 1,15 * SUN",
				       "0 0 * * 0,6" };
	static const char *zones[] = { "UTC", "Asia/Shanghai", "Asia/Kolkata" };

	(void)state;
	srand(13);
	for (size_t z = 0; z < sizeof zones / sizeof *zones; z++) {
		struct tz *tz = zone(zones[z]);

		for (size_t e = 0; e < sizeof exprs / sizeof *exprs; e++) {
			struct cron c;
			struct kpl_err err = { 0 };

			if (cron_parse(exprs[e], &c, &err) != 0)
				continue; /* "L" is not cron syntax here */
			for (int i = 0; i < 8; i++) {
				int64_t after = utc("2026-01-01T00:00") +
						(int64_t)(rand() % (3 * 365)) * 86400 +
						rand() % 86400, got, u;

				assert_int_equal(cron_next(&c, tz, after, &got), 0);
				/* Every whole minute after `after` (these zones'
				 * offsets are whole minutes). */
				for (u = (after / 60 + 1) * 60;; u += 60)
					if (cron_match_wall(&c, u + tz_offset_at(tz, u)))
						break;
				assert_int_equal(got, u);
			}
		}
		tz_free(tz);
	}
}

static void test_zone_names(void **state)
{
	struct tz *tz;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(tz_load(NULL, "../../etc/passwd", &tz, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "time zone \"../../etc/passwd\": a part of the name may "
				     "not start with '.'");
	assert_int_equal(tz_load(NULL, "/etc/localtime", &tz, &err), KPL_EINVAL);
	assert_int_equal(tz_load(NULL, "Europe/../../x", &tz, &err), KPL_EINVAL);
	assert_int_equal(tz_load(NULL, "Local", &tz, &err), KPL_EINVAL);
	assert_int_equal(tz_load(NULL, "", &tz, &err), KPL_EINVAL);
	assert_int_equal(tz_load(NULL, "Europe/Berlin ", &tz, &err), KPL_EINVAL);
	assert_int_equal(tz_load(NULL, "Mars/Olympus_Mons", &tz, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "time zone \"Mars/Olympus_Mons\": unknown (no "
				     "/usr/share/zoneinfo/Mars/Olympus_Mons)");
	/* A directory is no zone. */
	assert_int_equal(tz_load(NULL, "Europe", &tz, &err), KPL_EINVAL);
	/* Links work. */
	assert_int_equal(tz_load(NULL, "US/Eastern", &tz, &err), 0);
	assert_int_equal(tz_offset_at(tz, utc("2027-01-01T00:00")), -5 * 3600);
	tz_free(tz);
}

/* Hand-made files: bounds, truncation, and a footer-only zone. */
static void test_tzif_bytes(void **state)
{
	/* Version 2, no transitions, one type (+1), footer for CET/CEST. */
	static const char footer[] = "\nCET-1CEST,M3.5.0,M10.5.0/3\n";
	uint8_t buf[512];
	size_t n = 0;
	struct tz *tz;
	struct kpl_err err = { 0 };
	int64_t inst[2];

	(void)state;
	for (int block = 0; block < 2; block++) {
		memset(buf + n, 0, 44);
		memcpy(buf + n, "TZif2", 5);
		buf[n + 39] = 1; /* typecnt */
		buf[n + 43] = 4; /* charcnt */
		n += 44;
		/* One type: utoff 3600, isdst 0, idx 0; "CET\0". */
		memcpy(buf + n, "\x00\x00\x0e\x10\x00\x00" "CET", 10);
		n += 10;
	}
	memcpy(buf + n, footer, sizeof footer - 1);
	n += sizeof footer - 1;
	assert_int_equal(tz_parse("test", buf, n, &tz, &err), 0);
	assert_int_equal(tz_offset_at(tz, utc("2027-01-10T00:00")), 3600);
	assert_int_equal(tz_offset_at(tz, utc("2027-07-10T00:00")), 7200);
	assert_int_equal(tz_from_wall(tz, utc("2027-10-31T02:30"), inst, NULL, NULL), 2);
	tz_free(tz);
	/* Every truncation is an error, never a read past the end. */
	for (size_t k = 0; k < n - 1; k++) {
		uint8_t *cut = malloc(k ? k : 1);

		memcpy(cut, buf, k);
		assert_int_equal(tz_parse("test", cut, k, &tz, &err), KPL_EINVAL);
		free(cut);
	}
	/* A type count past the bound. */
	buf[44 + 10 + 36] = 0x7f;
	assert_int_equal(tz_parse("test", buf, n, &tz, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "time zone test: TZif counts out of bounds");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_fields),
		cmocka_unit_test(test_parse_errors),
		cmocka_unit_test(test_next_utc),
		cmocka_unit_test(test_next_shanghai),
		cmocka_unit_test(test_next_new_york),
		cmocka_unit_test(test_next_berlin),
		cmocka_unit_test(test_offsets_match_libc),
		cmocka_unit_test(test_from_wall),
		cmocka_unit_test(test_next_against_scan),
		cmocka_unit_test(test_zone_names),
		cmocka_unit_test(test_tzif_bytes),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
