/*
 * tzfile.h - IANA time zones read from the system's zoneinfo (TZif files,
 * RFC 8536), without TZ, tzset or localtime: kpld has threads, and setenv
 * and tzset are not thread-safe. A loaded zone is immutable, so any thread
 * may read it.
 *
 * Only the version 2+ 64-bit data block is used (a version 1 file falls
 * back to its 32-bit block), and for times past the last transition the
 * footer's POSIX TZ string ("EST5EDT,M3.2.0,M11.1.0"). Every count and size
 * in the file is checked against a bound before use. Files with leap
 * seconds ("right/...") are refused.
 *
 * Times are seconds since the epoch. A "wall" time is a local date and time
 * written as seconds since the epoch as if it were UTC (wall = utc + offset).
 */
#ifndef KPL_TZFILE_H
#define KPL_TZFILE_H

#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

#define TZ_MAX_NAME 255
#define TZ_MAX_FILE (256 * 1024)
#define TZ_ZONEINFO "/usr/share/zoneinfo"

struct tz; /* opaque; immutable once loaded */

/*
 * KPL_EINVAL with err unless name is a zone name kpld will look up: 1..255
 * bytes of [A-Za-z0-9._+-/], not starting with '/', no component that
 * starts with '.' ("..", hidden files), "Local" refused (a zone must be
 * named). "UTC" is always fine.
 */
int tz_check_name(const char *name, struct kpl_err *err);

/*
 * Loads zone name from dir (NULL: TZ_ZONEINFO). "UTC" and "Etc/UTC" need no
 * file. On success *out is the caller's (tz_free). Errors: KPL_EINVAL (bad
 * name, unknown zone, or a file that is not a usable TZif file; err names the
 * zone and what is wrong), KPL_EIO. Blocking file read: small files, done
 * when a schedule is registered or fires.
 */
int tz_load(const char *dir, const char *name, struct tz **out, struct kpl_err *err);

/* Parses a TZif file's bytes (for tz_load, tests and the fuzzer). */
int tz_parse(const char *name, const uint8_t *data, size_t len, struct tz **out,
	     struct kpl_err *err);

/* The zone UTC (offset 0 always). */
struct tz *tz_utc(void);

void tz_free(struct tz *tz);

/* The zone's name as loaded (borrowed, lives as long as tz). */
const char *tz_name(const struct tz *tz);

/* Seconds east of UTC in effect at instant t. */
int32_t tz_offset_at(const struct tz *tz, int64_t t);

/* The smallest and largest offset the zone ever uses. */
void tz_offset_range(const struct tz *tz, int32_t *min, int32_t *max);

/* The smallest and largest offset in effect within two days of t. */
void tz_offset_range_near(const struct tz *tz, int64_t t, int32_t *min, int32_t *max);

/*
 * The instants whose local time is wall, in increasing order, into out[0..1]:
 * returns 1 normally, 2 when wall occurs twice (a fall-back repeats it), 0
 * when it does not occur (a spring-forward skips it): then *gap_end (if not
 * NULL) is the transition's instant, the first one after the skipped wall
 * time, and *gap_len the seconds skipped.
 */
int tz_from_wall(const struct tz *tz, int64_t wall, int64_t out[2], int64_t *gap_end,
		 int64_t *gap_len);

/* Civil calendar helpers (proleptic Gregorian), shared with cron.c. */
int64_t tz_days_from_civil(int64_t y, unsigned m, unsigned d);
void tz_civil_from_days(int64_t days, int64_t *y, unsigned *m, unsigned *d);
/* 0 = Sunday. */
unsigned tz_weekday(int64_t days);
unsigned tz_month_days(int64_t y, unsigned m);

#endif
