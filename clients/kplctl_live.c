/* kplctl_live.c - the live stage table's model and renderer (kplctl_live.h). */
#define _GNU_SOURCE /* wcwidth */
#include "clients/kplctl_live.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#include "base/kpl.h"
#include "google/protobuf/timestamp.pb-c.h"

struct live_stage {
	char *name;
	int state;          /* Kpl__V1__StageState */
	unsigned attempt;
	int64_t start_ms, end_ms; /* 0: not (yet) */
	char *message;      /* the stage's own, from its state */
	char *sys;          /* its last SYSTEM line this attempt, or NULL */
	char weight[16];    /* "25%", or "" */
	char verify[24];    /* "99.2", or "" */
};

struct live_log {
	char *stage;
	char mark; /* '|' stdout, '!' stderr, '*' kpl */
	char *text;
};

struct live {
	int utf8;
	char *id;
	int state; /* Kpl__V1__RunState */
	unsigned attempt;
	char *message;
	int64_t start_ms, end_ms;
	struct live_stage *stages;
	size_t n_stages;
	struct live_log logs[LIVE_LOG_LINES]; /* a ring, oldest at log_head */
	size_t log_head, n_logs;
};

static const char *const spin_utf8[] = { "\u280b", "\u2819", "\u2839", "\u2838",
					 "\u283c", "\u2834", "\u2826", "\u2827",
					 "\u2807", "\u280f" };
static const char *const spin_ascii[] = { "|", "/", "-", "\\" };

static void set_str(char **dst, const char *s)
{
	free(*dst);
	*dst = s ? kpl_strdup(s) : NULL;
}

static int64_t ts_ms(const Google__Protobuf__Timestamp *t)
{
	if (!t || (!t->seconds && !t->nanos))
		return 0;
	return t->seconds * 1000 + t->nanos / 1000000;
}

static struct live_stage *stage_get(struct live *l, const char *name)
{
	struct live_stage *s;

	for (size_t i = 0; i < l->n_stages; i++)
		if (!strcmp(l->stages[i].name, name))
			return &l->stages[i];
	/* A stage GetRun did not list (a newer kpld's): shown all the same. */
	l->stages = kpl_realloc(l->stages, (l->n_stages + 1) * sizeof *l->stages);
	s = &l->stages[l->n_stages++];
	memset(s, 0, sizeof *s);
	s->name = kpl_strdup(name);
	s->state = KPL__V1__STAGE_STATE__STAGE_STATE_PENDING;
	return s;
}

struct live *live_new(const Kpl__V1__Run *r, int utf8)
{
	struct live *l = kpl_calloc(1, sizeof *l);

	l->utf8 = utf8;
	live_set_run(l, r);
	return l;
}

void live_free(struct live *l)
{
	if (!l)
		return;
	for (size_t i = 0; i < l->n_stages; i++) {
		free(l->stages[i].name);
		free(l->stages[i].message);
		free(l->stages[i].sys);
	}
	for (size_t i = 0; i < LIVE_LOG_LINES; i++) {
		free(l->logs[i].stage);
		free(l->logs[i].text);
	}
	free(l->stages);
	free(l->id);
	free(l->message);
	free(l);
}

void live_set_run(struct live *l, const Kpl__V1__Run *r)
{
	set_str(&l->id, r->id);
	l->state = r->state;
	l->attempt = r->attempt;
	set_str(&l->message, r->message);
	l->start_ms = ts_ms(r->started_at);
	l->end_ms = ts_ms(r->finished_at);
	for (size_t i = 0; i < r->n_stages; i++) {
		const Kpl__V1__StageStatus *rs = r->stages[i];
		struct live_stage *s = stage_get(l, rs->name);

		s->state = rs->state;
		s->attempt = rs->attempt;
		set_str(&s->message, rs->message);
		s->start_ms = ts_ms(rs->started_at);
		s->end_ms = ts_ms(rs->finished_at);
	}
}

/*
 * "weight 25", "weight: 25%", "weight=25" anywhere, as a word; or what
 * stages/canary.c writes at each step, "step 2/4: 25% of traffic to the
 * canary": "25%".
 */
static void parse_weight(struct live_stage *s, const char *line)
{
	const char *pct = strstr(line, "% of traffic");

	if (pct) {
		const char *b = pct;

		while (b > line && isdigit((unsigned char)b[-1]) && pct - b < 6)
			b--;
		if (b < pct && (b == line || !isalnum((unsigned char)b[-1]))) {
			snprintf(s->weight, sizeof s->weight, "%.*s%%", (int)(pct - b), b);
			return;
		}
	}
	for (const char *p = line; (p = strstr(p, "weight")); p += 6) {
		const char *q = p + 6;
		size_t n = 0;

		if (p > line && (isalnum((unsigned char)p[-1]) || p[-1] == '_'))
			continue;
		while (*q == ' ' || *q == ':' || *q == '=')
			q++;
		while (isdigit((unsigned char)q[n]) && n < 6)
			n++;
		if (!n || isalnum((unsigned char)q[n]))
			continue;
		snprintf(s->weight, sizeof s->weight, "%.*s%%", (int)n, q);
		return;
	}
}

