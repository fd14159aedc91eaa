/*
 * tzfile.c - TZif files and POSIX TZ strings, read without libc's time zone
 * state (see tzfile.h).
 */
#include "engine/tzfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Bounds on what a TZif file may hold; real zones have a few hundred
 * transitions, a dozen types and a footer of ~30 bytes. */
#define TZ_MAX_TIMES 10000
#define TZ_MAX_TYPES 256
#define TZ_MAX_CHARS 1024
#define TZ_MAX_FOOTER 256
/* RFC 8536 3.2: -89999 <= utoff <= 93599. */
#define TZ_MIN_OFF (-89999)
#define TZ_MAX_OFF 93599
/* Rule times (RFC 8536 3.3.1 extends POSIX's 0..24 to -167..167 hours). */
#define TZ_MAX_RULE_HOURS 167

enum rule_kind { RULE_JULIAN1 /* Jn */, RULE_JULIAN0 /* n */, RULE_MONTH /* Mm.w.d */ };

struct tz_rule {
	enum rule_kind kind;
	int day;             /* Jn: 1..365; n: 0..365; M: weekday 0..6 */
	int week, month;     /* M only: 1..5, 1..12 */
	int32_t time;        /* seconds after local midnight, may be < 0 */
};

/* A POSIX TZ string. */
struct tz_posix {
	bool present;
	int32_t std_off, dst_off; /* seconds east of UTC */
	bool has_dst;
	struct tz_rule start, end;
};

struct tz {
	char name[TZ_MAX_NAME + 1];
	size_t n_times;
	int64_t *times;   /* strictly increasing */
	uint8_t *idx;     /* type of each time */
	size_t n_types;
	int32_t *offs;    /* offset of each type */
	struct tz_posix rule; /* for times past the table */
	int32_t min_off, max_off;
};

/* ---------------------------------------------------------------------- */
/* Civil calendar (Howard Hinnant's algorithms) */

int64_t tz_days_from_civil(int64_t y, unsigned m, unsigned d)
{
	int64_t era;
	unsigned yoe, doy, doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = (unsigned)(y - era * 400);
	doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t)doe - 719468;
}

void tz_civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
	int64_t era;
	unsigned doe, yoe, doy, mp;

	z += 719468;
	era = (z >= 0 ? z : z - 146096) / 146097;
	doe = (unsigned)(z - era * 146097);
	yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	mp = (5 * doy + 2) / 153;
	*d = doy - (153 * mp + 2) / 5 + 1;
	*m = mp < 10 ? mp + 3 : mp - 9;
	*y = (int64_t)yoe + era * 400 + (*m <= 2);
}

unsigned tz_weekday(int64_t days)
{
	/* 1970-01-01 was a Thursday (4). */
	return (unsigned)(((days % 7) + 7 + 4) % 7);
}

