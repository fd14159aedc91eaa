/*
 * store.c - kpl's durable state in one LMDB environment: staging, group
 * commit on libuv's thread pool, and short read transactions.
 *
 * Staged writes are serialized at once into the "open group". store_commit
 * hands the open group to the thread pool unless a commit is in flight; in
 * that case it waits, gathering every later write and callback, and starts
 * when the commit in flight has run its callbacks. So there is at most one
 * write transaction at a time (LMDB allows no more) and each fsync covers as
 * many state changes as arrived while the previous one ran.
 */
#include "store/store.h"

#include <errno.h>
#include <lmdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#define SUB "store"

/* Address space only: LMDB maps this much but the file grows as used. */
#define STORE_DEFAULT_MAP_SIZE ((size_t)8 << 30)
/* Kept back from ordinary writes (store_has_room) so that failing a run,
 * other state changes and deletes still fit in a store that is full. */
#define STORE_MIN_RESERVE ((size_t)512 << 10)
#define STORE_MAX_RESERVE ((size_t)64 << 20)

enum store_db {
	DB_META,
	DB_RUNS,
	DB_STAGES,
	DB_EVENTS,
	DB_PIPELINES,
	DB_IDEM,
	DB_ACTIVE,
	DB_GEVENTS,
	DB_SECRETS,
	DB_RELEASES,
	DB_TOKENS,
	DB_NOTIFY,
	DB_AUDIT,
	DB_PIPELINES_REGISTERED,
	DB_FORGE_STATUS,
	DB_SCHEDULES,
	DB__LAST
};

static const char *const db_names[DB__LAST] = {
	[DB_META] = "meta",
	[DB_RUNS] = "runs",
	[DB_STAGES] = "stages",
	[DB_EVENTS] = "events",
	[DB_PIPELINES] = "pipelines",
	[DB_IDEM] = "idem",
	[DB_ACTIVE] = "active",
	[DB_GEVENTS] = "gevents",
	[DB_SECRETS] = "secrets",
	[DB_RELEASES] = "releases",
	[DB_TOKENS] = "tokens",
	[DB_NOTIFY] = "notify",
	[DB_AUDIT] = "audit",
	[DB_PIPELINES_REGISTERED] = "pipelines_registered",
	[DB_FORGE_STATUS] = "forge_status",
	[DB_SCHEDULES] = "schedules",
};

/* Room for future databases without a change of maxdbs (which would need
 * every process opening the env to agree). */
#define STORE_MAX_DBS 16

#define META_SCHEMA_KEY "schema_version"

/* run id, 0x00, be64: the longest key built from a run id. */
#define RUN_KEY_MAX (STORE_MAX_RUN_ID_LEN + 1 + 8)

enum store_op_kind {
	OP_PUT,
	OP_DEL,
	/* Deletes every record of the run whose id is the key (db is
	 * DB_RUNS): see run_delete. */
	OP_DEL_RUN,
};

/* One staged write. key and val share one allocation (key first). */
struct store_op {
	enum store_db db;
	enum store_op_kind kind;
	unsigned char *key;
	size_t klen;
	unsigned char *val;
	size_t vlen;
};

struct store_cb {
	store_commit_cb cb;
	void *data;
	/* The group in flight when store_commit was called (0: none). The
	 * caller's writes may be in it: if it fails, so does this callback. */
	uint64_t after;
};

/*
 * A group of writes that share one write transaction, and the callbacks
 * waiting for it. Loop thread only, except that while the group is in flight
 * the pool thread owns it (group_work) until after_work runs on the loop.
 */
struct store_group {
	uv_work_t work; /* work.data = this group */
	struct store *s;
	struct store_op *ops;
	size_t nops, ops_cap;
	/* ops[0 .. covered) were staged before the last store_commit call. */
	size_t covered;
	struct store_cb *cbs;
	size_t ncbs, cbs_cap;
	/* store_commit was called for this group (cbs may be empty: NULL cb). */
	int want_commit;
	/* Written by the pool thread, read by the loop after the work. */
	int mdb_rc;
	uint64_t id;      /* 1, 2, 3, ... in the order groups are made */
	int done;         /* its transaction has ended: its callbacks run */
	size_t bytes;     /* space_cost of its ops (loop thread) */
	size_t used;      /* space_used after its commit; 0 if not known */
	const char *failed_step; /* static string: "mdb_put", ... */
	size_t failed_op;
	enum store_db failed_db; /* the db failed_step was working on */
};

struct store {
	uv_loop_t *loop;
	/* env, dbi and dir are set in store_open and never change after, so
	 * the pool thread may read them while a group is in flight. */
	MDB_env *env;
	MDB_dbi dbi[DB__LAST];
	char *dir;
	size_t map_size;
	/* Space (store_space): bytes of pages in use as of the last commit,
	 * an estimate of what is staged or in flight on top, and what only
	 * writes past store_has_room's check may use. */
	size_t used, staged, reserve;
	int full; /* store_has_room said no, and not enough was freed since */
	uint64_t events_decoded; /* by reads, any thread (atomic) */
	uint64_t next_group_id;
	/* The last group whose transaction failed, and how (see store_cb). */
	uint64_t failed_id;
	int failed_code;
	uint32_t schema_version;
	struct store_group *open; /* never NULL while the store is open */
	struct store_group *inflight; /* NULL when no commit is in flight */
	uint64_t audit_next; /* seq of the next audit entry; 0: not read yet */
};

/* --- Keys --- */

static void put_be32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be64(unsigned char *p, uint64_t v)
{
	put_be32(p, (uint32_t)(v >> 32));
	put_be32(p + 4, (uint32_t)v);
}