/*
 * stages/verify.c writes one line per check and round:
 *   request-success-rate = 99.2 (min 99) pass, round 2/10
 *   request-success-rate = no data (empty result): inconclusive, round 4/10
 *   http GET http://web/healthz = 200 (expect 200) pass, round 4/10
 * VALUE is what follows " = " up to " (", ":" or ",".
 */
static void parse_verify(struct live_stage *s, const char *line)
{
	const char *eq = strstr(line, " = "), *v, *e, *r;
	size_t n;

	if (!eq)
		return;
	r = strstr(line, ", round ");
	if (strncmp(line, "verify ", 7) &&
	    !(r && r > eq && isdigit((unsigned char)r[8])))
		return;
	v = eq + 3;
	e = v + strcspn(v, ":,");
	if ((r = strstr(v, " (")) && r < e)
		e = r;
	while (e > v && e[-1] == ' ')
		e--;
	n = (size_t)(e - v);
	if (!n)
		return;
	if (n >= sizeof s->verify)
		n = sizeof s->verify - 1;
	memcpy(s->verify, v, n);
	s->verify[n] = '\0';
}

static void log_push(struct live *l, const char *stage, char mark,
		     const char *text)
{
	struct live_log *g;

	if (l->n_logs < LIVE_LOG_LINES) {
		g = &l->logs[(l->log_head + l->n_logs++) % LIVE_LOG_LINES];
	} else {
		g = &l->logs[l->log_head];
		l->log_head = (l->log_head + 1) % LIVE_LOG_LINES;
	}
	set_str(&g->stage, stage);
	set_str(&g->text, text);
	g->mark = mark;
}

void live_event(struct live *l, const Kpl__V1__RunEvent *ev)
{
	int64_t t = ts_ms(ev->time);
	struct live_stage *s;

	switch (ev->kind) {
	case KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE:
		l->state = ev->run_state;
		set_str(&l->message, ev->message);
		if (ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_RUNNING) {
			if (!l->start_ms || l->end_ms)
				l->start_ms = t; /* a retry starts the clock again */
			l->end_ms = 0;
		} else if (ev->run_state != KPL__V1__RUN_STATE__RUN_STATE_QUEUED) {
			l->end_ms = t;
		}
		break;
	case KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE:
		s = stage_get(l, ev->stage);
		s->state = ev->stage_state;
		if (ev->attempt)
			s->attempt = ev->attempt;
		set_str(&s->message, ev->message);
		switch (ev->stage_state) {
		case KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING:
			set_str(&s->sys, NULL);
			/* fall through */
		case KPL__V1__STAGE_STATE__STAGE_STATE_WAITING:
			s->start_ms = t;
			s->end_ms = 0;
			break;
		case KPL__V1__STAGE_STATE__STAGE_STATE_PENDING:
			s->start_ms = s->end_ms = 0;
			break;
		default:
			s->end_ms = t;
			break;
		}
		break;
	case KPL__V1__EVENT_KIND__EVENT_KIND_LOG:
		if (ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM && *ev->stage) {
			s = stage_get(l, ev->stage);
			set_str(&s->sys, ev->message);
			parse_weight(s, ev->message);
			parse_verify(s, ev->message);
		}
		log_push(l, ev->stage,
			 ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_STDERR   ? '!'
			 : ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM ? '*'
										: '|',
			 ev->message);
		break;
	default:
		break;
	}
}

int live_ticking(const struct live *l)
{
	for (size_t i = 0; i < l->n_stages; i++)
		if (l->stages[i].state == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING)
			return 1;
	return l->state == KPL__V1__RUN_STATE__RUN_STATE_RUNNING;
}

/* --- Rendering. --- */

/* A line being built, that counts display columns and refuses to grow past
 * max of them. */
struct line {
	char *buf;
	size_t len, cap;
	int cols, max;
	int utf8;
};

static void line_bytes(struct line *ln, const char *s, size_t n)
{
	if (ln->len + n + 1 > ln->cap) {
		ln->cap = (ln->len + n + 1) * 2;
		ln->buf = kpl_realloc(ln->buf, ln->cap);
	}
	memcpy(ln->buf + ln->len, s, n);
	ln->len += n;
	ln->buf[ln->len] = '\0';
}

/* Appends text, as much of it as fits: control characters become blanks
 * (a log line's escape sequence must not move our cursor), characters the
 * terminal cannot show become '?'. */