static bool is_leap(int64_t y)
{
	return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

unsigned tz_month_days(int64_t y, unsigned m)
{
	static const unsigned n[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };

	return m == 2 && is_leap(y) ? 29 : n[m - 1];
}

static int64_t floor_div(int64_t a, int64_t b)
{
	return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

static int64_t year_of(int64_t t)
{
	int64_t y;
	unsigned m, d;

	tz_civil_from_days(floor_div(t, 86400), &y, &m, &d);
	return y;
}

/* ---------------------------------------------------------------------- */
/* POSIX TZ strings */

/* hh[:mm[:ss]] with hh <= max_h; *p advances. */
static bool parse_hms(const char **p, int max_h, int32_t *out)
{
	const char *s = *p;
	int32_t v[3] = { 0, 0, 0 };
	int i;

	for (i = 0; i < 3; i++) {
		int digits = 0;

		if (i > 0) {
			if (*s != ':')
				break;
			s++;
		}
		while (*s >= '0' && *s <= '9' && digits < 3) {
			v[i] = v[i] * 10 + (*s++ - '0');
			digits++;
		}
		if (!digits)
			return false;
	}
	if (v[0] > max_h || v[1] > 59 || v[2] > 59)
		return false;
	*out = v[0] * 3600 + v[1] * 60 + v[2];
	*p = s;
	return true;
}

static bool parse_signed_hms(const char **p, int max_h, int32_t *out)
{
	int sign = 1;

	if (**p == '+' || **p == '-') {
		sign = **p == '-' ? -1 : 1;
		(*p)++;
	}
	if (!parse_hms(p, max_h, out))
		return false;
	*out *= sign;
	return true;
}

static bool parse_abbr(const char **p)
{
	const char *s = *p;
	size_t n = 0;

	if (*s == '<') {
		s++;
		while (*s && *s != '>') {
			if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') ||
			      (*s >= '0' && *s <= '9') || *s == '+' || *s == '-'))
				return false;
			s++;
			n++;
		}
		if (*s != '>' || n < 3)
			return false;
		*p = s + 1;
		return true;
	}
	while ((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z')) {
		s++;
		n++;
	}
	if (n < 3)
		return false;
	*p = s;
	return true;
}

static bool parse_int(const char **p, int lo, int hi, int *out)
{
	const char *s = *p;
	int v = 0, digits = 0;

	while (*s >= '0' && *s <= '9' && digits < 4) {
		v = v * 10 + (*s++ - '0');
		digits++;
	}
	if (!digits || v < lo || v > hi)
		return false;
	*out = v;
	*p = s;
	return true;
}

static bool parse_rule(const char **p, struct tz_rule *r)
{
	const char *s = *p;

	if (*s == 'J') {
		s++;
		r->kind = RULE_JULIAN1;
		if (!parse_int(&s, 1, 365, &r->day))
			return false;
	} else if (*s == 'M') {
		s++;
		r->kind = RULE_MONTH;
		if (!parse_int(&s, 1, 12, &r->month) || *s++ != '.' ||
		    !parse_int(&s, 1, 5, &r->week) || *s++ != '.' ||
		    !parse_int(&s, 0, 6, &r->day))
			return false;
	} else {
		r->kind = RULE_JULIAN0;
		if (!parse_int(&s, 0, 365, &r->day))
			return false;
	}
	r->time = 2 * 3600;
	if (*s == '/') {
		s++;
		if (!parse_signed_hms(&s, TZ_MAX_RULE_HOURS, &r->time))
			return false;
	}
	*p = s;
	return true;
}

/* s is NUL-terminated; "" means no rule. */
static bool parse_posix(const char *s, struct tz_posix *out)
{
	int32_t off;

	memset(out, 0, sizeof *out);
	if (!*s)
		return true;
	if (!parse_abbr(&s) || !parse_signed_hms(&s, 24, &off))
		return false;
	out->present = true;
	out->std_off = -off;
	if (!*s)
		return true;
	if (!parse_abbr(&s))
		return false;
	out->has_dst = true;
	out->dst_off = out->std_off + 3600;
	if (*s && *s != ',') {
		if (!parse_signed_hms(&s, 24, &off))
			return false;
		out->dst_off = -off;
	}
	if (!*s) {
		/* POSIX leaves the default rule to the implementation; glibc's
		 * and the US's: second Sunday in March to first in November. */
		out->start = (struct tz_rule){ RULE_MONTH, 0, 2, 3, 7200 };
		out->end = (struct tz_rule){ RULE_MONTH, 0, 1, 11, 7200 };
		return true;
	}
	if (*s++ != ',' || !parse_rule(&s, &out->start) || *s++ != ',' ||
	    !parse_rule(&s, &out->end))
		return false;
	return *s == '\0';
}

/* The instant a rule's date and time falls on in year y, given the offset
 * in effect before it. */
static int64_t rule_instant(const struct tz_rule *r, int64_t y, int32_t off_before)
{
	int64_t day;

	switch (r->kind) {
	case RULE_JULIAN1:
		day = tz_days_from_civil(y, 1, 1) + r->day - 1 +
		      (is_leap(y) && r->day >= 60 ? 1 : 0);
		break;
	case RULE_JULIAN0:
		day = tz_days_from_civil(y, 1, 1) + r->day;
		break;
	default: {
		int64_t first = tz_days_from_civil(y, (unsigned)r->month, 1);
		unsigned wd = tz_weekday(first);
		int64_t mdays = tz_month_days(y, (unsigned)r->month);

		day = first + (r->day - (int)wd + 7) % 7 + (r->week - 1) * 7;
		while (day - first >= mdays)
			day -= 7;
		break;
	}
	}
	return day * 86400 + r->time - off_before;
}

static int32_t posix_offset_at(const struct tz_posix *r, int64_t t)
{
	int64_t y, s, e;
	bool dst;

	if (!r->has_dst)
		return r->std_off;
	y = year_of(t + r->std_off);
	s = rule_instant(&r->start, y, r->std_off);
	e = rule_instant(&r->end, y, r->dst_off);
	if (s < e)
		dst = s <= t && t < e;
	else
		dst = !(e <= t && t < s);
	return dst ? r->dst_off : r->std_off;
}

/* ---------------------------------------------------------------------- */
/* TZif */

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int64_t be64(const uint8_t *p)
{
	return (int64_t)((uint64_t)be32(p) << 32 | be32(p + 4));
}

struct tzif_hdr {
	char version;
	uint32_t isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt;
};

/* Reads a header at data[*off]; checks the counts' bounds. */
static int read_hdr(const char *name, const uint8_t *data, size_t len, size_t *off,
		    struct tzif_hdr *h, struct kpl_err *err)
{
	const uint8_t *p;

	if (len - *off < 44 || memcmp(data + *off, "TZif", 4) != 0)
		return kpl_errf(err, KPL_EINVAL, "time zone %s: not a TZif file", name);
	p = data + *off;
	h->version = (char)p[4];
	h->isutcnt = be32(p + 20);
	h->isstdcnt = be32(p + 24);
	h->leapcnt = be32(p + 28);
	h->timecnt = be32(p + 32);
	h->typecnt = be32(p + 36);
	h->charcnt = be32(p + 40);
	*off += 44;
	if (h->timecnt > TZ_MAX_TIMES || h->typecnt < 1 || h->typecnt > TZ_MAX_TYPES ||
	    h->charcnt > TZ_MAX_CHARS || (h->isutcnt && h->isutcnt != h->typecnt) ||
	    (h->isstdcnt && h->isstdcnt != h->typecnt))
		return kpl_errf(err, KPL_EINVAL, "time zone %s: TZif counts out of bounds", name);
	if (h->leapcnt)
		return kpl_errf(err, KPL_EINVAL,
				"time zone %s: leap-second zones (right/...) are not supported",
				name);
	return 0;
}

static size_t block_len(const struct tzif_hdr *h, size_t tsize)
{
	return h->timecnt * (tsize + 1) + h->typecnt * 6 + h->charcnt +
	       h->leapcnt * (tsize + 4) + h->isstdcnt + h->isutcnt;
}

static void set_range(struct tz *tz)
{
	tz->min_off = tz->max_off = tz->n_types ? tz->offs[0] : 0;
	for (size_t i = 0; i < tz->n_types; i++) {
		if (tz->offs[i] < tz->min_off)
			tz->min_off = tz->offs[i];
		if (tz->offs[i] > tz->max_off)
			tz->max_off = tz->offs[i];
	}
	if (tz->rule.present) {
		int32_t o[2] = { tz->rule.std_off,
				 tz->rule.has_dst ? tz->rule.dst_off : tz->rule.std_off };

		for (int i = 0; i < 2; i++) {
			if (!tz->n_types || o[i] < tz->min_off)
				tz->min_off = o[i];
			if (!tz->n_types || o[i] > tz->max_off)
				tz->max_off = o[i];
		}
	}
}

int tz_parse(const char *name, const uint8_t *data, size_t len, struct tz **out,
	     struct kpl_err *err)
{
	struct tz *tz = NULL;
	struct tzif_hdr h;
	size_t off = 0, tsize = 4, blen;
	const uint8_t *p;
	int rc;

	*out = NULL;
	if (len > TZ_MAX_FILE)
		return kpl_errf(err, KPL_EINVAL, "time zone %s: file over %d bytes", name,
				TZ_MAX_FILE);
	if ((rc = read_hdr(name, data, len, &off, &h, err)) != 0)
		return rc;
	if (h.version >= '2') {
		/* Skip the 32-bit block for the 64-bit one. */
		blen = block_len(&h, 4);
		if (len - off < blen)
			goto truncated;
		off += blen;
		if ((rc = read_hdr(name, data, len, &off, &h, err)) != 0)
			return rc;
		tsize = 8;
	}
	blen = block_len(&h, tsize);
	if (len - off < blen)
		goto truncated;
	tz = kpl_calloc(1, sizeof *tz);
	snprintf(tz->name, sizeof tz->name, "%s", name);
	tz->n_times = h.timecnt;
	tz->n_types = h.typecnt;
	tz->times = kpl_calloc(h.timecnt + 1, sizeof *tz->times);
	tz->idx = kpl_calloc(h.timecnt + 1, 1);
	tz->offs = kpl_calloc(h.typecnt, sizeof *tz->offs);
	p = data + off;
	for (size_t i = 0; i < h.timecnt; i++, p += tsize) {
		tz->times[i] = tsize == 8 ? be64(p) : (int32_t)be32(p);
		if (i && tz->times[i] <= tz->times[i - 1]) {
			rc = kpl_errf(err, KPL_EINVAL,
				      "time zone %s: transition times out of order", name);
			goto fail;
		}
	}
	for (size_t i = 0; i < h.timecnt; i++, p++) {
		if (*p >= h.typecnt) {
			rc = kpl_errf(err, KPL_EINVAL, "time zone %s: bad type index", name);
			goto fail;
		}
		tz->idx[i] = *p;
	}
	for (size_t i = 0; i < h.typecnt; i++, p += 6) {
		int32_t o = (int32_t)be32(p);

		if (o < TZ_MIN_OFF || o > TZ_MAX_OFF || p[4] > 1) {
			rc = kpl_errf(err, KPL_EINVAL, "time zone %s: bad local time type",
				      name);
			goto fail;
		}
		tz->offs[i] = o;
	}
	off += blen;
	if (tsize == 8) {
		/* Footer: "\n" TZ-string "\n". */
		char footer[TZ_MAX_FOOTER + 1];
		const uint8_t *nl;

		if (len - off < 2 || data[off] != '\n')
			goto truncated;
		off++;
		nl = memchr(data + off, '\n', len - off < TZ_MAX_FOOTER + 1 ? len - off
					      : TZ_MAX_FOOTER + 1);
		if (!nl)
			goto truncated;
		memcpy(footer, data + off, (size_t)(nl - (data + off)));
		footer[nl - (data + off)] = '\0';
		if (memchr(footer, '\0', (size_t)(nl - (data + off))) ||
		    !parse_posix(footer, &tz->rule)) {
			rc = kpl_errf(err, KPL_EINVAL, "time zone %s: bad TZ string in the footer",
				      name);
			goto fail;
		}
	}
	set_range(tz);
	*out = tz;
	return 0;
truncated:
	rc = kpl_errf(err, KPL_EINVAL, "time zone %s: truncated TZif file", name);
fail:
	tz_free(tz);
	return rc;
}

struct tz *tz_utc(void)
{
	struct tz *tz = kpl_calloc(1, sizeof *tz);

	snprintf(tz->name, sizeof tz->name, "UTC");
	tz->rule.present = true;
	set_range(tz);
	return tz;
}

int tz_check_name(const char *name, struct kpl_err *err)
{
	size_t n = strlen(name);
	bool start = true;

	if (n == 0)
		return kpl_errf(err, KPL_EINVAL, "time zone: empty name");
	if (n > TZ_MAX_NAME)
		return kpl_errf(err, KPL_EINVAL, "time zone: name longer than %d bytes",
				TZ_MAX_NAME);
	if (strcmp(name, "Local") == 0 || strcmp(name, "localtime") == 0)
		return kpl_errf(err, KPL_EINVAL,
				"time zone \"%s\": name a zone (such as \"Europe/Berlin\" or "
				"\"UTC\"), not the machine's local one", name);
	for (size_t i = 0; i < n; i++) {
		char c = name[i];

		if (start && (c == '.' || c == '/'))
			return kpl_errf(err, KPL_EINVAL,
					"time zone \"%.64s\": a part of the name may not start "
					"with '%c'", name, c);
		start = c == '/';
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '+' || c == '-' ||
		      c == '/'))
			return kpl_errf(err, KPL_EINVAL,
					"time zone \"%.64s\": '%c' is not allowed in a zone name "
					"(letters, digits, . _ + - /)", name,
					(c >= 0x20 && c < 0x7f) ? c : '?');
	}
	if (start)
		return kpl_errf(err, KPL_EINVAL, "time zone \"%.64s\": ends with '/'", name);
	return 0;
}

