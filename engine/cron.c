/*
 * cron.c - cron expressions: the parser, and fire times found by walking
 * matching local (wall) minutes and mapping each to instants with the zone
 * (see cron.h for the rules).
 */
#include "engine/cron.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* A jump longer than this runs none of the fixed-time jobs it skipped
 * (cronie's limit). */
#define CRON_MAX_GAP (3 * 3600)

enum field { F_MINUTE, F_HOUR, F_DOM, F_MONTH, F_DOW, F_LAST };

struct field_def {
	const char *name;
	int min, max;
	const char *const *names; /* names[i] is value min_name + i */
	int min_name;
	size_t n_names;
};

static const char *const month_names[] = { "jan", "feb", "mar", "apr", "may", "jun",
					   "jul", "aug", "sep", "oct", "nov", "dec" };
static const char *const dow_names[] = { "sun", "mon", "tue", "wed", "thu", "fri", "sat" };

static const struct field_def fields[F_LAST] = {
	[F_MINUTE] = { "minute", 0, 59, NULL, 0, 0 },
	[F_HOUR] = { "hour", 0, 23, NULL, 0, 0 },
	[F_DOM] = { "day of month", 1, 31, NULL, 0, 0 },
	[F_MONTH] = { "month", 1, 12, month_names, 1, 12 },
	/* 7 is Sunday too (Vixie cron); `*` means 0-6. */
	[F_DOW] = { "day of week", 0, 7, dow_names, 0, 7 },
};

static const struct {
	const char *name, *expr;
} descriptors[] = {
	{ "@yearly", "0 0 1 1 *" },  { "@annually", "0 0 1 1 *" },
	{ "@monthly", "0 0 1 * *" }, { "@weekly", "0 0 * * 0" },
	{ "@daily", "0 0 * * *" },   { "@midnight", "0 0 * * *" },
	{ "@hourly", "0 * * * *" },
};

/* ---------------------------------------------------------------------- */
/* Parsing */

struct cursor {
	const char *text; /* the whole expression, for columns */
	enum field f;
};

static int ferr(const struct cursor *cu, const char *at, struct kpl_err *err,
		const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int ferr(const struct cursor *cu, const char *at, struct kpl_err *err,
		const char *fmt, ...)
{
	char what[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	return kpl_errf(err, KPL_EINVAL, "field %d (%s), column %d: %s", (int)cu->f + 1,
			fields[cu->f].name, (int)(at - cu->text) + 1, what);
}

/* A number or a name at s (end e); *s advances. */
static int parse_value(const struct cursor *cu, const char **s, const char *e, int *out,
		       struct kpl_err *err)
{
	const struct field_def *fd = &fields[cu->f];
	const char *p = *s;
	int v = 0, digits = 0;

	if (p < e && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z'))) {
		const char *q = p;

		while (q < e && ((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z')))
			q++;
		for (size_t i = 0; i < fd->n_names && q - p == 3; i++) {
			if (strncasecmp(p, fd->names[i], 3) == 0) {
				*out = fd->min_name + (int)i;
				*s = q;
				return 0;
			}
		}
		if (fd->names)
			return ferr(cu, p, err, "unknown name \"%.*s\"",
				    (int)(q - p) > 20 ? 20 : (int)(q - p), p);
		return ferr(cu, p, err, "\"%.*s\" is not a number",
			    (int)(q - p) > 20 ? 20 : (int)(q - p), p);
	}
	while (p < e && *p >= '0' && *p <= '9') {
		if (digits < 4)
			v = v * 10 + (*p - '0');
		digits++;
		p++;
	}
	if (!digits) {
		if (p < e)
			return ferr(cu, p, err, "unexpected '%c'",
				    (*p >= 0x20 && *p < 0x7f) ? *p : '?');
		return ferr(cu, p, err, "a number is missing");
	}
	if (digits > 4 || v > fd->max)
		return ferr(cu, *s, err, "%.*s is above the maximum %d",
			    (int)(p - *s) > 12 ? 12 : (int)(p - *s), *s, fd->max);
	if (v < fd->min)
		return ferr(cu, *s, err, "%d is below the minimum %d", v, fd->min);
	*out = v;
	*s = p;
	return 0;
}

/* One field, text [s, e). */
static int parse_field(struct cursor *cu, const char *s, const char *e, uint64_t *bits,
		       bool *star, struct kpl_err *err)
{
	const struct field_def *fd = &fields[cu->f];
	bool day_field = cu->f == F_DOM || cu->f == F_DOW;
	int rc;

	*bits = 0;
	*star = *s == '*' || (day_field && *s == '?');
	while (s <= e) {
		const char *item = s, *ie = memchr(s, ',', (size_t)(e - s));
		int lo, hi, step = 1;
		bool range_given = false;

		if (!ie)
			ie = e;
		if (ie == item)
			return ferr(cu, item, err, "an empty list item");
		if (*s == '*' || (day_field && *s == '?')) {
			lo = fd->min;
			hi = cu->f == F_DOW ? 6 : fd->max;
			s++;
			range_given = true;
		} else {
			if ((rc = parse_value(cu, &s, ie, &lo, err)) != 0)
				return rc;
			hi = lo;
			if (s < ie && *s == '-') {
				s++;
				if ((rc = parse_value(cu, &s, ie, &hi, err)) != 0)
					return rc;
				if (hi < lo)
					return ferr(cu, item, err,
						    "the range %d-%d goes backwards (write it as "
						    "two ranges)", lo, hi);
				range_given = true;
			}
		}
		if (s < ie && *s == '/') {
			const char *at = ++s;
			int v = 0, digits = 0;

			while (s < ie && *s >= '0' && *s <= '9') {
				if (digits < 4)
					v = v * 10 + (*s - '0');
				digits++;
				s++;
			}
			if (!digits)
				return ferr(cu, at, err, "a step is missing after '/'");
			if (v == 0)
				return ferr(cu, at, err, "the step must be at least 1");
			step = digits > 4 ? 9999 : v;
			/* N/S: from N to the maximum. */
			if (!range_given)
				hi = cu->f == F_DOW && lo < 7 ? 6 : fd->max;
		}
		if (s < ie)
			return ferr(cu, s, err, "unexpected '%c'",
				    (*s >= 0x20 && *s < 0x7f) ? *s : '?');
		for (int v = lo; v <= hi; v += step)
			*bits |= 1ULL << (cu->f == F_DOW ? v % 7 : v);
		s = ie + 1;
	}
	return 0;
}

int cron_parse(const char *text, struct cron *out, struct kpl_err *err)
{
	const char *s = text, *start[F_LAST], *end[F_LAST];
	struct cursor cu = { text, F_MINUTE };
	uint64_t bits[F_LAST];
	bool star[F_LAST];
	size_t len = strlen(text);
	int n = 0, rc;

	memset(out, 0, sizeof *out);
	if (len > CRON_MAX_TEXT)
		return kpl_errf(err, KPL_EINVAL, "longer than %d bytes", CRON_MAX_TEXT);
	while (*s == ' ' || *s == '\t')
		s++;
	if (*s == '@') {
		const char *e = s;

		while (*e && *e != ' ' && *e != '\t')
			e++;
		for (size_t i = 0; i < KPL_ARRAY_SIZE(descriptors); i++) {
			if ((size_t)(e - s) == strlen(descriptors[i].name) &&
			    strncasecmp(s, descriptors[i].name, (size_t)(e - s)) == 0) {
				while (*e == ' ' || *e == '\t')
					e++;
				if (*e)
					return kpl_errf(err, KPL_EINVAL,
							"column %d: nothing may follow %s",
							(int)(e - text) + 1, descriptors[i].name);
				return cron_parse(descriptors[i].expr, out, err);
			}
		}
		return kpl_errf(err, KPL_EINVAL,
				"column %d: unknown descriptor \"%.*s\" (@yearly, @monthly, "
				"@weekly, @daily, @hourly)",
				(int)(s - text) + 1, (int)(e - s) > 20 ? 20 : (int)(e - s), s);
	}
	while (*s) {
		const char *e = s;

		while (*e && *e != ' ' && *e != '\t')
			e++;
		if (n < F_LAST) {
			start[n] = s;
			end[n] = e;
		}
		n++;
		s = e;
		while (*s == ' ' || *s == '\t')
			s++;
	}
	if (n != F_LAST) {
		if ((strncmp(text, "TZ=", 3) == 0 || strncmp(text, "CRON_TZ=", 8) == 0))
			return kpl_errf(err, KPL_EINVAL,
					"TZ= and CRON_TZ= are not allowed here; give the "
					"schedule's timezone instead");
		return kpl_errf(err, KPL_EINVAL,
				"%d field%s where 5 are needed: minute hour day-of-month "
				"month day-of-week",
				n, n == 1 ? "" : "s");
	}
	for (int f = 0; f < F_LAST; f++) {
		cu.f = (enum field)f;
		if ((rc = parse_field(&cu, start[f], end[f], &bits[f], &star[f], err)) != 0)
			return rc;
	}
	out->minutes = bits[F_MINUTE];
	out->hours = (uint32_t)bits[F_HOUR];
	out->days = (uint32_t)bits[F_DOM];
	out->months = (uint16_t)bits[F_MONTH];
	out->weekdays = (uint8_t)bits[F_DOW];
	out->dom_star = star[F_DOM];
	out->dow_star = star[F_DOW];
	out->fixed_time = !star[F_MINUTE] && !star[F_HOUR];
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Fire times */

static int64_t floor_div(int64_t a, int64_t b)
{
	return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

static bool day_match(const struct cron *c, int64_t days, unsigned dom)
{
	bool d = c->days & (1U << dom), w = c->weekdays & (1U << tz_weekday(days));

	return c->dom_star || c->dow_star ? d && w : d || w;
}

bool cron_match_wall(const struct cron *c, int64_t wall)
{
	int64_t days = floor_div(wall, 86400), secs = wall - days * 86400, y;
	unsigned m, d;

	tz_civil_from_days(days, &y, &m, &d);
	return (c->months & (1U << m)) && day_match(c, days, d) &&
	       (c->hours & (1U << (secs / 3600))) && (c->minutes & (1ULL << (secs % 3600 / 60)));
}

/* The first matching wall minute >= w, or INT64_MIN past limit. */
static int64_t next_wall(const struct cron *c, int64_t w, int64_t limit)
{
	w = floor_div(w + 59, 60) * 60;
	while (w <= limit) {
		int64_t days = floor_div(w, 86400), secs = w - days * 86400, y;
		unsigned m, d, h = (unsigned)(secs / 3600), mi = (unsigned)(secs % 3600 / 60);

		tz_civil_from_days(days, &y, &m, &d);
		if (!(c->months & (1U << m))) {
			if (++m > 12) {
				m = 1;
				y++;
			}
			w = tz_days_from_civil(y, m, 1) * 86400;
			continue;
		}
		if (!day_match(c, days, d)) {
			w = (days + 1) * 86400;
			continue;
		}
		if (!(c->hours & (1U << h))) {
			w = days * 86400 + (int64_t)(h + 1) * 3600;
			continue;
		}
		if (!(c->minutes & (1ULL << mi))) {
			uint64_t later = c->minutes & ~((2ULL << mi) - 1);

			if (!later) {
				w = days * 86400 + (int64_t)(h + 1) * 3600;
				continue;
			}
			w = days * 86400 + (int64_t)h * 3600 + (int64_t)__builtin_ctzll(later) * 60;
			continue;
		}
		return w;
	}
	return INT64_MIN;
}

int cron_next(const struct cron *c, const struct tz *tz, int64_t after, int64_t *out)
{
	int64_t limit, w, best = INT64_MAX, best_bound = INT64_MAX;
	int32_t lo, hi;

	if (!c->minutes || !c->hours || !c->days || !c->months || !c->weekdays)
		return KPL_ENOTFOUND;
	/* An instant u > after has a wall time >= after + the smallest offset
	 * near after (tz_offset_range_near's window covers it, see there). */
	tz_offset_range_near(tz, after, &lo, &hi);
	limit = after + (int64_t)CRON_MAX_YEARS * 366 * 86400;
	for (w = next_wall(c, after + lo + 1, limit); w != INT64_MIN;
	     w = next_wall(c, w + 60, limit)) {
		int64_t inst[2], gap_end, gap_len;
		int n;

		/* No later wall time maps to an instant before best. */
		if (w > best_bound)
			break;
		n = tz_from_wall(tz, w, inst, &gap_end, &gap_len);
		if (n == 0) {
			/* Skipped by a spring-forward: fixed-time jobs run at
			 * the jump, others follow the wall clock. */
			if (!c->fixed_time || gap_len > CRON_MAX_GAP)
				continue;
			inst[0] = gap_end;
			n = 1;
		} else if (n == 2 && c->fixed_time) {
			/* Repeated by a fall-back: a fixed-time job once. */
			n = 1;
		}
		for (int k = 0; k < n; k++) {
			if (inst[k] > after && inst[k] < best) {
				best = inst[k];
				tz_offset_range_near(tz, best, &lo, &hi);
				best_bound = best + hi;
			}
		}
	}
	if (best == INT64_MAX)
		return KPL_ENOTFOUND;
	*out = best;
	return 0;
}