static uint64_t get_be64(const unsigned char *p)
{
	return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

/* 1 if id is a valid run id (see store.h), with its length in *len. */
static int run_id_ok(const char *id, size_t *len)
{
	size_t n;

	if (!id)
		return 0;
	for (n = 0; id[n]; n++) {
		if (n >= STORE_MAX_RUN_ID_LEN)
			return 0;
		if ((unsigned char)id[n] < 0x21 || (unsigned char)id[n] > 0x7e)
			return 0;
	}
	*len = n;
	return n > 0;
}

static int idem_key_ok(const char *key, size_t *len)
{
	size_t n;

	if (!key)
		return 0;
	n = strnlen(key, STORE_MAX_IDEM_KEY_LEN + 1);
	*len = n;
	return n > 0 && n <= STORE_MAX_IDEM_KEY_LEN;
}

/*
 * The idem db key of key under pipeline: key, 0x00, pipeline (docs/security.md:
 * idempotency keys are per pipeline). Keys hold no NUL, so these never equal
 * an entry from before keys had a pipeline (key alone), and every pipeline's
 * entry of one key sorts together. Returns the length, 0 if either part is
 * empty or too long. buf is IDEM_SCOPED_MAX bytes.
 */
#define IDEM_SCOPED_MAX (STORE_MAX_IDEM_KEY_LEN + 1 + KPL_MAX_NAME_LEN)
static size_t idem_scoped_key(const char *pipeline, const char *key, char *buf)
{
	size_t klen, plen = pipeline ? strnlen(pipeline, KPL_MAX_NAME_LEN + 1) : 0;

	if (!idem_key_ok(key, &klen) || plen == 0 || plen > KPL_MAX_NAME_LEN)
		return 0;
	memcpy(buf, key, klen);
	buf[klen] = '\0';
	memcpy(buf + klen + 1, pipeline, plen);
	return klen + 1 + plen;
}

/* Staging gets run ids from the engine, never from outside: a bad one is a
 * bug in kpl, not bad input. */
static size_t need_run_id(const char *id, const char *what)
{
	size_t len;

	if (!run_id_ok(id, &len))
		BUG("store_stage_%s: invalid run id \"%.80s\"", what, id ? id : "(null)");
	return len;
}

/* run id + 0x00 + be32/be64 n, into buf (RUN_KEY_MAX bytes). Run ids have
 * no 0x00, so the separator keeps run "a" from matching run "ab". */
static size_t run_key(unsigned char *buf, const char *id, size_t idlen, uint64_t n,
		      int width)
{
	memcpy(buf, id, idlen);
	buf[idlen] = 0;
	if (width == 4)
		put_be32(buf + idlen + 1, (uint32_t)n);
	else
		put_be64(buf + idlen + 1, n);
	return idlen + 1 + (size_t)width;
}

/* --- Errors --- */

static int lmdb_code(int rc)
{
	switch (rc) {
	case 0:
		return 0;
	case ENOMEM:
		return KPL_ENOMEM;
	case EIO:
	case ENOSPC:
		return KPL_EIO;
	case MDB_MAP_FULL:
		return KPL_EFULL;
	default:
		return KPL_ESTORE;
	}
}

/* What went wrong, for a log line; buf is used for MDB_MAP_FULL. */
static const char *lmdb_reason(struct store *s, int rc, char *buf, size_t size)
{
	if (rc != MDB_MAP_FULL)
		return mdb_strerror(rc);
	snprintf(buf, size,
		 "the LMDB map is full (map_size %zu bytes); delete runs or restart kpld "
		 "with a larger --map-size",
		 s->map_size);
	return buf;
}

/* Logs a failed LMDB call and returns the KPL_E* code for it. */
static int lmdb_fail(struct store *s, const char *step, int rc)
{
	char buf[256];

	kpl_error(SUB, "%s: %s: %s", s->dir, step, lmdb_reason(s, rc, buf, sizeof buf));
	return lmdb_code(rc);
}

/* --- Groups --- */

static struct store_group *group_new(struct store *s)
{
	struct store_group *g = kpl_calloc(1, sizeof *g);

	g->s = s;
	g->id = ++s->next_group_id;
	g->work.data = g;
	return g;
}

static void group_drop_ops(struct store_group *g)
{
	for (size_t i = 0; i < g->nops; i++)
		free(g->ops[i].key);
	g->nops = 0;
	g->covered = 0;
}

static void group_free(struct store_group *g)
{
	if (!g)
		return;
	group_drop_ops(g);
	free(g->ops);
	free(g->cbs);
	free(g);
}

/*
 * What a record of klen + vlen bytes adds before its group commits: its
 * bytes and LMDB's node header and slot. Pages hold some slack on top
 * (store_space's used counts real pages once the group has committed);
 * that slack, for the writes of one commit in flight, is what the reserve
 * is also for.
 */
static size_t space_cost(size_t klen, size_t vlen)
{
	return klen + vlen + 16;
}

static size_t space_used(struct store *s);
static void space_open(struct store *s);

/* Appends an op to the open group with room for vlen bytes of value, which
 * the caller fills in through op->val. */
static struct store_op *stage_op(struct store *s, enum store_db db, const void *key,
				 size_t klen, size_t vlen, enum store_op_kind kind)
{
	struct store_group *g = s->open;
	struct store_op *op;

	if (g->nops == g->ops_cap) {
		g->ops_cap = g->ops_cap ? 2 * g->ops_cap : 16;
		g->ops = kpl_realloc(g->ops, g->ops_cap * sizeof *g->ops);
	}
	op = &g->ops[g->nops++];
	g->bytes += space_cost(klen, vlen);
	s->staged += space_cost(klen, vlen);
	op->db = db;
	op->kind = kind;
	op->key = kpl_malloc(klen + vlen);
	memcpy(op->key, key, klen);
	op->klen = klen;
	op->val = op->key + klen;
	op->vlen = vlen;
	return op;
}

/* Records where a write transaction failed, for group_fail. */
static int group_step_failed(struct store_group *g, const char *step, enum store_db db,
			     int rc)
{
	g->failed_step = step;
	g->failed_db = db;
	return rc;
}

/*
 * Deletes the global index entry of the event at (k, v) if the entry still
 * names this event (its value is the event's key). An event that does not
 * decode has no global_seq to find: its index entry, if any, stays, and
 * store_read_global skips it once the event is gone.
 */
static int delete_gevent(struct store *s, struct store_group *g, MDB_txn *txn,
			 const MDB_val *k, const MDB_val *v)
{
	Kpl__V1__RunEvent *ev = kpl__v1__run_event__unpack(NULL, v->mv_size, v->mv_data);
	unsigned char gkey[8];
	MDB_val gk = { .mv_size = sizeof gkey, .mv_data = gkey }, gv;
	uint64_t gseq;
	int rc;

	if (!ev) {
		kpl_warn(SUB, "%s: deleting a run: an event (%zu bytes) does not decode; its "
			      "global index entry, if any, stays",
			 s->dir, v->mv_size);
		return 0;
	}
	gseq = ev->global_seq;
	kpl__v1__run_event__free_unpacked(ev, NULL);
	if (gseq == 0)
		return 0;
	put_be64(gkey, gseq);
	rc = mdb_get(txn, s->dbi[DB_GEVENTS], &gk, &gv);
	if (rc == 0 && gv.mv_size == k->mv_size && memcmp(gv.mv_data, k->mv_data, k->mv_size) == 0)
		rc = mdb_del(txn, s->dbi[DB_GEVENTS], &gk, NULL);
	if (rc == MDB_NOTFOUND)
		rc = 0;
	if (rc)
		group_step_failed(g, "gevents (delete run)", DB_GEVENTS, rc);
	return rc;
}

/*
 * Deletes every key of db that starts with prefix (run id + 0x00), inside
 * txn. The cursor seeks the prefix again after each delete rather than
 * stepping on from a deleted entry: plain, and each seek starts from the
 * cursor's current page. For events (gdbi set), each event's global index
 * entry goes too, if it still points at that event.
 */
static int delete_prefix(struct store *s, struct store_group *g, MDB_txn *txn,
			 enum store_db db, const unsigned char *prefix, size_t plen)
{
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	int rc;

	rc = mdb_cursor_open(txn, s->dbi[db], &cur);
	if (rc)
		return group_step_failed(g, "mdb_cursor_open (delete run)", db, rc);
	for (;;) {
		k.mv_size = plen;
		k.mv_data = (void *)prefix;
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (rc == MDB_NOTFOUND || (rc == 0 && !(k.mv_size >= plen &&
							memcmp(k.mv_data, prefix, plen) == 0))) {
			rc = 0;
			break;
		}
		if (rc) {
			group_step_failed(g, "mdb_cursor_get (delete run)", db, rc);
			break;
		}
		if (db == DB_EVENTS) {
			rc = delete_gevent(s, g, txn, &k, &v);
			if (rc)
				break;
		}
		rc = mdb_cursor_del(cur, 0);
		if (rc) {
			group_step_failed(g, "mdb_cursor_del (delete run)", db, rc);
			break;
		}
	}
	mdb_cursor_close(cur);
	return rc;
}

/* Deletes the idem entry key (klen bytes) if it maps to run id (idlen
 * bytes): a later run may have taken the key over. */
static int idem_delete_if(struct store *s, struct store_group *g, MDB_txn *txn,
			  const void *key, size_t klen, const char *id, size_t idlen)
{
	MDB_val ik = { .mv_size = klen, .mv_data = (void *)key }, iv;
	int rc = mdb_get(txn, s->dbi[DB_IDEM], &ik, &iv);

	if (rc == 0 && iv.mv_size == idlen && memcmp(iv.mv_data, id, idlen) == 0)
		rc = mdb_del(txn, s->dbi[DB_IDEM], &ik, NULL);
	if (rc == MDB_NOTFOUND)
		rc = 0;
	if (rc)
		group_step_failed(g, "idem (delete run)", DB_IDEM, rc);
	return rc;
}

/*
 * OP_DEL_RUN: every record of run id (idlen bytes) inside txn. Missing
 * records are fine. The idem entry goes only if it maps to this run, since
 * a later run may have taken the key over.
 */
static int run_delete(struct store *s, struct store_group *g, MDB_txn *txn, const char *id,
		      size_t idlen)
{
	static const enum store_db by_id[] = { DB_PIPELINES, DB_ACTIVE };
	unsigned char prefix[RUN_KEY_MAX];
	MDB_val k = { .mv_size = idlen, .mv_data = (void *)id };
	MDB_val v;
	int rc;

	rc = mdb_get(txn, s->dbi[DB_RUNS], &k, &v);
	if (rc == 0) {
		Kpl__Store__V1__RunRecord *rec =
			kpl__store__v1__run_record__unpack(NULL, v.mv_size, v.mv_data);
		const char *ikey = rec && rec->run ? rec->run->idempotency_key : NULL;

		if (!rec)
			kpl_warn(SUB, "%s: deleting run %.*s: its record does not decode, so its "
				      "idempotency key (if any) stays",
				 s->dir, (int)idlen, id);
		rc = 0;
		if (ikey && *ikey && strlen(ikey) <= STORE_MAX_IDEM_KEY_LEN) {
			char sk[IDEM_SCOPED_MAX];
			size_t sklen = idem_scoped_key(rec->run->pipeline_name, ikey, sk);

			rc = idem_delete_if(s, g, txn, ikey, strlen(ikey), id, idlen);
			if (!rc && sklen)
				rc = idem_delete_if(s, g, txn, sk, sklen, id, idlen);
		}
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
		if (rc)
			return rc;
		rc = mdb_del(txn, s->dbi[DB_RUNS], &k, NULL);
	}
	if (rc && rc != MDB_NOTFOUND)
		return group_step_failed(g, "runs (delete run)", DB_RUNS, rc);

	memcpy(prefix, id, idlen);
	prefix[idlen] = 0;
	rc = delete_prefix(s, g, txn, DB_STAGES, prefix, idlen + 1);
	if (!rc)
		rc = delete_prefix(s, g, txn, DB_EVENTS, prefix, idlen + 1);
	if (rc)
		return rc;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(by_id); i++) {
		rc = mdb_del(txn, s->dbi[by_id[i]], &k, NULL);
		if (rc && rc != MDB_NOTFOUND)
			return group_step_failed(g, "mdb_del (delete run)", by_id[i], rc);
	}
	return 0;
}

/*
 * Writes g's ops in one transaction and commits it. Runs on a pool thread
 * (or the caller's, for store_commit_sync): touches only g and the env.
 * Returns 0 or an LMDB/errno code, with the failed step recorded in g.
 */
static int group_write(struct store *s, struct store_group *g)
{
	MDB_txn *txn = NULL;
	int rc;

	g->failed_step = NULL;
	g->failed_op = 0;
	if (g->nops == 0)
		return 0;
	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc) {
		g->failed_step = "mdb_txn_begin";
		goto fail;
	}
	for (size_t i = 0; i < g->nops; i++) {
		struct store_op *op = &g->ops[i];
		MDB_val k = { .mv_size = op->klen, .mv_data = op->key };
		MDB_val v = { .mv_size = op->vlen, .mv_data = op->val };

		g->failed_op = i;
		switch (op->kind) {
		case OP_PUT:
			rc = mdb_put(txn, s->dbi[op->db], &k, &v, 0);
			if (rc)
				group_step_failed(g, "mdb_put", op->db, rc);
			break;
		case OP_DEL:
			rc = mdb_del(txn, s->dbi[op->db], &k, NULL);
			/* Deleting what is not there is what the caller wants. */
			if (rc == MDB_NOTFOUND)
				rc = 0;
			if (rc)
				group_step_failed(g, "mdb_del", op->db, rc);
			break;
		case OP_DEL_RUN:
			rc = run_delete(s, g, txn, (const char *)op->key, op->klen);
			break;
		default:
			BUG("store: op %zu has kind %d", i, (int)op->kind);
		}
		if (rc)
			goto fail;
	}
	/* mdb_txn_commit frees the txn whether or not it succeeds. */
	rc = mdb_txn_commit(txn);
	txn = NULL;
	if (rc) {
		g->failed_step = "mdb_txn_commit";
		goto fail;
	}
	return 0;