int tz_load(const char *dir, const char *name, struct tz **out, struct kpl_err *err)
{
	char path[4096];
	uint8_t *buf = NULL;
	struct stat st;
	size_t got = 0;
	int fd = -1, rc;

	*out = NULL;
	if ((rc = tz_check_name(name, err)) != 0)
		return rc;
	if (strcmp(name, "UTC") == 0 || strcmp(name, "Etc/UTC") == 0) {
		*out = tz_utc();
		return 0;
	}
	snprintf(path, sizeof path, "%s/%s", dir ? dir : TZ_ZONEINFO, name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT || errno == ENOTDIR)
			return kpl_errf(err, KPL_EINVAL,
					"time zone \"%s\": unknown (no %s)", name, path);
		return kpl_errf(err, KPL_EIO, "time zone \"%s\": %s: %s", name, path,
				strerror(errno));
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		rc = kpl_errf(err, KPL_EINVAL, "time zone \"%s\": %s is not a zone file", name,
			      path);
		goto fail;
	}
	if (st.st_size > TZ_MAX_FILE) {
		rc = kpl_errf(err, KPL_EINVAL, "time zone \"%s\": %s is over %d bytes", name,
			      path, TZ_MAX_FILE);
		goto fail;
	}
	buf = kpl_malloc((size_t)st.st_size + 1);
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = kpl_errf(err, KPL_EIO, "time zone \"%s\": reading %s: %s", name, path,
				      n < 0 ? strerror(errno) : "short read");
			goto fail;
		}
		got += (size_t)n;
	}
	rc = tz_parse(name, buf, got, out, err);
