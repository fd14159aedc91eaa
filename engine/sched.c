/*
 * sched.c - cron schedules of registered pipelines (see sched.h): a timer
 * on the loop looks at every schedule's stored state, claims due fires and
 * submits them through hooks_run_pipeline.
 *
 * A schedule's state moves: none -> next set (first look) -> due (the clock
 * passed next) -> claimed (pending_fire stored, next moved on) -> submitted
 * (pending cleared, last_fire and last_run_id stored). Each step is one
 * store commit; while a schedule's step is in flight it is "busy" and the
 * timer leaves it alone, so the scheduler never acts on state it has not
 * seen committed.
 */
#include "engine/sched.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/cron.h"
#include "engine/tzfile.h"
#include "google/protobuf/timestamp.pb-c.h"
#include "store/store.h"

#define LOG "sched"
#define CLOCK_POLL_MS 50
/* The longest sleep: registrations made meanwhile are seen this late. */
#define MAX_WAIT_MS 60000
/* A first look this soon after the registration takes its next fire from
 * the registration's time (a fire in between still happens). */
#define FIRST_LOOK_GRACE_S 120
/* Missed fire times counted one by one at most (then the count is "more"). */
#define MAX_MISSED_WALK 100000
#define IDEM_PREFIX "sched:"

/* A schedule whose next step is in flight. */
struct busy {
	struct busy *next;
	char *name;
	uint32_t index;
};

struct sched {
	uv_loop_t *loop;
	struct engine *eng;
	struct hooks *hooks;
	struct store *store;
	char *clock_file, *zoneinfo;
	int64_t clock_last;   /* the test clock's last value */
	int64_t clock_said;   /* the last value the log said was acted on */
	uv_timer_t timer;
	bool stopping, timer_closed;
	size_t inflight;      /* commits and submissions under way */
	struct busy *busy;
	void (*done)(void *data);
	void *done_data;
};

/* One step of one schedule under way: a first look or claim being
 * committed, a submission, or its record being committed. */
struct step {
	struct sched *s;
	char *name;
	uint32_t index;
	int64_t fire; /* the claimed fire time; 0 for a first look or skip */
};

static void arm(struct sched *s, int64_t earliest);
static void on_timer(uv_timer_t *t);
static void crash_point(struct sched *s, const char *where);

/* ---------------------------------------------------------------------- */
/* Small helpers */

static int64_t clock_now_ms(struct sched *s)
{
	char buf[64];
	ssize_t n;
	int fd;

	if (!s->clock_file)
		return kpl_now_ms();
	fd = open(s->clock_file, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, buf, sizeof buf - 1);
		close(fd);
		if (n > 0) {
			char *end;
			long long v;

			buf[n] = '\0';
			errno = 0;
			v = strtoll(buf, &end, 10);
			if (!errno && end != buf)
				s->clock_last = v;
		}
	}
	return s->clock_last ? s->clock_last : kpl_now_ms();
}

/* Replaces a string field of an unpacked message with v (taken). An empty
 * field may be protobuf-c's static default: only a non-empty one is freed. */
static void set_str(char **field, char *v)
{
	if (*field && **field)
		free(*field);
	*field = v;
}