fail:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

/* Logs why g's transaction failed and returns the KPL_E* code. */
static int group_fail(struct store *s, struct store_group *g, int rc)
{
	char where[96] = "", buf[256];

	if (g->failed_step && strcmp(g->failed_step, "mdb_txn_begin") != 0 &&
	    strcmp(g->failed_step, "mdb_txn_commit") != 0)
		snprintf(where, sizeof where, " at write %zu (db %s)", g->failed_op + 1,
			 db_names[g->failed_db]);
	kpl_error(SUB, "%s: a commit of %zu staged writes failed in %s%s, so none was written: %s",
		  s->dir, g->nops, g->failed_step ? g->failed_step : "commit", where,
		  lmdb_reason(s, rc, buf, sizeof buf));
	return lmdb_code(rc);
}

static void group_work(uv_work_t *w)
{
	struct store_group *g = w->data;

	g->mdb_rc = group_write(g->s, g);
	/* Here, off the loop: it walks LMDB's free list. */
	g->used = space_used(g->s);
}

static void group_start(struct store *s);

static void group_done(uv_work_t *w, int status)
{
	struct store_group *g = w->data;
	struct store *s = g->s;
	int code = 0;

	if (s->inflight != g)
		BUG("store: a commit completed that is not the one in flight");
	if (status == UV_ECANCELED) {
		/* Nothing cancels store work; if something did, the txn never ran. */
		kpl_error(SUB, "%s: a commit of %zu writes was cancelled", s->dir, g->nops);
		code = KPL_ECANCELLED;
	} else if (g->mdb_rc) {
		code = group_fail(s, g, g->mdb_rc);
	}
	/* inflight stays set while the callbacks run, so whatever they stage
	 * and commit gathers in the open group, which starts after them: that
	 * keeps callbacks in store_commit order. */
	s->staged -= g->bytes < s->staged ? g->bytes : s->staged;
	if (g->used)
		s->used = g->used;
	g->done = 1;
	if (code) {
		s->failed_id = g->id;
		s->failed_code = code;
	}
	for (size_t i = 0; i < g->ncbs; i++) {
		const struct store_cb *c = &g->cbs[i];

		c->cb(c->data, code ? code : c->after && c->after == s->failed_id ?
						    s->failed_code : 0);
	}
	s->inflight = NULL;
	group_free(g);
	if (s->open->want_commit)
		group_start(s);
}

/* Hands the open group to the thread pool and opens a new one. */
static void group_start(struct store *s)
{
	struct store_group *g = s->open;
	int rc;

	if (s->inflight)
		BUG("store: group_start with a commit in flight");
	s->open = group_new(s);
	s->inflight = g;
	rc = uv_queue_work(s->loop, &g->work, group_work, group_done);
	if (rc)
		BUG("store: uv_queue_work: %s", uv_strerror(rc));
}

/* --- Open and close --- */

/* mkdir -p dir with mode 0700 for what it creates. */
static int mkdir_p(const char *dir, struct kpl_err *err)
{
	char *p = kpl_strdup(dir);
	struct stat st;
	int code = 0;

	for (char *c = p + 1; ; c++) {
		if (*c != '/' && *c != '\0')
			continue;
		char saved = *c;
		*c = '\0';
		/* An existing component is fine (some systems say EACCES for
		 * one we may not write to, hence the stat). */
		if (mkdir(p, 0700) != 0) {
			int e = errno;

			if (e != EEXIST && (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))) {
				code = kpl_errf(err, KPL_EIO,
						"store directory %s: cannot create %s: %s", dir, p,
						strerror(e));
				goto out;
			}
		}
		*c = saved;
		if (saved == '\0')
			break;
	}
	errno = 0;
	if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
		code = kpl_errf(err, KPL_EIO, "store directory %s: %s", dir,
				errno ? strerror(errno) : "not a directory");
out:
	free(p);
	return code;
}

/* Reads or records the schema version inside the open write txn. */
static int schema_check(struct store *s, MDB_txn *txn, struct kpl_err *err)
{
	MDB_val k = { .mv_size = strlen(META_SCHEMA_KEY), .mv_data = META_SCHEMA_KEY };
	MDB_val v;
	unsigned char buf[4];
	uint32_t ver;
	int rc;

	rc = mdb_get(txn, s->dbi[DB_META], &k, &v);
	if (rc == MDB_NOTFOUND) {
		put_be32(buf, STORE_SCHEMA_VERSION);
		v.mv_size = sizeof buf;
		v.mv_data = buf;
		rc = mdb_put(txn, s->dbi[DB_META], &k, &v, 0);
		if (rc)
			return kpl_errf(err, lmdb_code(rc),
					"store %s: cannot record the schema version: %s", s->dir,
					mdb_strerror(rc));
		s->schema_version = STORE_SCHEMA_VERSION;
		kpl_info(SUB, "%s: new store, schema version %u", s->dir,
			 STORE_SCHEMA_VERSION);
		return 0;
	}
	if (rc)
		return kpl_errf(err, lmdb_code(rc), "store %s: cannot read the schema version: %s",
				s->dir, mdb_strerror(rc));
	if (v.mv_size != 4)
		return kpl_errf(err, KPL_ECORRUPT,
				"store %s: meta/" META_SCHEMA_KEY " is %zu bytes, not 4", s->dir,
				v.mv_size);
	ver = get_be32(v.mv_data);
	if (ver > STORE_SCHEMA_VERSION)
		return kpl_errf(err, KPL_ESCHEMA,
				"store %s has schema version %u, newer than version %u that this "
				"kpld reads; run a kpld at least as new as the one that wrote it",
				s->dir, ver, STORE_SCHEMA_VERSION);
	/* NEEDSWORK: migrations go here once there is a version 2. Version 1
	 * is the first, so anything below it was not written by kpl. */
	if (ver < 1)
		return kpl_errf(err, KPL_ECORRUPT, "store %s: schema version %u is not valid",
				s->dir, ver);
	s->schema_version = ver;
	return 0;
}

int store_open(uv_loop_t *loop, const char *dir, const struct store_options *opt,
	       struct store **out, struct kpl_err *err)
{
	struct store *s = NULL;
	MDB_txn *txn = NULL;
	unsigned flags = MDB_NOTLS;
	int rc, code;

	*out = NULL;
	kpl_err_clear(err);
	if (!dir || !*dir)
		return kpl_errf(err, KPL_EINVAL, "store directory is not set");
	code = mkdir_p(dir, err);
	if (code)
		return code;

	s = kpl_calloc(1, sizeof *s);
	s->loop = loop;
	s->dir = kpl_strdup(dir);
	s->map_size = opt && opt->map_size ? opt->map_size : STORE_DEFAULT_MAP_SIZE;
	if (opt && opt->no_sync)
		flags |= MDB_NOSYNC;

	rc = mdb_env_create(&s->env);
	if (rc) {
		s->env = NULL;
		code = kpl_errf(err, lmdb_code(rc), "store %s: mdb_env_create: %s", dir,
				mdb_strerror(rc));
		goto fail;
	}
	rc = mdb_env_set_maxdbs(s->env, STORE_MAX_DBS);
	if (!rc)
		rc = mdb_env_set_mapsize(s->env, s->map_size);
	if (rc) {
		code = kpl_errf(err, lmdb_code(rc), "store %s: cannot set up the environment: %s",
				dir, mdb_strerror(rc));
		goto fail;
	}
	rc = mdb_env_open(s->env, dir, flags, 0600);
	if (rc) {
		code = kpl_errf(err, lmdb_code(rc), "store %s: cannot open the LMDB environment: %s",
				dir, mdb_strerror(rc));
		goto fail;
	}

	/* A kpld that crashed with read txns open left their reader slots
	 * taken; free them now rather than running out later. */
	int dead = 0;
	if (mdb_reader_check(s->env, &dead) == 0 && dead > 0)
		kpl_info(SUB, "%s: cleared %d reader slots left by a process that died", dir, dead);

	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc) {
		code = kpl_errf(err, lmdb_code(rc), "store %s: mdb_txn_begin: %s", dir,
				mdb_strerror(rc));
		goto fail;
	}
	/* meta first: a newer store is refused before anything is created in
	 * it (the txn is aborted then, so nothing is written at all). */
	for (int db = 0; db < DB__LAST; db++) {
		rc = mdb_dbi_open(txn, db_names[db], MDB_CREATE, &s->dbi[db]);
		if (rc) {
			code = kpl_errf(err, lmdb_code(rc), "store %s: cannot open database %s: %s",
					dir, db_names[db], mdb_strerror(rc));
			goto fail;
		}
		if (db == DB_META) {
			code = schema_check(s, txn, err);
			if (code)
				goto fail;
		}
	}
	rc = mdb_txn_commit(txn);
	txn = NULL;
	if (rc) {
		code = kpl_errf(err, lmdb_code(rc), "store %s: cannot commit the set-up: %s", dir,
				mdb_strerror(rc));
		goto fail;
	}

	space_open(s);
	s->open = group_new(s);
	*out = s;
	return 0;
fail:
	if (txn)
		mdb_txn_abort(txn);
	if (s->env)
		mdb_env_close(s->env);
	free(s->dir);
	free(s);
	return code;
}

void store_close(struct store *s)
{
	int code;

	if (!s)
		return;
	if (s->inflight || s->open->want_commit)
		BUG("store_close with a commit in flight: run the loop until "
		    "store_pending_commits() is 0 first");
	if (s->open->nops) {
		code = store_commit_sync(s);
		if (code)
			kpl_error(SUB, "%s: closing: the last staged writes were lost: %s", s->dir,
				  kpl_strerror(code));
	}
	group_free(s->open);
	mdb_env_close(s->env);
	free(s->dir);
	free(s);
}