static void line_put(struct line *ln, const char *s)
{
	mbstate_t ps;

	memset(&ps, 0, sizeof ps);
	while (*s && ln->cols < ln->max) {
		unsigned char c = (unsigned char)*s;
		wchar_t wc;
		size_t n;
		int w;

		if (c < 0x20 || c == 0x7f) {
			line_bytes(ln, " ", 1);
			ln->cols++;
			s++;
			continue;
		}
		if (c < 0x80) {
			line_bytes(ln, s, 1);
			ln->cols++;
			s++;
			continue;
		}
		n = ln->utf8 ? mbrtowc(&wc, s, MB_CUR_MAX, &ps) : (size_t)-1;
		if (n == (size_t)-1 || n == (size_t)-2 || n == 0) {
			memset(&ps, 0, sizeof ps);
			line_bytes(ln, "?", 1);
			ln->cols++;
			s++;
			continue;
		}
		w = wcwidth(wc);
		if (w < 0) {
			line_bytes(ln, "?", 1);
			ln->cols++;
		} else if (ln->cols + w <= ln->max) {
			line_bytes(ln, s, n);
			ln->cols += w;
		} else {
			break;
		}
		s += n;
	}
}

/* Appends s in a cell of width columns (and two blanks after it). */
static void line_cell(struct line *ln, const char *s, int width)
{
	int end = ln->cols + width;

	line_put(ln, s);
	while (ln->cols < end + 2 && ln->cols < ln->max) {
		line_bytes(ln, " ", 1);
		ln->cols++;
	}
}

static char *line_take(struct line *ln)
{
	char *s = ln->buf ? ln->buf : kpl_strdup("");
	size_t n = strlen(s);

	while (n > 0 && s[n - 1] == ' ')
		s[--n] = '\0';
	ln->buf = NULL;
	return s;
}

static const char *fmt_ms(int64_t ms, char *buf, size_t size)
{
	if (ms < 0)
		ms = 0;
	if (ms < 60000)
		snprintf(buf, size, "%.1fs", ms / 1000.0);
	else if (ms < 3600000)
		snprintf(buf, size, "%dm%02ds", (int)(ms / 60000), (int)(ms / 1000 % 60));
	else
		snprintf(buf, size, "%dh%02dm", (int)(ms / 3600000), (int)(ms / 60000 % 60));
	return buf;
}

static const char *state_name(const ProtobufCEnumDescriptor *d, int v)
{
	const ProtobufCEnumValue *e = protobuf_c_enum_descriptor_get_value(d, v);
	const char *u;

	if (!e)
		return "?";
	u = strstr(e->name, "_STATE_");
	return u ? u + 7 : e->name;
}

static int run_final(int state)
{
	return state == KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED ||
	       state == KPL__V1__RUN_STATE__RUN_STATE_FAILED ||
	       state == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED;
}

static int stage_final(int state)
{
	return state == KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED ||
	       state == KPL__V1__STAGE_STATE__STAGE_STATE_FAILED ||
	       state == KPL__V1__STAGE_STATE__STAGE_STATE_SKIPPED ||
	       state == KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED;
}

struct frame {
	char **lines;
	int n, cap;
};

static void frame_add(struct frame *f, char *s)
{
	if (f->n + 2 > f->cap) {
		f->cap = f->cap * 2 + 16;
		f->lines = kpl_realloc(f->lines, (size_t)f->cap * sizeof *f->lines);
	}
	f->lines[f->n++] = s;
	f->lines[f->n] = NULL;
}