static int64_t floor_div(int64_t a, int64_t b)
{
	return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

/* "2026-12-05T02:00:00+08:00": t in zone tz. */
static void fmt_time(const struct tz *tz, int64_t t, char *buf, size_t size)
{
	int32_t off = tz ? tz_offset_at(tz, t) : 0;
	int64_t wall = t + off, days = floor_div(wall, 86400), secs = wall - days * 86400, y;
	int32_t a = off < 0 ? -off : off;
	unsigned m, d;

	tz_civil_from_days(days, &y, &m, &d);
	snprintf(buf, size, "%04lld-%02u-%02uT%02d:%02d:%02d%c%02d:%02d", (long long)y, m, d,
		 (int)(secs / 3600), (int)(secs % 3600 / 60), (int)(secs % 60),
		 off < 0 ? '-' : '+', (int)(a / 3600), (int)(a % 3600 / 60));
}

/* What a schedule's state was computed for: a change starts afresh. */
static char *fingerprint(const Kpl__V1__RegisteredPipeline *r, const Kpl__V1__Schedule *sc)
{
	return kpl_asprintf("%s|%s|%lld.%d", sc->cron, sc->timezone,
			    r->created_at ? (long long)r->created_at->seconds : 0LL,
			    r->created_at ? r->created_at->nanos : 0);
}

static bool is_busy(struct sched *s, const char *name, uint32_t index)
{
	for (struct busy *b = s->busy; b; b = b->next)
		if (b->index == index && strcmp(b->name, name) == 0)
			return true;
	return false;
}

static struct step *step_begin(struct sched *s, const char *name, uint32_t index, int64_t fire)
{
	struct step *st = kpl_calloc(1, sizeof *st);
	struct busy *b = kpl_calloc(1, sizeof *b);

	st->s = s;
	st->name = kpl_strdup(name);
	st->index = index;
	st->fire = fire;
	b->name = kpl_strdup(name);
	b->index = index;
	b->next = s->busy;
	s->busy = b;
	s->inflight++;
	return st;
}

static void maybe_done(struct sched *s)
{
	if (s->stopping && s->timer_closed && !s->inflight && s->done) {
		void (*done)(void *) = s->done;

		s->done = NULL;
		done(s->done_data);
	}
}

static void step_end(struct step *st)
{
	struct sched *s = st->s;

	for (struct busy **p = &s->busy; *p; p = &(*p)->next) {
		if ((*p)->index == st->index && strcmp((*p)->name, st->name) == 0) {
			struct busy *b = *p;

			*p = b->next;
			free(b->name);
			free(b);
			break;
		}
	}
	s->inflight--;
	free(st->name);
	free(st);
	/* A look while it was busy skipped it: look again now that its state
	 * is stored (the clock file is polled anyway). */
	if (!s->stopping && !s->clock_file)
		uv_timer_start(&s->timer, on_timer, 0, 0);
	maybe_done(s);
}

/* The schedule's cron and zone; KPL_EINVAL with err if either is bad. */
static int schedule_parse(const Kpl__V1__Schedule *sc, const char *zoneinfo, struct cron *c,
			  struct tz **tz, struct kpl_err *err)
{
	int rc;

	*tz = NULL;
	if ((rc = cron_parse(sc->cron, c, err)) != 0)
		return rc;
	if (!*sc->timezone) {
		*tz = tz_utc();
		return 0;
	}
	return tz_load(zoneinfo, sc->timezone, tz, err);
}

/*
 * The latest fire time <= now, starting from next (<= now); *n counts the
 * fire times in (.., now] from next on (0 when more than were walked).
 */
static int64_t latest_fire(const struct cron *c, const struct tz *tz, int64_t next, int64_t now,
			   uint32_t deadline, uint64_t *n)
{
	int64_t t = next, u;
	uint64_t k = 1;

	/* Fires older than the deadline cannot run: skip past them. */
	if (deadline && now - (int64_t)deadline > t &&
	    cron_next(c, tz, now - (int64_t)deadline - 1, &u) == 0 && u <= now) {
		t = u;
		k = 0;
	}
	for (uint64_t i = 0; i < MAX_MISSED_WALK; i++) {
		if (cron_next(c, tz, t, &u) != 0 || u > now) {
			*n = k;
			return t;
		}
		t = u;
		if (k)
			k++;
	}
	/* Years of every-minute fires: look at the last day only. */
	if (cron_next(c, tz, now - 86400 - 1, &u) == 0 && u <= now) {
		t = u;
		while (cron_next(c, tz, t, &u) == 0 && u <= now)
			t = u;
	}
	*n = 0;
	return t;
}

/* ---------------------------------------------------------------------- */
/* Steps */

static void step_committed(void *data, int status)
{
	struct step *st = data;

	if (status)
		kpl_error(LOG, "schedule %s[%u]: cannot store its state: %s (tried again later)",
			  st->name, st->index, kpl_strerror(status));
	step_end(st);
}

/* The submission's answer: record it. */
static void fired(void *data, int code, const char *run_id, const char *msg)
{
	struct step *st = data;
	struct sched *s = st->s;
	Kpl__Store__V1__ScheduleState *state = NULL;
	char when[64], *note = NULL;
	int rc;

	fmt_time(NULL, st->fire, when, sizeof when);
	if (code == KPL_EUNAVAILABLE) {
		/* kpld is stopping: the claim stays, the next start submits it. */
		kpl_info(LOG, "schedule %s[%u]: the fire at %s is left for the next start",
			 st->name, st->index, when);
		step_end(st);
		return;
	}
	if (!code)
		crash_point(s, "submit");
	if (code) {
		note = kpl_asprintf("the fire at %s started no run: %s", when,
				    msg ? msg : kpl_strerror(code));
		kpl_warn(LOG, "schedule %s[%u]: %s", st->name, st->index, note);
	} else {
		kpl_info(LOG, "schedule %s[%u]: fired at %s: run %s", st->name, st->index, when,
			 run_id);
	}
	rc = store_get_schedule(s->store, st->name, st->index, &state);
	if (rc) {
		kpl_error(LOG, "schedule %s[%u]: cannot read its state: %s", st->name, st->index,
			  kpl_strerror(rc));
		free(note);
		step_end(st);
		return;
	}
	if (state->pending_fire == st->fire)
		state->pending_fire = 0;
	state->last_fire = st->fire;
	set_str(&state->last_run_id, kpl_strdup(code ? "" : run_id));
	set_str(&state->last_message, note ? note : kpl_strdup(""));
	store_stage_schedule(s->store, st->name, st->index, state);
	kpl__store__v1__schedule_state__free_unpacked(state, NULL);
	store_commit(s->store, step_committed, st);
}

/* Submits the claimed fire st->fire (the claim is durable). */
static void submit(struct step *st)
{
	struct sched *s = st->s;
	Kpl__V1__RegisteredPipeline *r = NULL;
	const Kpl__V1__Schedule *sc;
	const char *names[KPL_MAX_PARAMS], *values[KPL_MAX_PARAMS];
	struct hooks_run rq = { 0 };
	struct kpl_err err = { 0 };
	char idem[STORE_MAX_IDEM_KEY_LEN + 1];
	int rc;

	if (s->stopping || !s->hooks) {
		fired(st, KPL_EUNAVAILABLE, NULL, "kpld is stopping");
		return;
	}
	rc = store_get_registered(s->store, st->name, &r);
	if (rc || st->index >= r->n_schedules) {
		fired(st, rc ? rc : KPL_ENOTFOUND, NULL,
		      rc == KPL_ENOTFOUND || !rc ? "the pipeline or the schedule was removed"
						 : kpl_strerror(rc));
		if (r)
			kpl__v1__registered_pipeline__free_unpacked(r, NULL);
		return;
	}
	sc = r->schedules[st->index];
	for (size_t i = 0; i < sc->n_params && i < KPL_MAX_PARAMS; i++) {
		names[i] = sc->params[i]->key;
		values[i] = sc->params[i]->value;
	}
	snprintf(idem, sizeof idem, IDEM_PREFIX "%s:%u:%lld", st->name, st->index,
		 (long long)st->fire);
	rq.name = st->name;
	rq.ref = *sc->branch ? sc->branch : NULL;
	rq.param_names = names;
	rq.param_values = values;
	rq.n_params = sc->n_params < KPL_MAX_PARAMS ? sc->n_params : KPL_MAX_PARAMS;
	rq.idem_key = idem;
	rc = hooks_run_pipeline(s->hooks, &rq, fired, st, &err);
	kpl__v1__registered_pipeline__free_unpacked(r, NULL);
	if (rc)
		fired(st, rc, NULL, err.msg);
}

/* Tests only: KPL_TEST_SCHEDULE_CRASH=claim or =submit makes kpld die (as
 * kill -9 would) after a fire's claim is stored, or after its run is
 * stored but before the fire's record is, so the tests can show that the
 * restart starts no second run. Read under KPL_TEST_SCHEDULE_CLOCK only. */
static void crash_point(struct sched *s, const char *where)
{
	const char *v = s->clock_file ? getenv("KPL_TEST_SCHEDULE_CRASH") : NULL;

	if (v && strcmp(v, where) == 0) {
		kpl_warn(LOG, "KPL_TEST_SCHEDULE_CRASH=%s: exiting at once (tests only)", where);
		_exit(9);
	}
}

static void claim_committed(void *data, int status)
{
	struct step *st = data;

	if (status) {
		step_committed(st, status);
		return;
	}
	crash_point(st->s, "claim");
	submit(st);
}

/* One schedule: its first look, a due fire, or a claim to submit again. */
static void consider(struct sched *s, const Kpl__V1__RegisteredPipeline *r, uint32_t index,
		     int64_t now_ms, int64_t *earliest)
{
	const Kpl__V1__Schedule *sc = r->schedules[index];
	Kpl__Store__V1__ScheduleState *state = NULL, fresh = KPL__STORE__V1__SCHEDULE_STATE__INIT;
	int64_t now = floor_div(now_ms, 1000), next = 0;
	struct kpl_err err = { 0 };
	struct tz *tz = NULL;
	struct cron c;
	char *fp = NULL;
	int rc;

	if (is_busy(s, r->name, index))
		return;
	fp = fingerprint(r, sc);
	rc = store_get_schedule(s->store, r->name, index, &state);
	if (rc && rc != KPL_ENOTFOUND) {
		kpl_error(LOG, "schedule %s[%u]: cannot read its state: %s", r->name, index,
			  kpl_strerror(rc));
		goto out;
	}
	if (state && strcmp(state->fingerprint, fp) == 0) {
		if (state->pending_fire) {
			/* Claimed before a crash or a stop: submit again, under
			 * the same key. */
			submit(step_begin(s, r->name, index, state->pending_fire));
			goto out;
		}
		if (!state->next_fire)
			goto out;
		if (state->next_fire * 1000 > now_ms) {
			if (state->next_fire < *earliest)
				*earliest = state->next_fire;
			goto out;
		}
	}
	if (schedule_parse(sc, s->zoneinfo, &c, &tz, &err)) {
		/* Checked at registration; a zone file may have gone since. */
		kpl_error(LOG, "schedule %s[%u]: %s", r->name, index, err.msg);
		goto out;
	}
	if (!state || strcmp(state->fingerprint, fp) != 0) {
		/* First look. */
		int64_t base = now, created = r->created_at ? r->created_at->seconds : now;

		if (created <= now && now - created <= FIRST_LOOK_GRACE_S)
			base = created;
		if (cron_next(&c, tz, base, &next) != 0)
			next = 0;
		fresh.fingerprint = fp;
		fresh.next_fire = next;
		if (next && next < *earliest)
			*earliest = next;
		store_stage_schedule(s->store, r->name, index, &fresh);
		store_commit(s->store, step_committed, step_begin(s, r->name, index, 0));
		goto out;
	}
	{
		uint64_t missed;
		int64_t t = latest_fire(&c, tz, state->next_fire, now,
					sc->starting_deadline_seconds, &missed);
		char when[64];
		bool skip = sc->starting_deadline_seconds &&
			    now - t > (int64_t)sc->starting_deadline_seconds;

		if (cron_next(&c, tz, now, &next) != 0)
			next = 0;
		fmt_time(tz, t, when, sizeof when);
		if (missed != 1)
			kpl_warn(LOG, "schedule %s[%u]: %s fire times passed unseen (kpld was "
				 "down or late); only the latest (%s) is considered", r->name,
				 index, missed ? "several" : "many", when);
		state->next_fire = next;
		if (next && next < *earliest)
			*earliest = next;
		if (skip) {
			set_str(&state->last_message, kpl_asprintf(
				"missed the fire at %s: %lld s late, past its starting_deadline "
				"of %u s: skipped", when, (long long)(now - t),
				sc->starting_deadline_seconds));
			kpl_warn(LOG, "schedule %s[%u]: %s", r->name, index, state->last_message);
			state->last_fire = t;
			set_str(&state->last_run_id, kpl_strdup(""));
			store_stage_schedule(s->store, r->name, index, state);
			store_commit(s->store, step_committed, step_begin(s, r->name, index, 0));
		} else {
			state->pending_fire = t;
			store_stage_schedule(s->store, r->name, index, state);
			store_commit(s->store, claim_committed, step_begin(s, r->name, index, t));
		}
	}
out:
	if (state)
		kpl__store__v1__schedule_state__free_unpacked(state, NULL);
	tz_free(tz);
	free(fp);
}

/* ---------------------------------------------------------------------- */
/* The timer */

struct regs {
	Kpl__V1__RegisteredPipeline **v;
	size_t n, cap;
};

static int collect(void *data, const Kpl__V1__RegisteredPipeline *rec)
{
	struct regs *l = data;
	size_t len;
	uint8_t *buf;

	if (!rec->n_schedules)
		return 0;
	len = kpl__v1__registered_pipeline__get_packed_size(rec);
	buf = kpl_malloc(len ? len : 1);
	kpl__v1__registered_pipeline__pack(rec, buf);
	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 16;
		l->v = kpl_realloc(l->v, l->cap * sizeof *l->v);
	}
	l->v[l->n] = kpl__v1__registered_pipeline__unpack(NULL, len, buf);
	free(buf);
	if (l->v[l->n])
		l->n++;
	return 0;
}