uint32_t store_schema_version(struct store *s)
{
	return s->schema_version;
}

/* --- Staging --- */

void store_stage_run(struct store *s, const Kpl__Store__V1__RunRecord *rec)
{
	size_t len;
	struct store_op *op;

	if (!rec->run)
		BUG("store_stage_run: record without a run");
	len = need_run_id(rec->run->id, "run");
	op = stage_op(s, DB_RUNS, rec->run->id, len,
		      kpl__store__v1__run_record__get_packed_size(rec), OP_PUT);
	kpl__store__v1__run_record__pack(rec, op->val);
}

void store_stage_stage(struct store *s, const char *run_id,
		       const Kpl__Store__V1__StageRecord *rec)
{
	unsigned char key[RUN_KEY_MAX];
	size_t klen = run_key(key, run_id, need_run_id(run_id, "stage"), rec->index, 4);
	struct store_op *op = stage_op(s, DB_STAGES, key, klen,
				       kpl__store__v1__stage_record__get_packed_size(rec), OP_PUT);

	kpl__store__v1__stage_record__pack(rec, op->val);
}

void store_stage_event(struct store *s, const Kpl__V1__RunEvent *ev)
{
	unsigned char key[RUN_KEY_MAX];
	size_t klen = run_key(key, ev->run_id, need_run_id(ev->run_id, "event"), ev->seq, 8);
	struct store_op *op = stage_op(s, DB_EVENTS, key, klen,
				       kpl__v1__run_event__get_packed_size(ev), OP_PUT);

	kpl__v1__run_event__pack(ev, op->val);
	if (ev->global_seq > 0) {
		unsigned char gkey[8];

		/* The index entry's value is the event's key. */
		put_be64(gkey, ev->global_seq);
		op = stage_op(s, DB_GEVENTS, gkey, sizeof gkey, klen, OP_PUT);
		memcpy(op->val, key, klen);
	}
}

void store_stage_pipeline(struct store *s, const char *run_id, const char *text,
			  size_t len)
{
	size_t idlen = need_run_id(run_id, "pipeline");
	struct store_op *op = stage_op(s, DB_PIPELINES, run_id, idlen, len, OP_PUT);

	memcpy(op->val, text, len);
}

void store_stage_idem(struct store *s, const char *key, const char *run_id)
{
	size_t klen, idlen = need_run_id(run_id, "idem");
	struct store_op *op;

	if (!idem_key_ok(key, &klen))
		BUG("store_stage_idem: idempotency key is empty or over %d bytes",
		    STORE_MAX_IDEM_KEY_LEN);
	op = stage_op(s, DB_IDEM, key, klen, idlen, OP_PUT);
	memcpy(op->val, run_id, idlen);
}

void store_stage_idem_scoped(struct store *s, const char *pipeline, const char *key,
			     const char *run_id)
{
	char buf[IDEM_SCOPED_MAX];
	size_t idlen = need_run_id(run_id, "idem"), klen = idem_scoped_key(pipeline, key, buf);
	struct store_op *op;

	if (!klen)
		BUG("store_stage_idem_scoped: empty or over-long key or pipeline name");
	op = stage_op(s, DB_IDEM, buf, klen, idlen, OP_PUT);
	memcpy(op->val, run_id, idlen);
}

void store_stage_active(struct store *s, const char *run_id, int on)
{
	size_t len = need_run_id(run_id, "active");

	stage_op(s, DB_ACTIVE, run_id, len, 0, on ? OP_PUT : OP_DEL);
}

void store_stage_delete_run(struct store *s, const char *run_id)
{
	size_t len = need_run_id(run_id, "delete_run");

	stage_op(s, DB_RUNS, run_id, len, 0, OP_DEL_RUN);
}

size_t store_staged(struct store *s)
{
	return s->open->nops - s->open->covered;
}

/* --- Commits --- */

void store_commit(struct store *s, store_commit_cb cb, void *data)
{
	struct store_group *g = s->open;

	if (!s->loop)
		BUG("store_commit on a store opened without a loop");
	if (cb) {
		if (g->ncbs == g->cbs_cap) {
			g->cbs_cap = g->cbs_cap ? 2 * g->cbs_cap : 8;
			g->cbs = kpl_realloc(g->cbs, g->cbs_cap * sizeof *g->cbs);
		}
		g->cbs[g->ncbs].cb = cb;
		g->cbs[g->ncbs].data = data;
		g->cbs[g->ncbs].after =
			s->inflight && !s->inflight->done ? s->inflight->id : 0;
		g->ncbs++;
	}
	g->want_commit = 1;
	g->covered = g->nops;
	if (!s->inflight)
		group_start(s);
}

int store_commit_sync(struct store *s)
{
	struct store_group *g = s->open;
	int rc, code = 0;

	if (s->inflight)
		BUG("store_commit_sync with a store_commit in flight");
	/* With nothing in flight, store_commit starts its group at once. */
	if (g->want_commit)
		BUG("store: open group waits for a commit with none in flight");
	rc = group_write(s, g);
	if (rc)
		code = group_fail(s, g, rc);
	s->staged -= g->bytes < s->staged ? g->bytes : s->staged;
	g->bytes = 0;
	if ((g->used = space_used(s)) != 0)
		s->used = g->used;
	group_drop_ops(g);
	return code;
}

size_t store_pending_commits(struct store *s)
{
	return (s->inflight ? 1 : 0) + (s->open->want_commit ? 1 : 0);
}

/* --- Reads --- */

static int read_begin(struct store *s, MDB_txn **txn)
{
	int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, txn);

	if (rc) {
		*txn = NULL;
		return lmdb_fail(s, "mdb_txn_begin (read)", rc);
	}
	return 0;
}

/* lmdb_fail for a call on db: the step is logged as "step (db)". */
static int lmdb_fail_db(struct store *s, const char *step, enum store_db db, int rc)
{
	char buf[64];

	snprintf(buf, sizeof buf, "%s (%s)", step, db_names[db]);
	return lmdb_fail(s, buf, rc);
}

static int corrupt(struct store *s, const char *db, const void *key, size_t klen,
		   const char *type, size_t vlen)
{
	/* Keys are run ids (printable) plus a binary suffix: show the printable
	 * part and the number after the separator, if any. */
	const unsigned char *k = key;
	size_t n = strnlen(key, klen);

	if (n + 5 == klen)
		kpl_error(SUB, "%s: record %s/%.*s#%u does not decode as %s (%zu bytes)", s->dir,
			  db, (int)n, (const char *)key, get_be32(k + n + 1), type, vlen);
	else if (n + 9 == klen)
		kpl_error(SUB, "%s: record %s/%.*s#%llu does not decode as %s (%zu bytes)",
			  s->dir, db, (int)n, (const char *)key,
			  (unsigned long long)get_be64(k + n + 1), type, vlen);
	else
		kpl_error(SUB, "%s: record %s/%.*s does not decode as %s (%zu bytes)", s->dir, db,
			  (int)n, (const char *)key, type, vlen);
	return KPL_ECORRUPT;
}

/*
 * Decodes v, the value of key k in db, as a desc message: a new message
 * (free it with its type's free_unpacked), or NULL once the record has been
 * logged as corrupt.
 */
static void *decode(struct store *s, enum store_db db, const MDB_val *k, const MDB_val *v,
		    const ProtobufCMessageDescriptor *desc)
{
	void *msg = protobuf_c_message_unpack(desc, NULL, v->mv_size, v->mv_data);

	if (desc == &kpl__v1__run_event__descriptor)
		__atomic_add_fetch(&s->events_decoded, 1, __ATOMIC_RELAXED);
	if (!msg)
		corrupt(s, db_names[db], k->mv_data, k->mv_size, desc->name, v->mv_size);
	return msg;
}

/* mdb_get of key in db inside txn: 0 (*v borrowed until txn ends),
 * KPL_ENOTFOUND, or the KPL_E* code of the failure (logged). */
static int txn_get(struct store *s, MDB_txn *txn, enum store_db db, const MDB_val *key,
		   MDB_val *v)
{
	MDB_val k = *key;
	int rc = mdb_get(txn, s->dbi[db], &k, v);

	if (rc == MDB_NOTFOUND)
		return KPL_ENOTFOUND;
	return rc ? lmdb_fail_db(s, "mdb_get", db, rc) : 0;
}

/*
 * Reads the value of one key of db in a short read transaction and hands
 * it to take, which keeps what it needs in out (v is borrowed for the call
 * only). Returns take's value, KPL_ENOTFOUND (take not called), or the
 * KPL_E* code of a failed LMDB call (logged).
 */
typedef int (*take_fn)(struct store *s, const MDB_val *k, const MDB_val *v, void *out);

static int read_one(struct store *s, enum store_db db, const void *key, size_t klen,
		    take_fn take, void *out)
{
	MDB_val k = { .mv_size = klen, .mv_data = (void *)key }, v;
	MDB_txn *txn;
	int code = read_begin(s, &txn);

	if (code)
		return code;
	code = txn_get(s, txn, db, &k, &v);
	if (!code)
		code = take(s, &k, &v, out);
	mdb_txn_abort(txn);
	return code;
}

/* Where a walk starts, and so which way it goes. */
enum walk_from {
	FROM_FIRST, /* up from the first key */
	FROM_KEY, /* up from the first key >= key */
	FROM_LAST, /* down from the last key */
	FROM_BELOW, /* down from the last key < key */
	FROM_UPTO, /* down from the last key <= key */
};

/*
 * One walk over a database's records in a short read transaction (walk()).
 * each gets the records in turn, k and v borrowed for the call, and returns
 * 0 to go on or non-zero to stop (walk() returns that value); it sets done
 * to stop with 0.
 */
struct walk {
	enum store_db db;
	enum walk_from from;
	MDB_val key; /* for FROM_KEY, FROM_BELOW and FROM_UPTO */
	int (*each)(struct walk *w, const MDB_val *k, const MDB_val *v);
	void *data; /* each's own */
	/* Set by walk(): each may read more in txn. */
	struct store *s;
	MDB_txn *txn;
	int done;
};