fail:
	free(buf);
	if (fd >= 0)
		close(fd);
	return rc;
}

void tz_free(struct tz *tz)
{
	if (!tz)
		return;
	free(tz->times);
	free(tz->idx);
	free(tz->offs);
	free(tz);
}

const char *tz_name(const struct tz *tz)
{
	return tz->name;
}

void tz_offset_range(const struct tz *tz, int32_t *min, int32_t *max)
{
	*min = tz->min_off;
	*max = tz->max_off;
}

int32_t tz_offset_at(const struct tz *tz, int64_t t)
{
	size_t lo, hi;

	if (tz->n_times == 0)
		return tz->rule.present ? posix_offset_at(&tz->rule, t)
					: (tz->n_types ? tz->offs[0] : 0);
	/* RFC 8536: type 0 before the first transition. */
	if (t < tz->times[0])
		return tz->offs[0];
	if (t >= tz->times[tz->n_times - 1] && tz->rule.present)
		return posix_offset_at(&tz->rule, t);
	/* The last transition <= t. */
	lo = 0;
	hi = tz->n_times;
	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		if (tz->times[mid] <= t)
			lo = mid;
		else
			hi = mid;
	}
	return tz->offs[tz->idx[lo]];
}

/* A change of offset at instant at. */
struct trans {
	int64_t at;
	int32_t before, after;
};