static void on_timer(uv_timer_t *t)
{
	struct sched *s = t->data;
	int64_t now_ms = clock_now_ms(s), earliest = INT64_MAX;
	struct regs l = { 0 };
	size_t n_sched = 0;
	int rc;

	if (s->stopping)
		return;
	rc = store_list_registered(s->store, collect, &l);
	if (rc)
		kpl_error(LOG, "cannot read the registered pipelines: %s", kpl_strerror(rc));
	for (size_t i = 0; i < l.n; i++) {
		for (uint32_t k = 0; k < l.v[i]->n_schedules && k < SCHED_MAX; k++, n_sched++)
			consider(s, l.v[i], k, now_ms, &earliest);
		kpl__v1__registered_pipeline__free_unpacked(l.v[i], NULL);
	}
	free(l.v);
	/* Tests wait for this line to know a clock value was acted on: said
	 * once per value, at the first look that left nothing in flight (every
	 * fire due at that time claimed, submitted and recorded). */
	if (s->clock_file && now_ms != s->clock_said && !s->inflight) {
		s->clock_said = now_ms;
		kpl_info(LOG, "looked at %zu schedule%s at clock %lld", n_sched,
			 n_sched == 1 ? "" : "s", (long long)now_ms);
	}
	arm(s, earliest);
}