/* Puts cur on w's first record; returns the MDB code (MDB_NOTFOUND: none). */
static int walk_seek(MDB_cursor *cur, const struct walk *w, MDB_val *k, MDB_val *v)
{
	int rc;

	if (w->from == FROM_FIRST)
		return mdb_cursor_get(cur, k, v, MDB_FIRST);
	if (w->from == FROM_LAST)
		return mdb_cursor_get(cur, k, v, MDB_LAST);
	*k = w->key;
	rc = mdb_cursor_get(cur, k, v, MDB_SET_RANGE);
	if (w->from == FROM_KEY)
		return rc;
	/* Down: the first key >= key, then one back unless it is key itself
	 * (FROM_UPTO). Nothing >= key means every key is below it. */
	if (rc == MDB_NOTFOUND)
		return mdb_cursor_get(cur, k, v, MDB_LAST);
	if (rc == 0 && !(w->from == FROM_UPTO && k->mv_size == w->key.mv_size &&
			 memcmp(k->mv_data, w->key.mv_data, k->mv_size) == 0))
		rc = mdb_cursor_get(cur, k, v, MDB_PREV);
	return rc;
}

/* Runs w (see struct walk). Returns 0 when done, each's non-zero value, or
 * the KPL_E* code of a failed LMDB call (logged). */
static int walk(struct store *s, struct walk *w)
{
	MDB_cursor_op step = w->from == FROM_FIRST || w->from == FROM_KEY ? MDB_NEXT : MDB_PREV;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code;

	w->s = s;
	w->done = 0;
	code = read_begin(s, &w->txn);
	if (code)
		return code;
	rc = mdb_cursor_open(w->txn, s->dbi[w->db], &cur);
	if (rc) {
		mdb_txn_abort(w->txn);
		return lmdb_fail_db(s, "mdb_cursor_open", w->db, rc);
	}
	for (rc = walk_seek(cur, w, &k, &v); rc == 0; rc = mdb_cursor_get(cur, &k, &v, step)) {
		code = w->each(w, &k, &v);
		if (code || w->done)
			break;
	}
	if (rc && rc != MDB_NOTFOUND)
		code = lmdb_fail_db(s, "mdb_cursor_get", w->db, rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(w->txn);
	return code;
}

/*
 * The caller's callback for a walk (the member its store_*_fn type names),
 * called at most max times (0 = no limit); count is the calls so far.
 */
struct walk_cb {
	union {
		store_event_fn event;
		store_run_fn run;
		store_secret_fn secret;
		store_token_fn token;
		store_notify_fn notify;
		store_audit_fn audit;
		store_registered_fn registered;
		store_forge_fn forge;
	} fn;
	void *data;
	size_t max, count;
	size_t idlen; /* store_read_events: the run id's length */
};

/* 1 if c has made its max calls. */
static int walk_cb_full(const struct walk_cb *c)
{
	return c->max && c->count >= c->max;
}

/* The first record of a walk: its key's be64 at offset at, if the key is
 * at + 8 bytes and its first at bytes are the walk's key's. */
struct last_walk {
	size_t at;
	int found; /* there was a record */
	size_t klen; /* its key's size */
	uint64_t seq;
};

static int last_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct last_walk *c = w->data;

	c->found = 1;
	c->klen = k->mv_size;
	if (k->mv_size == c->at + 8 &&
	    (c->at == 0 || memcmp(k->mv_data, w->key.mv_data, c->at) == 0))
		c->seq = get_be64((const unsigned char *)k->mv_data + c->at);
	w->done = 1;
	return 0;
}

static int take_run(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	Kpl__Store__V1__RunRecord **rec = out;

	*rec = decode(s, DB_RUNS, k, v, &kpl__store__v1__run_record__descriptor);
	return *rec ? 0 : KPL_ECORRUPT;
}

int store_get_run(struct store *s, const char *run_id, Kpl__Store__V1__RunRecord **out)
{
	size_t len;

	*out = NULL;
	if (!run_id_ok(run_id, &len))
		return KPL_EINVAL;
	return read_one(s, DB_RUNS, run_id, len, take_run, out);
}

/* run_key as an MDB_val over buf (RUN_KEY_MAX bytes). */
static MDB_val run_key_val(unsigned char *buf, const char *id, size_t idlen, uint64_t n,
			   int width)
{
	MDB_val k = { .mv_size = run_key(buf, id, idlen, n, width), .mv_data = buf };

	return k;
}

/* 1 if k is in run id's range (starts with id + 0x00). */
static int in_run(const MDB_val *k, const unsigned char *prefix, size_t plen)
{
	return k->mv_size >= plen && memcmp(k->mv_data, prefix, plen) == 0;
}

struct stages_walk {
	size_t idlen;
	Kpl__Store__V1__StageRecord **recs;
	size_t n, cap;
};

static int stage_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct stages_walk *c = w->data;
	Kpl__Store__V1__StageRecord *rec;

	if (!in_run(k, w->key.mv_data, c->idlen + 1)) {
		w->done = 1;
		return 0;
	}
	if (k->mv_size != c->idlen + 5)
		return corrupt(w->s, "stages", k->mv_data, k->mv_size, "a stage key", v->mv_size);
	rec = decode(w->s, DB_STAGES, k, v, &kpl__store__v1__stage_record__descriptor);
	if (!rec)
		return KPL_ECORRUPT;
	if (c->n == c->cap) {
		c->cap = c->cap ? 2 * c->cap : 8;
		c->recs = kpl_realloc(c->recs, c->cap * sizeof *c->recs);
	}
	c->recs[c->n++] = rec;
	return 0;
}

int store_get_stages(struct store *s, const char *run_id,
		     Kpl__Store__V1__StageRecord ***out, size_t *n)
{
	unsigned char key[RUN_KEY_MAX];
	struct stages_walk c = { 0 };
	struct walk w = { .db = DB_STAGES, .from = FROM_KEY, .each = stage_each, .data = &c };
	int code;

	*out = NULL;
	*n = 0;
	if (!run_id_ok(run_id, &c.idlen))
		return KPL_EINVAL;
	w.key = run_key_val(key, run_id, c.idlen, 0, 4);
	code = walk(s, &w);
	if (code) {
		store_free_stages(c.recs, c.n);
		return code;
	}
	*out = c.recs;
	*n = c.n;
	return 0;
}

void store_free_stages(Kpl__Store__V1__StageRecord **stages, size_t n)
{
	for (size_t i = 0; i < n; i++)
		kpl__store__v1__stage_record__free_unpacked(stages[i], NULL);
	free(stages);
}

/* A copy of a value, NUL-terminated (take_bytes). */
struct bytes {
	char *p;
	size_t len;
};

static int take_bytes(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	struct bytes *b = out;

	b->p = kpl_malloc(v->mv_size + 1);
	memcpy(b->p, v->mv_data, v->mv_size);
	b->p[v->mv_size] = '\0';
	b->len = v->mv_size;
	return 0;
}

int store_get_pipeline(struct store *s, const char *run_id, char **text, size_t *len)
{
	struct bytes b = { 0 };
	size_t idlen;
	int code;

	*text = NULL;
	*len = 0;
	if (!run_id_ok(run_id, &idlen))
		return KPL_EINVAL;
	code = read_one(s, DB_PIPELINES, run_id, idlen, take_bytes, &b);
	*text = b.p;
	*len = b.len;
	return code;
}

int store_find_idem(struct store *s, const char *key, char **run_id)
{
	struct bytes id = { 0 };
	size_t klen, idlen;
	int code;

	*run_id = NULL;
	if (!idem_key_ok(key, &klen))
		return KPL_EINVAL;
	code = read_one(s, DB_IDEM, key, klen, take_bytes, &id);
	if (code)
		return code;
	if (!run_id_ok(id.p, &idlen) || idlen != id.len) {
		free(id.p);
		return corrupt(s, "idem", key, klen, "a run id", id.len);
	}
	*run_id = id.p;
	return 0;
}

/* The run id in an idem entry's value (b, taken by take_bytes). */
static int idem_run_id(struct store *s, const void *key, size_t klen, struct bytes *id,
		       char **run_id)
{
	size_t idlen;

	if (!run_id_ok(id->p, &idlen) || idlen != id->len) {
		free(id->p);
		return corrupt(s, "idem", key, klen, "a run id", id->len);
	}
	*run_id = id->p;
	return 0;
}

int store_find_idem_scoped(struct store *s, const char *pipeline, const char *key,
			   char **run_id)
{
	char buf[IDEM_SCOPED_MAX];
	size_t klen = idem_scoped_key(pipeline, key, buf);
	struct bytes id = { 0 };
	int code;

	*run_id = NULL;
	if (!klen)
		return KPL_EINVAL;
	code = read_one(s, DB_IDEM, buf, klen, take_bytes, &id);
	return code ? code : idem_run_id(s, buf, klen, &id, run_id);
}

struct idem_any {
	size_t klen; /* the key's length; the walk's key is key, 0x00 */
	struct bytes id;
	int found;
};

static int idem_any_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct idem_any *a = w->data;

	w->done = 1;
	if (k->mv_size <= a->klen + 1 || memcmp(k->mv_data, w->key.mv_data, a->klen + 1))
		return 0;
	a->found = 1;
	return take_bytes(w->s, k, v, &a->id);
}

int store_find_idem_any(struct store *s, const char *key, char **run_id)
{
	char buf[STORE_MAX_IDEM_KEY_LEN + 1];
	struct idem_any a = { 0 };
	struct walk w = { .db = DB_IDEM, .from = FROM_KEY, .each = idem_any_each, .data = &a };
	int code;

	*run_id = NULL;
	if (!idem_key_ok(key, &a.klen))
		return KPL_EINVAL;
	memcpy(buf, key, a.klen);
	buf[a.klen] = '\0';
	w.key.mv_data = buf;
	w.key.mv_size = a.klen + 1;
	code = walk(s, &w);
	if (code) {
		free(a.id.p);
		return code;
	}
	if (!a.found)
		return KPL_ENOTFOUND;
	return idem_run_id(s, buf, a.klen, &a.id, run_id);
}