#define MAX_NEAR 16

/* The transitions in [a, b), at most MAX_NEAR (a window of a few days holds
 * two at most in any real zone). */
static size_t transitions_in(const struct tz *tz, int64_t a, int64_t b, struct trans *out)
{
	size_t n = 0;
	int64_t last = tz->n_times ? tz->times[tz->n_times - 1] : INT64_MIN;

	for (size_t i = 0; i < tz->n_times && n < MAX_NEAR; i++) {
		/* NEEDSWORK: a binary search; tables are a few hundred long. */
		if (tz->times[i] < a)
			continue;
		if (tz->times[i] >= b)
			break;
		out[n].at = tz->times[i];
		out[n].before = tz_offset_at(tz, tz->times[i] - 1);
		out[n].after = tz->offs[tz->idx[i]];
		n++;
	}
	if (tz->rule.present && tz->rule.has_dst && b > last) {
		int64_t y0 = year_of(a > last ? a : last) - 1, y1 = year_of(b) + 1;

		for (int64_t y = y0; y <= y1 && n < MAX_NEAR; y++) {
			int64_t at[2] = { rule_instant(&tz->rule.start, y, tz->rule.std_off),
					  rule_instant(&tz->rule.end, y, tz->rule.dst_off) };

			for (int k = 0; k < 2 && n < MAX_NEAR; k++) {
				if (at[k] < a || at[k] >= b || at[k] <= last)
					continue;
				out[n].at = at[k];
				out[n].before = tz_offset_at(tz, at[k] - 1);
				out[n].after = tz_offset_at(tz, at[k]);
				if (out[n].before != out[n].after)
					n++;
			}
		}
	}
	return n;
}