static void arm(struct sched *s, int64_t earliest)
{
	int64_t wait;

	if (s->stopping)
		return;
	if (s->clock_file) {
		wait = CLOCK_POLL_MS;
	} else if (earliest == INT64_MAX) {
		wait = MAX_WAIT_MS;
	} else {
		wait = earliest * 1000 - kpl_now_ms();
		wait = wait < 0 ? 0 : wait > MAX_WAIT_MS ? MAX_WAIT_MS : wait;
	}
	uv_timer_start(&s->timer, on_timer, (uint64_t)wait, 0);
}

int sched_start(const struct sched_options *opt, struct sched **out)
{
	struct sched *s = kpl_calloc(1, sizeof *s);

	s->loop = opt->loop;
	s->eng = opt->eng;
	s->hooks = opt->hooks;
	s->store = engine_store(opt->eng);
	s->clock_file = opt->clock_file ? kpl_strdup(opt->clock_file) : NULL;
	s->zoneinfo = opt->zoneinfo ? kpl_strdup(opt->zoneinfo) : NULL;
	if (s->clock_file)
		kpl_warn(LOG, "KPL_TEST_SCHEDULE_CLOCK: the schedules' clock is %s (tests only)",
			 s->clock_file);
	uv_timer_init(s->loop, &s->timer);
	s->timer.data = s;
	uv_timer_start(&s->timer, on_timer, 0, 0);
	*out = s;
	return 0;
}