static int event_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__V1__RunEvent *ev;
	int stop;

	if (!in_run(k, w->key.mv_data, c->idlen + 1) || walk_cb_full(c)) {
		w->done = 1;
		return 0;
	}
	if (k->mv_size != c->idlen + 9)
		return corrupt(w->s, "events", k->mv_data, k->mv_size, "an event key", v->mv_size);
	ev = decode(w->s, DB_EVENTS, k, v, &kpl__v1__run_event__descriptor);
	if (!ev)
		return KPL_ECORRUPT;
	stop = c->fn.event(c->data, ev);
	kpl__v1__run_event__free_unpacked(ev, NULL);
	c->count++;
	return stop;
}

int store_read_events(struct store *s, const char *run_id, uint64_t from_seq,
		      size_t max, store_event_fn fn, void *data)
{
	unsigned char key[RUN_KEY_MAX];
	struct walk_cb c = { .fn.event = fn, .data = data, .max = max };
	struct walk w = { .db = DB_EVENTS, .from = FROM_KEY, .each = event_each, .data = &c };

	if (!run_id_ok(run_id, &c.idlen))
		return KPL_EINVAL;
	w.key = run_key_val(key, run_id, c.idlen, from_seq, 8);
	return walk(s, &w);
}

uint64_t store_last_event_seq(struct store *s, const char *run_id)
{
	unsigned char key[RUN_KEY_MAX];
	struct last_walk c = { 0 };
	struct walk w = { .db = DB_EVENTS, .from = FROM_UPTO, .each = last_each, .data = &c };
	size_t idlen;

	if (!run_id_ok(run_id, &idlen))
		return 0;
	/* The run's last possible event, or the one before it. */
	w.key = run_key_val(key, run_id, idlen, UINT64_MAX, 8);
	c.at = idlen + 1;
	walk(s, &w);
	return c.seq;
}

uint64_t store_last_global_seq(struct store *s)
{
	struct last_walk c = { 0 };
	struct walk w = { .db = DB_GEVENTS, .from = FROM_LAST, .each = last_each, .data = &c };

	walk(s, &w);
	if (c.found && c.klen != 8)
		kpl_error(SUB, "%s: the last gevents key is %zu bytes, not 8", s->dir, c.klen);
	return c.seq;
}

/* 1 if a gevents value is an events key: a valid run id, 0x00, be64. */
static int gevent_val_ok(const MDB_val *v)
{
	char id[STORE_MAX_RUN_ID_LEN + 1];
	size_t idlen;

	if (v->mv_size < 10 || v->mv_size > RUN_KEY_MAX)
		return 0;
	idlen = v->mv_size - 9;
	memcpy(id, v->mv_data, idlen);
	id[idlen] = '\0';
	return ((const unsigned char *)v->mv_data)[idlen] == 0 && run_id_ok(id, &idlen) &&
	       idlen == v->mv_size - 9;
}

static int global_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__V1__RunEvent *ev;
	MDB_val ev_val;
	int code;

	if (walk_cb_full(c)) {
		w->done = 1;
		return 0;
	}
	if (k->mv_size != 8 || !gevent_val_ok(v)) {
		kpl_error(SUB, "%s: a gevents record (key %zu bytes, value %zu bytes) is not "
			       "global seq -> event key",
			  w->s->dir, k->mv_size, v->mv_size);
		return KPL_ECORRUPT;
	}
	code = txn_get(w->s, w->txn, DB_EVENTS, v, &ev_val);
	if (code == KPL_ENOTFOUND)
		return 0; /* its run was deleted */
	if (code)
		return code;
	ev = decode(w->s, DB_EVENTS, v, &ev_val, &kpl__v1__run_event__descriptor);
	if (!ev)
		return KPL_ECORRUPT;
	/* An event written again under a new global seq leaves its old
	 * entry behind: only the entry the event names counts. */
	if (ev->global_seq != get_be64(k->mv_data)) {
		kpl__v1__run_event__free_unpacked(ev, NULL);
		return 0;
	}
	code = c->fn.event(c->data, ev);
	kpl__v1__run_event__free_unpacked(ev, NULL);
	c->count++;
	return code;
}

int store_read_global(struct store *s, uint64_t from_gseq, size_t max, store_event_fn fn,
		      void *data)
{
	unsigned char gkey[8];
	struct walk_cb c = { .fn.event = fn, .data = data, .max = max };
	struct walk w = { .db = DB_GEVENTS, .from = FROM_KEY, .each = global_each, .data = &c };

	put_be64(gkey, from_gseq);
	w.key.mv_size = sizeof gkey;
	w.key.mv_data = gkey;
	return walk(s, &w);
}

/* Decodes the run record at (k, v) and calls fn with it: fn's value, or
 * KPL_ECORRUPT if it does not decode. */
static int run_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__Store__V1__RunRecord *rec;
	int stop = take_run(w->s, k, v, &rec);

	if (stop)
		return stop;
	stop = c->fn.run(c->data, rec);
	kpl__store__v1__run_record__free_unpacked(rec, NULL);
	return stop;
}

int store_list_runs(struct store *s, const char *after, store_run_fn fn, void *data)
{
	struct walk_cb c = { .fn.run = fn, .data = data };
	struct walk w = { .db = DB_RUNS, .from = FROM_LAST, .each = run_each, .data = &c };
	size_t alen = 0;

	if (after && *after && !run_id_ok(after, &alen))
		return KPL_EINVAL;
	if (alen) {
		/* The newest run older than after. */
		w.from = FROM_BELOW;
		w.key.mv_size = alen;
		w.key.mv_data = (void *)after;
	}
	return walk(s, &w);
}

int store_list_runs_oldest(struct store *s, store_run_fn fn, void *data)
{
	struct walk_cb c = { .fn.run = fn, .data = data };
	struct walk w = { .db = DB_RUNS, .from = FROM_FIRST, .each = run_each, .data = &c };

	return walk(s, &w);
}

/* An active entry's run record, to fn.run. */
static int active_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	char id[STORE_MAX_RUN_ID_LEN + 1];
	MDB_val rv;
	size_t idlen;
	int code;

	if (k->mv_size > STORE_MAX_RUN_ID_LEN)
		return corrupt(w->s, "active", k->mv_data, k->mv_size, "a run id key", v->mv_size);
	memcpy(id, k->mv_data, k->mv_size);
	id[k->mv_size] = '\0';
	if (!run_id_ok(id, &idlen) || idlen != k->mv_size)
		return corrupt(w->s, "active", k->mv_data, k->mv_size, "a run id key", v->mv_size);
	code = txn_get(w->s, w->txn, DB_RUNS, k, &rv);
	if (code == KPL_ENOTFOUND) {
		/* Both are written in one group, so this is a kpl bug; the
		 * run is gone either way and there is nothing to resume. */
		kpl_warn(SUB, "%s: active run %s has no run record; skipping it", w->s->dir, id);
		return 0;
	}
	return code ? code : run_each(w, k, &rv);
}

int store_list_active(struct store *s, store_run_fn fn, void *data)
{
	struct walk_cb c = { .fn.run = fn, .data = data };
	struct walk w = { .db = DB_ACTIVE, .from = FROM_FIRST, .each = active_each, .data = &c };

	return walk(s, &w);
}

/* --- Secrets (sealed by engine/secrets.c; the store sees only bytes). --- */

void store_stage_secret(struct store *s, const char *name, const void *blob, size_t len)
{
	size_t nlen = strlen(name);
	struct store_op *op;

	if (nlen == 0 || nlen > 64)
		BUG("store_stage_secret: bad name length %zu", nlen);
	if (!blob) {
		stage_op(s, DB_SECRETS, name, nlen, 0, OP_DEL);
		return;
	}
	op = stage_op(s, DB_SECRETS, name, nlen, len, OP_PUT);
	memcpy(op->val, blob, len);
}

static int secret_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	char name[65];

	if (k->mv_size == 0 || k->mv_size >= sizeof name)
		return 0;
	memcpy(name, k->mv_data, k->mv_size);
	name[k->mv_size] = '\0';
	return c->fn.secret(c->data, name, v->mv_data, v->mv_size);
}

int store_list_secrets(struct store *s, store_secret_fn fn, void *data)
{
	struct walk_cb c = { .fn.secret = fn, .data = data };
	struct walk w = { .db = DB_SECRETS, .from = FROM_FIRST, .each = secret_each, .data = &c };

	return walk(s, &w);
}

/* --- Release history. --- */


static size_t release_key(char *key, const char *target, uint64_t seq)
{
	size_t n = strlen(target);

	memcpy(key, target, n);
	key[n] = '\0';
	for (int i = 0; i < 8; i++)
		key[n + 1 + i] = (char)(seq >> (56 - 8 * i));
	return n + 9;
}

void store_stage_release(struct store *s, const Kpl__Store__V1__ReleaseRecord *rec)
{
	char key[STORE_MAX_RELEASE_TARGET + 9];
	size_t klen, vlen;
	struct store_op *op;

	if (!rec->target || !*rec->target || strlen(rec->target) > STORE_MAX_RELEASE_TARGET)
		BUG("store_stage_release: bad target");
	klen = release_key(key, rec->target, rec->seq);
	vlen = kpl__store__v1__release_record__get_packed_size(rec);
	op = stage_op(s, DB_RELEASES, key, klen, vlen, OP_PUT);
	kpl__store__v1__release_record__pack(rec, (uint8_t *)op->val);
}