int tz_from_wall(const struct tz *tz, int64_t wall, int64_t out[2], int64_t *gap_end,
		 int64_t *gap_len)
{
	struct trans tr[MAX_NEAR];
	int32_t offs[MAX_NEAR + 1];
	size_t n_tr, n_offs = 0;
	int found = 0;

	/* Offsets are within 26 h of 0, so every instant whose wall time is
	 * wall lies within a day and a bit of it. */
	n_tr = transitions_in(tz, wall - 2 * 86400, wall + 2 * 86400, tr);
	offs[n_offs++] = tz_offset_at(tz, wall - 2 * 86400);
	for (size_t i = 0; i < n_tr; i++)
		offs[n_offs++] = tr[i].after;
	for (size_t i = 0; i < n_offs; i++) {
		int64_t u = wall - offs[i];
		bool dup = false;

		if (tz_offset_at(tz, u) != offs[i])
			continue;
		for (int k = 0; k < found; k++)
			dup |= out[k] == u;
		if (dup)
			continue;
		if (found < 2) {
			out[found++] = u;
		} else if (u < out[1]) {
			out[1] = u;
		}
		if (found == 2 && out[0] > out[1]) {
			int64_t t = out[0];
			out[0] = out[1];
			out[1] = t;
		}
	}
	if (found == 0) {
		for (size_t i = 0; i < n_tr; i++) {
			if (tr[i].at + tr[i].before <= wall && wall < tr[i].at + tr[i].after) {
				if (gap_end)
					*gap_end = tr[i].at;
				if (gap_len)
					*gap_len = tr[i].after - tr[i].before;
				return 0;
			}
		}
		/* Not reached in a consistent zone; say the wall time itself. */
		if (gap_end)
			*gap_end = wall - tz_offset_at(tz, wall);
		if (gap_len)
			*gap_len = 0;
	}
	return found;
}

void tz_offset_range_near(const struct tz *tz, int64_t t, int32_t *min, int32_t *max)
{
	struct trans tr[MAX_NEAR];
	size_t n = transitions_in(tz, t - 2 * 86400, t + 2 * 86400, tr);

	*min = *max = tz_offset_at(tz, t - 2 * 86400);
	for (size_t i = 0; i < n; i++) {
		if (tr[i].after < *min)
			*min = tr[i].after;
		if (tr[i].after > *max)
			*max = tr[i].after;
	}
}