void sched_kick(void *data)
{
	struct sched *s = data;

	if (!s->stopping && !s->clock_file)
		uv_timer_start(&s->timer, on_timer, 0, 0);
}

static void timer_closed(uv_handle_t *h)
{
	struct sched *s = h->data;

	s->timer_closed = true;
	maybe_done(s);
}

void sched_stop(struct sched *s, void (*done)(void *data), void *data)
{
	s->stopping = true;
	s->done = done;
	s->done_data = data;
	uv_timer_stop(&s->timer);
	uv_close((uv_handle_t *)&s->timer, timer_closed);
}

void sched_free(struct sched *s)
{
	if (!s)
		return;
	while (s->busy) {
		struct busy *b = s->busy;

		s->busy = b->next;
		free(b->name);
		free(b);
	}
	free(s->clock_file);
	free(s->zoneinfo);
	free(s);
}

/* ---------------------------------------------------------------------- */
/* Registration and listing */

static bool branch_ok(const char *b)
{
	size_t n = strlen(b);

	if (n == 0 || n > 255 || b[0] == '-' || strstr(b, "..") || strpbrk(b, "*?[\\^~:"))
		return false;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)b[i] <= 0x20 || b[i] == 0x7f)
			return false;
	return true;
}

int sched_check_registration(const Kpl__V1__RegisterPipelineRequest *req,
			     Kpl__V1__RegisteredPipeline *rec, Kpl__V1__Schedule *buf,
			     Kpl__V1__Schedule **ptrs, const char *zoneinfo,
			     struct kpl_err *err)
{
	bool plain = false;