struct releases_walk {
	const char *target;
	size_t tlen;
	Kpl__Store__V1__ReleaseRecord **recs;
	size_t n, cap;
};

static int release_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct releases_walk *c = w->data;
	Kpl__Store__V1__ReleaseRecord *r;

	if (k->mv_size != c->tlen + 9 || memcmp(k->mv_data, c->target, c->tlen) ||
	    ((char *)k->mv_data)[c->tlen] != '\0') {
		w->done = 1;
		return 0;
	}
	r = kpl__store__v1__release_record__unpack(NULL, v->mv_size, v->mv_data);
	if (!r)
		return KPL_ECORRUPT;
	if (c->n == c->cap) {
		c->cap = c->cap ? c->cap * 2 : 8;
		c->recs = kpl_realloc(c->recs, c->cap * sizeof *c->recs);
	}
	c->recs[c->n++] = r;
	return 0;
}

int store_list_releases(struct store *s, const char *target,
			Kpl__Store__V1__ReleaseRecord ***out, size_t *n)
{
	char key[STORE_MAX_RELEASE_TARGET + 9];
	struct releases_walk c = { .target = target, .tlen = strlen(target) };
	struct walk w = { .db = DB_RELEASES, .from = FROM_UPTO, .each = release_each, .data = &c };
	int code;

	*out = NULL;
	*n = 0;
	if (c.tlen == 0 || c.tlen > STORE_MAX_RELEASE_TARGET)
		return KPL_EINVAL;
	/* Newest first: from the target's last possible key, walking back. */
	w.key.mv_size = release_key(key, target, UINT64_MAX);
	w.key.mv_data = key;
	code = walk(s, &w);
	if (code) {
		store_free_releases(c.recs, c.n);
		return code;
	}
	*out = c.recs;
	*n = c.n;
	return 0;
}

void store_free_releases(Kpl__Store__V1__ReleaseRecord **r, size_t n)
{
	for (size_t i = 0; i < n; i++)
		kpl__store__v1__release_record__free_unpacked(r[i], NULL);
	free(r);
}

/* --- Tokens (engine-independent: api/rpc_tokens.c hashes and checks). --- */

#define TOKEN_HASH_LEN 64

static int token_hash_ok(const char *hash_hex)
{
	if (!hash_hex || strlen(hash_hex) != TOKEN_HASH_LEN)
		return 0;
	for (size_t i = 0; i < TOKEN_HASH_LEN; i++)
		if (!strchr("0123456789abcdef", hash_hex[i]) || !hash_hex[i])
			return 0;
	return 1;
}

void store_stage_token(struct store *s, const char *hash_hex,
		       const Kpl__Store__V1__TokenRecord *rec)
{
	struct store_op *op;
	size_t vlen;

	if (!token_hash_ok(hash_hex))
		BUG("store_stage_token: the key is not a SHA-256 in hex");
	if (!rec) {
		stage_op(s, DB_TOKENS, hash_hex, TOKEN_HASH_LEN, 0, OP_DEL);
		return;
	}
	vlen = kpl__store__v1__token_record__get_packed_size(rec);
	op = stage_op(s, DB_TOKENS, hash_hex, TOKEN_HASH_LEN, vlen, OP_PUT);
	kpl__store__v1__token_record__pack(rec, (uint8_t *)op->val);
}

static int take_token(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	Kpl__Store__V1__TokenRecord **rec = out;

	*rec = kpl__store__v1__token_record__unpack(NULL, v->mv_size, v->mv_data);
	return *rec ? 0 : KPL_ECORRUPT;
}

int store_get_token(struct store *s, const char *hash_hex,
		    Kpl__Store__V1__TokenRecord **out)
{
	*out = NULL;
	if (!token_hash_ok(hash_hex))
		return KPL_EINVAL;
	return read_one(s, DB_TOKENS, hash_hex, TOKEN_HASH_LEN, take_token, out);
}

static int token_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	char hash[TOKEN_HASH_LEN + 1];
	Kpl__Store__V1__TokenRecord *rec;
	int stop;

	if (k->mv_size != TOKEN_HASH_LEN)
		return 0;
	memcpy(hash, k->mv_data, TOKEN_HASH_LEN);
	hash[TOKEN_HASH_LEN] = '\0';
	if (take_token(w->s, k, v, &rec))
		return KPL_ECORRUPT;
	stop = c->fn.token(c->data, hash, rec);
	kpl__store__v1__token_record__free_unpacked(rec, NULL);
	return stop;
}

int store_list_tokens(struct store *s, store_token_fn fn, void *data)
{
	struct walk_cb c = { .fn.token = fn, .data = data };
	struct walk w = { .db = DB_TOKENS, .from = FROM_FIRST, .each = token_each, .data = &c };

	return walk(s, &w);
}

/* --- Notification outbox. --- */

void store_stage_notify(struct store *s, uint64_t gseq, uint32_t index,
			const Kpl__Store__V1__NotifyRecord *rec)
{
	unsigned char key[12];
	struct store_op *op;
	size_t vlen;

	put_be64(key, gseq);
	put_be32(key + 8, index);
	if (!rec) {
		stage_op(s, DB_NOTIFY, key, sizeof key, 0, OP_DEL);
		return;
	}
	vlen = kpl__store__v1__notify_record__get_packed_size(rec);
	op = stage_op(s, DB_NOTIFY, key, sizeof key, vlen, OP_PUT);
	kpl__store__v1__notify_record__pack(rec, (uint8_t *)op->val);
}

static int notify_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__Store__V1__NotifyRecord *rec;
	uint64_t gseq;
	uint32_t index;
	int stop;

	if (k->mv_size != 12)
		return 0;
	gseq = get_be64(k->mv_data);
	index = get_be32((const unsigned char *)k->mv_data + 8);
	rec = kpl__store__v1__notify_record__unpack(NULL, v->mv_size, v->mv_data);
	if (!rec) {
		/* One bad record must not stop every other notification. */
		kpl_error(SUB, "%s: record notify/%llu#%u does not decode as a "
			  "NotifyRecord (%zu bytes); skipped", w->s->dir,
			  (unsigned long long)gseq, index, v->mv_size);
		return 0;
	}
	stop = c->fn.notify(c->data, gseq, index, rec);
	kpl__store__v1__notify_record__free_unpacked(rec, NULL);
	return stop;
}

int store_list_notify(struct store *s, store_notify_fn fn, void *data)
{
	struct walk_cb c = { .fn.notify = fn, .data = data };
	struct walk w = { .db = DB_NOTIFY, .from = FROM_FIRST, .each = notify_each, .data = &c };

	return walk(s, &w);
}

/* --- Audit log. --- */

/* The last committed audit seq, 0 if none (or the read fails: logged). */
static uint64_t audit_last(struct store *s)
{
	struct last_walk c = { 0 };
	struct walk w = { .db = DB_AUDIT, .from = FROM_LAST, .each = last_each, .data = &c };

	walk(s, &w);
	return c.seq;
}

uint64_t store_stage_audit(struct store *s, const Kpl__V1__RunEvent *ev)
{
	unsigned char key[8];
	struct store_op *op;
	size_t vlen;
	uint64_t seq;

	/* Staged entries are not visible to reads until they commit, so the
	 * counter lives here once it has been read. */
	if (!s->audit_next)
		s->audit_next = audit_last(s) + 1;
	seq = s->audit_next++;
	put_be64(key, seq);
	vlen = kpl__v1__run_event__get_packed_size(ev);
	op = stage_op(s, DB_AUDIT, key, sizeof key, vlen, OP_PUT);
	kpl__v1__run_event__pack(ev, (uint8_t *)op->val);
	return seq;
}

static int audit_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__V1__RunEvent *ev;
	int stop;

	if (walk_cb_full(c)) {
		w->done = 1;
		return 0;
	}
	if (k->mv_size != 8)
		return 0;
	ev = kpl__v1__run_event__unpack(NULL, v->mv_size, v->mv_data);
	if (!ev)
		return KPL_ECORRUPT;
	c->count++;
	stop = c->fn.audit(c->data, get_be64(k->mv_data), ev);
	kpl__v1__run_event__free_unpacked(ev, NULL);
	return stop;
}

int store_read_audit(struct store *s, uint64_t from_seq, size_t max,
		     store_audit_fn fn, void *data)
{
	unsigned char key[8];
	struct walk_cb c = { .fn.audit = fn, .data = data, .max = max };
	struct walk w = { .db = DB_AUDIT, .from = FROM_KEY, .each = audit_each, .data = &c };

	put_be64(key, from_seq);
	w.key.mv_size = sizeof key;
	w.key.mv_data = key;
	return walk(s, &w);
}

/* --- Registered pipelines (engine/hooks.c decides what they mean). --- */

#define REGISTERED_NAME_MAX 128

static int registered_name_ok(const char *name)
{
	size_t n = name ? strlen(name) : 0;

	return n > 0 && n <= REGISTERED_NAME_MAX;
}

void store_stage_registered(struct store *s, const char *name,
			    const Kpl__V1__RegisteredPipeline *rec)
{
	struct store_op *op;
	size_t vlen;

	if (!registered_name_ok(name))
		BUG("store_stage_registered: bad name");
	if (!rec) {
		stage_op(s, DB_PIPELINES_REGISTERED, name, strlen(name), 0, OP_DEL);
		return;
	}
	vlen = kpl__v1__registered_pipeline__get_packed_size(rec);
	op = stage_op(s, DB_PIPELINES_REGISTERED, name, strlen(name), vlen, OP_PUT);
	kpl__v1__registered_pipeline__pack(rec, (uint8_t *)op->val);
}

static int take_registered(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	Kpl__V1__RegisteredPipeline **rec = out;

	*rec = kpl__v1__registered_pipeline__unpack(NULL, v->mv_size, v->mv_data);
	return *rec ? 0 : KPL_ECORRUPT;
}