static char *text_line(int utf8, int max, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static char *text_line(int utf8, int max, const char *fmt, ...)
{
	struct line ln = { .max = max, .utf8 = utf8 };
	va_list ap;
	char buf[2048];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	line_put(&ln, buf);
	return line_take(&ln);
}

static char *stage_row(const struct live *l, const struct live_stage *s,
		       int64_t now_ms, int name_w, int extra, int max)
{
	struct line ln = { .max = max, .utf8 = l->utf8 };
	char state[48], att[16], el[32];
	const char *msg = s->message;
	int running = s->state == KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING;

	if (running) {
		const char *const *sp = l->utf8 ? spin_utf8 : spin_ascii;
		size_t n = l->utf8 ? KPL_ARRAY_SIZE(spin_utf8) : KPL_ARRAY_SIZE(spin_ascii);

		snprintf(state, sizeof state, "%s %s", sp[(now_ms / 100) % (int64_t)n],
			 state_name(&kpl__v1__stage_state__descriptor, s->state));
		if (s->sys)
			msg = s->sys;
	} else {
		snprintf(state, sizeof state, "%s",
			 state_name(&kpl__v1__stage_state__descriptor, s->state));
	}
	if (s->attempt)
		snprintf(att, sizeof att, "%u", s->attempt);
	else
		snprintf(att, sizeof att, "-");
	if (s->start_ms)
		fmt_ms((s->end_ms ? s->end_ms : now_ms) - s->start_ms, el, sizeof el);
	else
		snprintf(el, sizeof el, "-");

	line_cell(&ln, s->name, name_w);
	line_cell(&ln, state, 11);
	line_cell(&ln, att, 7);
	line_cell(&ln, el, 7);
	if (extra) {
		line_cell(&ln, *s->weight ? s->weight : "-", 6);
		line_cell(&ln, *s->verify ? s->verify : "-", 8);
	}
	line_put(&ln, msg ? msg : "");
	return line_take(&ln);
}

char **live_frame(const struct live *l, int64_t now_ms, int cols, int rows,
		  int *n)
{
	struct frame f = { 0 };
	int max = cols > 1 ? cols - 1 : 1, avail = rows > 1 ? rows - 1 : 1;
	int name_w = 5, extra = 0, shown, first = 0, n_logs, footer_lines;
	struct line hdr = { .max = max, .utf8 = l->utf8 };
	char el[32], att[32] = "";

	for (size_t i = 0; i < l->n_stages; i++) {
		int w = (int)strlen(l->stages[i].name);
		if (w > name_w)
			name_w = w;
		if (*l->stages[i].weight || *l->stages[i].verify)
			extra = 1;
	}

	/* What fits, from the least to the most needed: the log lines, then
	 * the stages beyond the first ones; the footer always. */
	footer_lines = 1;
	n_logs = (int)l->n_logs;
	shown = (int)l->n_stages;
	if (1 + shown + footer_lines + (n_logs ? n_logs + 2 : 0) > avail)
		n_logs = avail - 1 - shown - footer_lines - 2;
	if (n_logs < 1)
		n_logs = 0;
	if (1 + shown + footer_lines + (n_logs ? n_logs + 2 : 0) > avail) {
		/* A window of the stages that keeps the first one still to
		 * finish in sight, with one finished stage above it, and a
		 * line for what is hidden above and below. */
		int n_st = (int)l->n_stages, active = n_st - 1;

		for (int i = 0; i < n_st; i++)
			if (!stage_final(l->stages[i].state)) {
				active = i;
				break;
			}
		shown = avail - footer_lines - 3; /* header, above, below */
		if (shown < 1)
			shown = 1;
		first = active > 0 ? active - 1 : 0;
		if (first > n_st - shown)
			first = n_st - shown;
		if (first == 0)
			shown++; /* nothing above */
		else if (first + shown == n_st)
			first--, shown++; /* nothing below */
	}

	if (avail >= 2 + footer_lines) {
		line_cell(&hdr, "STAGE", name_w);
		line_cell(&hdr, "STATE", 11);
		line_cell(&hdr, "ATTEMPT", 7);
		line_cell(&hdr, "ELAPSED", 7);
		if (extra) {
			line_cell(&hdr, "WEIGHT", 6);
			line_cell(&hdr, "VERIFY", 8);
		}
		line_put(&hdr, "MESSAGE");
		frame_add(&f, line_take(&hdr));
		if (first > 0)
			frame_add(&f, text_line(l->utf8, max, "... %d more stages above", first));
		for (int i = first; i < first + shown; i++)
			frame_add(&f, stage_row(l, &l->stages[i], now_ms, name_w, extra, max));
		if (first + shown < (int)l->n_stages)
			frame_add(&f, text_line(l->utf8, max, "... %d more stages",
						(int)l->n_stages - first - shown));
	} else {
		free(hdr.buf);
	}
	if (n_logs) {
		frame_add(&f, kpl_strdup(""));
		for (int i = (int)l->n_logs - n_logs; i < (int)l->n_logs; i++) {
			const struct live_log *g = &l->logs[(l->log_head + (size_t)i) % LIVE_LOG_LINES];
			frame_add(&f, text_line(l->utf8, max, "%-*s %c %s", name_w,
						g->stage ? g->stage : "", g->mark,
						g->text ? g->text : ""));
		}
		frame_add(&f, kpl_strdup(""));
	}

	/* The footer: while the run goes on, how long it has; at the end,
	 * the same line the plain output ends with. */
	if (l->attempt > 1)
		snprintf(att, sizeof att, " (attempt %u)", l->attempt);
	if (run_final(l->state) || !l->start_ms)
		el[0] = '\0';
	else
		fmt_ms(now_ms - l->start_ms, el, sizeof el);
	frame_add(&f, text_line(l->utf8, max, "run %s %s%s%s%s%s%s", l->id,
				state_name(&kpl__v1__run_state__descriptor, l->state), att,
				*el ? "  " : "", el, l->message && *l->message ? ": " : "",
				l->message ? l->message : ""));
	*n = f.n;
	return f.lines;
}

void live_lines_free(char **lines)
{
	if (!lines)
		return;
	for (char **p = lines; *p; p++)
		free(*p);
	free(lines);
}