	if (req->n_schedules > SCHED_MAX)
		return kpl_errf(err, KPL_EINVAL, "schedules: at most %d", SCHED_MAX);
	for (size_t i = 0; i < rec->n_branches; i++)
		plain |= rec->branches[i] && *rec->branches[i] &&
			 !strpbrk(rec->branches[i], "*?[");
	for (size_t i = 0; i < req->n_schedules; i++) {
		const Kpl__V1__Schedule *sc = req->schedules[i];
		struct kpl_err e = { 0 };
		struct tz *tz = NULL;
		struct cron c;
		int64_t next;

		if (!sc->cron || !*sc->cron)
			return kpl_errf(err, KPL_EINVAL, "schedules[%zu].cron: required (five "
					"fields: minute hour day-of-month month day-of-week)", i);
		if (cron_parse(sc->cron, &c, &e))
			return kpl_errf(err, KPL_EINVAL, "schedules[%zu].cron: %s", i, e.msg);
		if (sc->timezone && *sc->timezone) {
			if (tz_load(zoneinfo, sc->timezone, &tz, &e))
				return kpl_errf(err, KPL_EINVAL, "schedules[%zu].timezone: %s", i,
						e.msg);
		} else {
			tz = tz_utc();
		}
		if (cron_next(&c, tz, kpl_now_ms() / 1000, &next) != 0) {
			tz_free(tz);
			return kpl_errf(err, KPL_EINVAL, "schedules[%zu].cron: \"%s\" never fires "
					"(no matching day within %d years)", i, sc->cron,
					CRON_MAX_YEARS);
		}
		tz_free(tz);
		if (sc->branch && *sc->branch) {
			if (!branch_ok(sc->branch))
				return kpl_errf(err, KPL_EINVAL, "schedules[%zu].branch: want a "
						"branch name (no globs), like main", i);
		} else if (!plain) {
			return kpl_errf(err, KPL_EINVAL, "schedules[%zu].branch: required (the "
					"registration watches only branch patterns)", i);
		}
		if (sc->n_params > KPL_MAX_PARAMS)
			return kpl_errf(err, KPL_EINVAL, "schedules[%zu].params: at most %d", i,
					KPL_MAX_PARAMS);
		for (size_t k = 0; k < sc->n_params; k++) {
			const char *key = sc->params[k]->key, *v = sc->params[k]->value;

			if (!key || !*key || strlen(key) > KPL_MAX_NAME_LEN)
				return kpl_errf(err, KPL_EINVAL, "schedules[%zu].params: a name of "
						"1 to %d characters", i, KPL_MAX_NAME_LEN);
			if (v && strlen(v) > KPL_MAX_VALUE_LEN)
				return kpl_errf(err, KPL_EINVAL, "schedules[%zu].params.%s: longer "
						"than %d bytes", i, key, KPL_MAX_VALUE_LEN);
		}
		buf[i] = *sc;
		buf[i].next_fire = NULL;
		buf[i].last_fire = NULL;
		buf[i].last_run_id = (char *)"";
		buf[i].last_message = (char *)"";
		ptrs[i] = &buf[i];
	}
	rec->schedules = req->n_schedules ? ptrs : NULL;
	rec->n_schedules = req->n_schedules;
	return 0;
}

static Google__Protobuf__Timestamp *ts_new(int64_t t)
{
	Google__Protobuf__Timestamp *ts = kpl_malloc(sizeof *ts);

	google__protobuf__timestamp__init(ts);
	ts->seconds = t;
	return ts;
}

void sched_annotate(struct store *st, Kpl__V1__RegisteredPipeline *rec, const char *zoneinfo)
{
	for (size_t i = 0; i < rec->n_schedules && i < SCHED_MAX; i++) {
		Kpl__V1__Schedule *sc = rec->schedules[i];
		Kpl__Store__V1__ScheduleState *state = NULL;
		char *fp = fingerprint(rec, sc);

		if (store_get_schedule(st, rec->name, (uint32_t)i, &state) == 0 &&
		    strcmp(state->fingerprint, fp) == 0) {
			if (state->next_fire)
				sc->next_fire = ts_new(state->next_fire);
			if (state->last_fire)
				sc->last_fire = ts_new(state->last_fire);
			set_str(&sc->last_run_id, kpl_strdup(state->last_run_id));
			set_str(&sc->last_message, kpl_strdup(state->last_message));
		} else {
			/* Not looked at yet: what the first look will find. */
			struct kpl_err err = { 0 };
			struct tz *tz;
			struct cron c;
			int64_t next;

			if (schedule_parse(sc, zoneinfo, &c, &tz, &err) == 0 &&
			    cron_next(&c, tz, kpl_now_ms() / 1000, &next) == 0)
				sc->next_fire = ts_new(next);
			tz_free(tz);
		}
		if (state)
			kpl__store__v1__schedule_state__free_unpacked(state, NULL);
		free(fp);
	}
}