int store_get_registered(struct store *s, const char *name,
			 Kpl__V1__RegisteredPipeline **out)
{
	*out = NULL;
	if (!registered_name_ok(name))
		return KPL_EINVAL;
	return read_one(s, DB_PIPELINES_REGISTERED, name, strlen(name), take_registered, out);
}

static int registered_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__V1__RegisteredPipeline *rec;
	int stop;

	if (take_registered(w->s, k, v, &rec))
		return KPL_ECORRUPT;
	stop = c->fn.registered(c->data, rec);
	kpl__v1__registered_pipeline__free_unpacked(rec, NULL);
	return stop;
}

int store_list_registered(struct store *s, store_registered_fn fn, void *data)
{
	struct walk_cb c = { .fn.registered = fn, .data = data };
	struct walk w = { .db = DB_PIPELINES_REGISTERED, .from = FROM_FIRST,
			  .each = registered_each, .data = &c };

	return walk(s, &w);
}

/* --- Forge commit status outbox. --- */

void store_stage_forge(struct store *s, const char *run_id,
		       const Kpl__Store__V1__ForgeStatusRecord *rec)
{
	struct store_op *op;
	size_t vlen, klen = run_id ? strlen(run_id) : 0;

	if (klen == 0 || klen > STORE_MAX_RUN_ID_LEN)
		BUG("store_stage_forge: bad run id");
	if (!rec) {
		stage_op(s, DB_FORGE_STATUS, run_id, klen, 0, OP_DEL);
		return;
	}
	vlen = kpl__store__v1__forge_status_record__get_packed_size(rec);
	op = stage_op(s, DB_FORGE_STATUS, run_id, klen, vlen, OP_PUT);
	kpl__store__v1__forge_status_record__pack(rec, (uint8_t *)op->val);
}

static int take_forge(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	Kpl__Store__V1__ForgeStatusRecord **rec = out;

	(void)s;
	(void)k;
	*rec = kpl__store__v1__forge_status_record__unpack(NULL, v->mv_size, v->mv_data);
	return *rec ? 0 : KPL_ECORRUPT;
}

int store_get_forge(struct store *s, const char *run_id,
		    Kpl__Store__V1__ForgeStatusRecord **out)
{
	size_t n = run_id ? strlen(run_id) : 0;

	*out = NULL;
	if (n == 0 || n > STORE_MAX_RUN_ID_LEN)
		return KPL_EINVAL;
	return read_one(s, DB_FORGE_STATUS, run_id, n, take_forge, out);
}

static int forge_each(struct walk *w, const MDB_val *k, const MDB_val *v)
{
	struct walk_cb *c = w->data;
	Kpl__Store__V1__ForgeStatusRecord *rec;
	char id[STORE_MAX_RUN_ID_LEN + 1];
	int stop;

	if (k->mv_size == 0 || k->mv_size > STORE_MAX_RUN_ID_LEN)
		return 0;
	memcpy(id, k->mv_data, k->mv_size);
	id[k->mv_size] = '\0';
	rec = kpl__store__v1__forge_status_record__unpack(NULL, v->mv_size, v->mv_data);
	if (!rec) {
		kpl_error(SUB, "%s: record forge_status/%s does not decode as a "
			  "ForgeStatusRecord (%zu bytes); skipped", w->s->dir, id, v->mv_size);
		return 0;
	}
	stop = c->fn.forge(c->data, id, rec);
	kpl__store__v1__forge_status_record__free_unpacked(rec, NULL);
	return stop;
}

int store_list_forge(struct store *s, store_forge_fn fn, void *data)
{
	struct walk_cb c = { .fn.forge = fn, .data = data };
	struct walk w = { .db = DB_FORGE_STATUS, .from = FROM_FIRST, .each = forge_each,
			  .data = &c };

	return walk(s, &w);
}

/* --- Schedules --- */

static size_t schedule_key(const char *name, uint32_t index, char *key)
{
	size_t n = strlen(name);

	memcpy(key, name, n);
	key[n] = '\0';
	key[n + 1] = (char)(index >> 24);
	key[n + 2] = (char)(index >> 16);
	key[n + 3] = (char)(index >> 8);
	key[n + 4] = (char)index;
	return n + 5;
}

void store_stage_schedule(struct store *s, const char *name, uint32_t index,
			  const Kpl__Store__V1__ScheduleState *st)
{
	char key[KPL_MAX_NAME_LEN + 5];
	struct store_op *op;
	size_t klen, vlen;

	if (!registered_name_ok(name))
		BUG("store_stage_schedule: bad name");
	klen = schedule_key(name, index, key);
	if (!st) {
		stage_op(s, DB_SCHEDULES, key, klen, 0, OP_DEL);
		return;
	}
	vlen = kpl__store__v1__schedule_state__get_packed_size(st);
	op = stage_op(s, DB_SCHEDULES, key, klen, vlen, OP_PUT);
	kpl__store__v1__schedule_state__pack(st, (uint8_t *)op->val);
}

static int take_schedule(struct store *s, const MDB_val *k, const MDB_val *v, void *out)
{
	Kpl__Store__V1__ScheduleState **st = out;

	(void)s;
	(void)k;
	*st = kpl__store__v1__schedule_state__unpack(NULL, v->mv_size, v->mv_data);
	return *st ? 0 : KPL_ECORRUPT;
}

int store_get_schedule(struct store *s, const char *name, uint32_t index,
		       Kpl__Store__V1__ScheduleState **out)
{
	char key[KPL_MAX_NAME_LEN + 5];

	*out = NULL;
	if (!registered_name_ok(name))
		return KPL_EINVAL;
	return read_one(s, DB_SCHEDULES, key, schedule_key(name, index, key), take_schedule,
			out);
}

/* --- Space --- */

/* LMDB's node header and slot in its page, per record. */
#define NODE_OVERHEAD 16

/*
 * Bytes of pages in use: the highest page LMDB has used, less the pages on
 * its free list (which it reuses before growing). Any thread; 0 if it
 * cannot be read.
 */
static size_t space_used(struct store *s)
{
	MDB_envinfo info;
	MDB_stat st;
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	size_t free_pages = 0, pages;
	int rc;

	if (mdb_env_info(s->env, &info) || mdb_env_stat(s->env, &st))
		return 0;
	if (mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn))
		return 0;
	/* dbi 0 is LMDB's free list: txn id -> page list, count first. */
	if (mdb_cursor_open(txn, 0, &cur) == 0) {
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
		     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			size_t n;

			if (v.mv_size < sizeof n)
				continue;
			memcpy(&n, v.mv_data, sizeof n);
			free_pages += n;
		}
		mdb_cursor_close(cur);
	}
	mdb_txn_abort(txn);
	pages = info.me_last_pgno + 1;
	pages = free_pages < pages ? pages - free_pages : 1;
	return pages * st.ms_psize;
}

/* After mdb_env_open: the map size LMDB settled on (an existing file's if
 * larger than asked), the reserve, and what is in use. */
static void space_open(struct store *s)
{
	MDB_envinfo info;

	if (mdb_env_info(s->env, &info) == 0 && info.me_mapsize > s->map_size)
		s->map_size = info.me_mapsize;
	s->reserve = s->map_size / 8;
	if (s->reserve < STORE_MIN_RESERVE)
		s->reserve = STORE_MIN_RESERVE;
	if (s->reserve > STORE_MAX_RESERVE)
		s->reserve = STORE_MAX_RESERVE;
	if (s->reserve > s->map_size / 2)
		s->reserve = s->map_size / 2;
	s->used = space_used(s);
}

void store_space(struct store *s, struct store_space *out)
{
	out->map_size = s->map_size;
	out->used = s->used;
	out->staged = s->staged;
	out->reserve = s->reserve;
}

static int fits(struct store *s, size_t limit, size_t need)
{
	return s->used + s->staged <= limit && need <= limit - s->used - s->staged;
}

int store_has_room(struct store *s, size_t need)
{
	size_t limit = s->map_size - s->reserve;

	if (s->full) {
		/* Full until deletes free a reserve's worth (or a quarter of
		 * the limit, in a small map), so that a store at the edge does
		 * not take and refuse writes in turn. */
		size_t gap = s->reserve < limit / 4 ? s->reserve : limit / 4;

		if (!fits(s, limit - gap, need))
			return 0;
		s->full = 0;
		kpl_info(SUB, "%s: room again: %zu of %zu bytes in use", s->dir,
			 s->used + s->staged, s->map_size);
	}
	if (fits(s, limit, need))
		return 1;
	s->full = 1;
	kpl_warn(SUB, "%s: full: %zu of %zu bytes in use, the last %zu kept for state "
		      "changes and deletes; new runs and log lines are refused",
		 s->dir, s->used + s->staged, s->map_size, s->reserve);
	return 0;
}

size_t store_event_cost(const Kpl__V1__RunEvent *ev)
{
	size_t idlen = ev->run_id ? strlen(ev->run_id) : 0;
	size_t klen = idlen + 1 + 8;
	size_t n = klen + kpl__v1__run_event__get_packed_size(ev) + NODE_OVERHEAD;

	if (ev->global_seq > 0)
		n += 8 + klen + NODE_OVERHEAD;
	return n;
}

int store_full_msg(struct store *s, char *buf, size_t size)
{
	return snprintf(buf, size,
			"the store is full: %zu of %zu bytes in use, the last %zu kept for "
			"state changes and deletes; delete runs (retention: --retain-days, "
			"--retain-runs) or raise --map-size",
			s->used + s->staged, s->map_size, s->reserve);
}

uint64_t store_events_decoded(struct store *s)
{
	return __atomic_load_n(&s->events_decoded, __ATOMIC_RELAXED);
}

int store_room_err(struct store *s, size_t need, struct kpl_err *err)
{
	char why[400];

	if (store_has_room(s, need))
		return 0;
	store_full_msg(s, why, sizeof why);
	return kpl_errf(err, KPL_EFULL, "%s", why);
}
