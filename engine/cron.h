/*
 * cron.h - five-field cron expressions and their fire times in a time zone.
 *
 *   minute hour day-of-month month day-of-week
 *   0-59   0-23 1-31         1-12  0-7 (0 and 7 are Sunday)
 *          JAN-DEC (month), SUN-SAT (day of week), any case
 *
 * Each field is `*` or a comma list of N, A-B, `*`/S, A-B/S and N/S (= N to
 * the field's maximum, step S); `?` is `*` in the day fields. Descriptors:
 * @yearly (@annually), @monthly, @weekly, @daily (@midnight), @hourly.
 *
 * Days (Vixie cron's rule, as cronie and Kubernetes): when both the day of
 * month and the day of week are restricted, a day matching either fires;
 * when either starts with `*` (also `*`/S, as in Vixie cron) both must match.
 *
 * Daylight saving time, as cronie does: a job is "fixed-time" when neither
 * its minute nor its hour field starts with `*`.
 *  - Spring forward: a fixed-time job whose wall time is skipped runs once,
 *    at the instant of the jump (30 2 * * * in Europe/Berlin on the last
 *    Sunday of March runs at 03:00 CEST); jobs with `*` in the minute or
 *    hour follow the wall clock, and times that do not exist are skipped.
 *    A jump of more than 3 hours (a zone changing sides of the date line)
 *    runs nothing it skipped.
 *  - Fall back: a fixed-time job whose wall time occurs twice runs once, at
 *    the first occurrence; `*`-minute or -hour jobs run in both occurrences
 *    (the wall clock shows them twice).
 *
 * Pure computation, no I/O: any thread.
 */
#ifndef KPL_CRON_H
#define KPL_CRON_H

#include <stdbool.h>
#include <stdint.h>

#include "base/kpl.h"
#include "engine/tzfile.h"

#define CRON_MAX_TEXT 256
/* How far cron_next looks before it says a schedule never fires. */
#define CRON_MAX_YEARS 5

struct cron {
	uint64_t minutes; /* bit m: minute m (0..59) */
	uint32_t hours;   /* bit h: 0..23 */
	uint32_t days;    /* bit d: day of month 1..31 */
	uint16_t months;  /* bit m: 1..12 */
	uint8_t weekdays; /* bit d: 0 (Sunday)..6 */
	bool dom_star, dow_star; /* the day field starts with `*` or `?` */
	bool fixed_time;         /* neither minute nor hour starts with `*` */
};

/*
 * Parses text (NUL-terminated, at most CRON_MAX_TEXT bytes) into *out.
 * KPL_EINVAL with err naming the field and the 1-based column:
 *   "field 3 (day of month), column 7: 32 is above the maximum 31"
 */
int cron_parse(const char *text, struct cron *out, struct kpl_err *err);

/* True if wall time w (seconds, tzfile.h) is a minute the fields match. */
bool cron_match_wall(const struct cron *c, int64_t wall);

/*
 * The first fire time after instant `after` (seconds since the epoch) in
 * zone tz, with the DST rules above, into *out. KPL_ENOTFOUND if none within
 * CRON_MAX_YEARS (0 0 30 2 * never fires).
 */
int cron_next(const struct cron *c, const struct tz *tz, int64_t after, int64_t *out);

#endif
