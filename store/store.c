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
		 "the LMDB map is full (map_size %zu bytes); raise store_options.map_size "
		 "(kpld's store map size setting) and restart",
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
		if (ikey && *ikey && strlen(ikey) <= STORE_MAX_IDEM_KEY_LEN) {
			MDB_val ik = { .mv_size = strlen(ikey), .mv_data = (void *)ikey };
			MDB_val iv;

			rc = mdb_get(txn, s->dbi[DB_IDEM], &ik, &iv);
			if (rc == 0 && iv.mv_size == idlen && memcmp(iv.mv_data, id, idlen) == 0)
				rc = mdb_del(txn, s->dbi[DB_IDEM], &ik, NULL);
			if (rc == MDB_NOTFOUND)
				rc = 0;
			if (rc)
				group_step_failed(g, "idem (delete run)", DB_IDEM, rc);
		} else {
			rc = 0;
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
	for (size_t i = 0; i < g->ncbs; i++)
		g->cbs[i].cb(g->cbs[i].data, code);
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

static int txn_get_run(struct store *s, MDB_txn *txn, const char *id, size_t len,
		       Kpl__Store__V1__RunRecord **out)
{
	MDB_val k = { .mv_size = len, .mv_data = (void *)id };
	MDB_val v;
	int rc = mdb_get(txn, s->dbi[DB_RUNS], &k, &v);

	*out = NULL;
	if (rc == MDB_NOTFOUND)
		return KPL_ENOTFOUND;
	if (rc)
		return lmdb_fail(s, "mdb_get (runs)", rc);
	*out = kpl__store__v1__run_record__unpack(NULL, v.mv_size, v.mv_data);
	if (!*out)
		return corrupt(s, "runs", id, len, "kpl.store.v1.RunRecord", v.mv_size);
	return 0;
}

int store_get_run(struct store *s, const char *run_id, Kpl__Store__V1__RunRecord **out)
{
	MDB_txn *txn;
	size_t len;
	int code;

	*out = NULL;
	if (!run_id_ok(run_id, &len))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	code = txn_get_run(s, txn, run_id, len, out);
	mdb_txn_abort(txn);
	return code;
}

/* Positions cur at the first key >= run id + 0x00 + n; returns the MDB code
 * (MDB_NOTFOUND past the end). prefix gets run id + 0x00. */
static int cursor_at_run(MDB_cursor *cur, unsigned char *key, const char *id, size_t idlen,
			 uint64_t n, int width, MDB_val *k, MDB_val *v)
{
	k->mv_size = run_key(key, id, idlen, n, width);
	k->mv_data = key;
	return mdb_cursor_get(cur, k, v, MDB_SET_RANGE);
}

/* 1 if k is in run id's range (starts with id + 0x00). */
static int in_run(const MDB_val *k, const unsigned char *prefix, size_t plen)
{
	return k->mv_size >= plen && memcmp(k->mv_data, prefix, plen) == 0;
}

int store_get_stages(struct store *s, const char *run_id,
		     Kpl__Store__V1__StageRecord ***out, size_t *n)
{
	unsigned char key[RUN_KEY_MAX];
	Kpl__Store__V1__StageRecord **recs = NULL;
	size_t nrecs = 0, cap = 0, idlen;
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	int rc, code;

	*out = NULL;
	*n = 0;
	if (!run_id_ok(run_id, &idlen))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_STAGES], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (stages)", rc);
		goto fail;
	}
	for (rc = cursor_at_run(cur, key, run_id, idlen, 0, 4, &k, &v); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__Store__V1__StageRecord *rec;

		if (!in_run(&k, key, idlen + 1))
			break;
		if (k.mv_size != idlen + 5) {
			code = corrupt(s, "stages", k.mv_data, k.mv_size, "a stage key", v.mv_size);
			goto fail;
		}
		rec = kpl__store__v1__stage_record__unpack(NULL, v.mv_size, v.mv_data);
		if (!rec) {
			code = corrupt(s, "stages", k.mv_data, k.mv_size,
				       "kpl.store.v1.StageRecord", v.mv_size);
			goto fail;
		}
		if (nrecs == cap) {
			cap = cap ? 2 * cap : 8;
			recs = kpl_realloc(recs, cap * sizeof *recs);
		}
		recs[nrecs++] = rec;
	}
	if (rc != MDB_NOTFOUND && rc != 0) {
		code = lmdb_fail(s, "mdb_cursor_get (stages)", rc);
		goto fail;
	}
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	*out = recs;
	*n = nrecs;
	return 0;
fail:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	store_free_stages(recs, nrecs);
	return code;
}

void store_free_stages(Kpl__Store__V1__StageRecord **stages, size_t n)
{
	for (size_t i = 0; i < n; i++)
		kpl__store__v1__stage_record__free_unpacked(stages[i], NULL);
	free(stages);
}

int store_get_pipeline(struct store *s, const char *run_id, char **text, size_t *len)
{
	MDB_txn *txn;
	MDB_val k, v;
	size_t idlen;
	int rc, code = 0;

	*text = NULL;
	*len = 0;
	if (!run_id_ok(run_id, &idlen))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	k.mv_size = idlen;
	k.mv_data = (void *)run_id;
	rc = mdb_get(txn, s->dbi[DB_PIPELINES], &k, &v);
	if (rc == MDB_NOTFOUND) {
		code = KPL_ENOTFOUND;
	} else if (rc) {
		code = lmdb_fail(s, "mdb_get (pipelines)", rc);
	} else {
		*text = kpl_malloc(v.mv_size + 1);
		memcpy(*text, v.mv_data, v.mv_size);
		(*text)[v.mv_size] = '\0';
		*len = v.mv_size;
	}
	mdb_txn_abort(txn);
	return code;
}

int store_find_idem(struct store *s, const char *key, char **run_id)
{
	MDB_txn *txn;
	MDB_val k, v;
	size_t klen, idlen;
	int rc, code = 0;

	*run_id = NULL;
	if (!idem_key_ok(key, &klen))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	k.mv_size = klen;
	k.mv_data = (void *)key;
	rc = mdb_get(txn, s->dbi[DB_IDEM], &k, &v);
	if (rc == MDB_NOTFOUND) {
		code = KPL_ENOTFOUND;
	} else if (rc) {
		code = lmdb_fail(s, "mdb_get (idem)", rc);
	} else {
		*run_id = kpl_strndup(v.mv_data, v.mv_size);
		if (!run_id_ok(*run_id, &idlen) || idlen != v.mv_size) {
			free(*run_id);
			*run_id = NULL;
			code = corrupt(s, "idem", key, klen, "a run id", v.mv_size);
		}
	}
	mdb_txn_abort(txn);
	return code;
}

int store_read_events(struct store *s, const char *run_id, uint64_t from_seq,
		      size_t max, store_event_fn fn, void *data)
{
	unsigned char key[RUN_KEY_MAX];
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	size_t idlen, count = 0;
	int rc, code = 0;

	if (!run_id_ok(run_id, &idlen))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_EVENTS], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (events)", rc);
		goto out;
	}
	for (rc = cursor_at_run(cur, key, run_id, idlen, from_seq, 8, &k, &v); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__V1__RunEvent *ev;
		int stop;

		if (!in_run(&k, key, idlen + 1) || (max && count >= max))
			break;
		if (k.mv_size != idlen + 9) {
			code = corrupt(s, "events", k.mv_data, k.mv_size, "an event key", v.mv_size);
			goto out;
		}
		ev = kpl__v1__run_event__unpack(NULL, v.mv_size, v.mv_data);
		if (!ev) {
			code = corrupt(s, "events", k.mv_data, k.mv_size, "kpl.v1.RunEvent",
				       v.mv_size);
			goto out;
		}
		stop = fn(data, ev);
		kpl__v1__run_event__free_unpacked(ev, NULL);
		count++;
		if (stop) {
			code = stop;
			goto out;
		}
	}
	if (rc != MDB_NOTFOUND && rc != 0)
		code = lmdb_fail(s, "mdb_cursor_get (events)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

uint64_t store_last_event_seq(struct store *s, const char *run_id)
{
	unsigned char key[RUN_KEY_MAX];
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	size_t idlen;
	uint64_t seq = 0;
	int rc;

	if (!run_id_ok(run_id, &idlen) || read_begin(s, &txn))
		return 0;
	rc = mdb_cursor_open(txn, s->dbi[DB_EVENTS], &cur);
	if (rc) {
		lmdb_fail(s, "mdb_cursor_open (events)", rc);
		goto out;
	}
	/* The first key past the run's last possible event, then one back. */
	rc = cursor_at_run(cur, key, run_id, idlen, UINT64_MAX, 8, &k, &v);
	if (rc == 0 && !(k.mv_size == idlen + 9 && memcmp(k.mv_data, key, idlen + 9) == 0))
		rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
	else if (rc == MDB_NOTFOUND)
		rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	if (rc == 0 && in_run(&k, key, idlen + 1) && k.mv_size == idlen + 9)
		seq = get_be64((const unsigned char *)k.mv_data + idlen + 1);
	else if (rc != 0 && rc != MDB_NOTFOUND)
		lmdb_fail(s, "mdb_cursor_get (events)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return seq;
}

uint64_t store_last_global_seq(struct store *s)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	uint64_t gseq = 0;
	int rc;

	if (read_begin(s, &txn))
		return 0;
	rc = mdb_cursor_open(txn, s->dbi[DB_GEVENTS], &cur);
	if (rc) {
		lmdb_fail(s, "mdb_cursor_open (gevents)", rc);
		goto out;
	}
	rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	if (rc == 0 && k.mv_size == 8)
		gseq = get_be64(k.mv_data);
	else if (rc == 0)
		kpl_error(SUB, "%s: the last gevents key is %zu bytes, not 8", s->dir, k.mv_size);
	else if (rc != MDB_NOTFOUND)
		lmdb_fail(s, "mdb_cursor_get (gevents)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return gseq;
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

int store_read_global(struct store *s, uint64_t from_gseq, size_t max, store_event_fn fn,
		      void *data)
{
	unsigned char gkey[8];
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k = { .mv_size = sizeof gkey, .mv_data = gkey }, v, ek, ev_val;
	size_t count = 0;
	int rc, code;

	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_GEVENTS], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (gevents)", rc);
		goto out;
	}
	put_be64(gkey, from_gseq);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__V1__RunEvent *ev;
		uint64_t gseq;
		int stop;

		if (max && count >= max)
			break;
		if (k.mv_size != 8 || !gevent_val_ok(&v)) {
			kpl_error(SUB, "%s: a gevents record (key %zu bytes, value %zu bytes) is not "
				       "global seq -> event key",
				  s->dir, k.mv_size, v.mv_size);
			code = KPL_ECORRUPT;
			goto out;
		}
		gseq = get_be64(k.mv_data);
		ek = v;
		rc = mdb_get(txn, s->dbi[DB_EVENTS], &ek, &ev_val);
		if (rc == MDB_NOTFOUND)
			continue; /* its run was deleted */
		if (rc) {
			code = lmdb_fail(s, "mdb_get (events)", rc);
			goto out;
		}
		ev = kpl__v1__run_event__unpack(NULL, ev_val.mv_size, ev_val.mv_data);
		if (!ev) {
			code = corrupt(s, "events", ek.mv_data, ek.mv_size, "kpl.v1.RunEvent",
				       ev_val.mv_size);
			goto out;
		}
		/* An event written again under a new global seq leaves its old
		 * entry behind: only the entry the event names counts. */
		if (ev->global_seq != gseq) {
			kpl__v1__run_event__free_unpacked(ev, NULL);
			continue;
		}
		stop = fn(data, ev);
		kpl__v1__run_event__free_unpacked(ev, NULL);
		count++;
		if (stop) {
			code = stop;
			goto out;
		}
	}
	if (rc != MDB_NOTFOUND && rc != 0)
		code = lmdb_fail(s, "mdb_cursor_get (gevents)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

/* Decodes the run record at (k, v) and calls fn with it: fn's value, or
 * KPL_ECORRUPT if it does not decode. */
static int call_run(struct store *s, const MDB_val *k, const MDB_val *v, store_run_fn fn,
		    void *data)
{
	Kpl__Store__V1__RunRecord *rec =
		kpl__store__v1__run_record__unpack(NULL, v->mv_size, v->mv_data);
	int stop;

	if (!rec)
		return corrupt(s, "runs", k->mv_data, k->mv_size, "kpl.store.v1.RunRecord",
			       v->mv_size);
	stop = fn(data, rec);
	kpl__store__v1__run_record__free_unpacked(rec, NULL);
	return stop;
}

int store_list_runs(struct store *s, const char *after, store_run_fn fn, void *data)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	size_t alen = 0;
	int rc, code = 0;

	if (after && *after && !run_id_ok(after, &alen))
		return KPL_EINVAL;
	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_RUNS], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (runs)", rc);
		goto out;
	}
	if (alen) {
		/* First key >= after, then one back: the newest run older than
		 * after. Nothing >= after means every run is older: start at the
		 * last. */
		k.mv_size = alen;
		k.mv_data = (void *)after;
		rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (rc == 0)
			rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
		else if (rc == MDB_NOTFOUND)
			rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	} else {
		rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	}
	for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_PREV)) {
		code = call_run(s, &k, &v, fn, data);
		if (code)
			goto out;
	}
	if (rc != MDB_NOTFOUND)
		code = lmdb_fail(s, "mdb_cursor_get (runs)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

int store_list_runs_oldest(struct store *s, store_run_fn fn, void *data)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	int rc, code;

	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_RUNS], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (runs)", rc);
		goto out;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		code = call_run(s, &k, &v, fn, data);
		if (code)
			goto out;
	}
	if (rc != MDB_NOTFOUND)
		code = lmdb_fail(s, "mdb_cursor_get (runs)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

int store_list_active(struct store *s, store_run_fn fn, void *data)
{
	char id[STORE_MAX_RUN_ID_LEN + 1];
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	size_t idlen;
	int rc, code = 0;

	code = read_begin(s, &txn);
	if (code)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_ACTIVE], &cur);
	if (rc) {
		code = lmdb_fail(s, "mdb_cursor_open (active)", rc);
		goto out;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__Store__V1__RunRecord *rec;
		int stop;

		if (k.mv_size > STORE_MAX_RUN_ID_LEN) {
			code = corrupt(s, "active", k.mv_data, k.mv_size, "a run id key", v.mv_size);
			goto out;
		}
		memcpy(id, k.mv_data, k.mv_size);
		id[k.mv_size] = '\0';
		if (!run_id_ok(id, &idlen) || idlen != k.mv_size) {
			code = corrupt(s, "active", k.mv_data, k.mv_size, "a run id key", v.mv_size);
			goto out;
		}
		code = txn_get_run(s, txn, id, idlen, &rec);
		if (code == KPL_ENOTFOUND) {
			/* Both are written in one group, so this is a kpl bug; the
			 * run is gone either way and there is nothing to resume. */
			kpl_warn(SUB, "%s: active run %s has no run record; skipping it", s->dir,
				 id);
			code = 0;
			continue;
		}
		if (code)
			goto out;
		stop = fn(data, rec);
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
		if (stop) {
			code = stop;
			goto out;
		}
	}
	if (rc != MDB_NOTFOUND)
		code = lmdb_fail(s, "mdb_cursor_get (active)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
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

int store_list_secrets(struct store *s, store_secret_fn fn, void *data)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code;
	char name[65];

	if ((code = read_begin(s, &txn)) != 0)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_SECRETS], &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (secrets)", rc);
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size == 0 || k.mv_size >= sizeof name)
			continue;
		memcpy(name, k.mv_data, k.mv_size);
		name[k.mv_size] = '\0';
		if ((code = fn(data, name, v.mv_data, v.mv_size)) != 0)
			break;
	}
	if (rc && rc != MDB_NOTFOUND)
		code = lmdb_fail(s, "mdb_cursor_get (secrets)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

/* --- Release history. --- */

#define RELEASE_TARGET_MAX 300

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
	char key[RELEASE_TARGET_MAX + 9];
	size_t klen, vlen;
	struct store_op *op;

	if (!rec->target || !*rec->target || strlen(rec->target) > RELEASE_TARGET_MAX)
		BUG("store_stage_release: bad target");
	klen = release_key(key, rec->target, rec->seq);
	vlen = kpl__store__v1__release_record__get_packed_size(rec);
	op = stage_op(s, DB_RELEASES, key, klen, vlen, OP_PUT);
	kpl__store__v1__release_record__pack(rec, (uint8_t *)op->val);
}

int store_list_releases(struct store *s, const char *target,
			Kpl__Store__V1__ReleaseRecord ***out, size_t *n)
{
	char key[RELEASE_TARGET_MAX + 9];
	size_t tlen = strlen(target), cap = 0;
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code = 0;

	*out = NULL;
	*n = 0;
	if (tlen == 0 || tlen > RELEASE_TARGET_MAX)
		return KPL_EINVAL;
	if ((code = read_begin(s, &txn)) != 0)
		return code;
	if ((rc = mdb_cursor_open(txn, s->dbi[DB_RELEASES], &cur)) != 0) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (releases)", rc);
	}
	/* Newest first: seek past the target's last key, then walk back. */
	k.mv_size = release_key(key, target, UINT64_MAX);
	k.mv_data = key;
	rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	if (rc == MDB_NOTFOUND)
		rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	else if (rc == 0 && !(k.mv_size == tlen + 9 && memcmp(k.mv_data, key, tlen + 9) == 0))
		rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
	for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_PREV)) {
		Kpl__Store__V1__ReleaseRecord *r;
		if (k.mv_size != tlen + 9 || memcmp(k.mv_data, target, tlen) ||
		    ((char *)k.mv_data)[tlen] != '\0')
			break;
		r = kpl__store__v1__release_record__unpack(NULL, v.mv_size, v.mv_data);
		if (!r) {
			code = KPL_ECORRUPT;
			break;
		}
		if (*n == cap) {
			cap = cap ? cap * 2 : 8;
			*out = kpl_realloc(*out, cap * sizeof **out);
		}
		(*out)[(*n)++] = r;
	}
	if (rc && rc != MDB_NOTFOUND && !code)
		code = lmdb_fail(s, "mdb_cursor_get (releases)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	if (code) {
		store_free_releases(*out, *n);
		*out = NULL;
		*n = 0;
	}
	return code;
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

int store_get_token(struct store *s, const char *hash_hex,
		    Kpl__Store__V1__TokenRecord **out)
{
	MDB_txn *txn;
	MDB_val k, v;
	int rc, code;

	*out = NULL;
	if (!token_hash_ok(hash_hex))
		return KPL_EINVAL;
	if ((code = read_begin(s, &txn)) != 0)
		return code;
	k.mv_data = (void *)hash_hex;
	k.mv_size = TOKEN_HASH_LEN;
	rc = mdb_get(txn, s->dbi[DB_TOKENS], &k, &v);
	if (rc == MDB_NOTFOUND)
		code = KPL_ENOTFOUND;
	else if (rc)
		code = lmdb_fail(s, "mdb_get (tokens)", rc);
	else if (!(*out = kpl__store__v1__token_record__unpack(NULL, v.mv_size, v.mv_data)))
		code = KPL_ECORRUPT;
	mdb_txn_abort(txn);
	return code;
}

int store_list_tokens(struct store *s, store_token_fn fn, void *data)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code;
	char hash[TOKEN_HASH_LEN + 1];

	if ((code = read_begin(s, &txn)) != 0)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_TOKENS], &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (tokens)", rc);
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__Store__V1__TokenRecord *rec;

		if (k.mv_size != TOKEN_HASH_LEN)
			continue;
		memcpy(hash, k.mv_data, TOKEN_HASH_LEN);
		hash[TOKEN_HASH_LEN] = '\0';
		rec = kpl__store__v1__token_record__unpack(NULL, v.mv_size, v.mv_data);
		if (!rec) {
			code = KPL_ECORRUPT;
			break;
		}
		code = fn(data, hash, rec);
		kpl__store__v1__token_record__free_unpacked(rec, NULL);
		if (code)
			break;
	}
	if (rc && rc != MDB_NOTFOUND)
		code = lmdb_fail(s, "mdb_cursor_get (tokens)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
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

int store_list_notify(struct store *s, store_notify_fn fn, void *data)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code;

	if ((code = read_begin(s, &txn)) != 0)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_NOTIFY], &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (notify)", rc);
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__Store__V1__NotifyRecord *rec;

		if (k.mv_size != 12)
			continue;
		rec = kpl__store__v1__notify_record__unpack(NULL, v.mv_size, v.mv_data);
		if (!rec) {
			/* One bad record must not stop every other notification. */
			kpl_error(SUB, "%s: record notify/%llu#%u does not decode as a "
				  "NotifyRecord (%zu bytes); skipped", s->dir,
				  (unsigned long long)get_be64(k.mv_data),
				  get_be32((unsigned char *)k.mv_data + 8), v.mv_size);
			continue;
		}
		code = fn(data, get_be64(k.mv_data), get_be32((unsigned char *)k.mv_data + 8),
			  rec);
		kpl__store__v1__notify_record__free_unpacked(rec, NULL);
		if (code)
			break;
	}
	if (rc && rc != MDB_NOTFOUND && !code)
		code = lmdb_fail(s, "mdb_cursor_get (notify)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}

/* --- Audit log. --- */

/* The last committed audit seq, 0 if none (or the read fails: logged). */
static uint64_t audit_last(struct store *s)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	MDB_val k, v;
	uint64_t seq = 0;
	int rc;

	if (read_begin(s, &txn))
		return 0;
	rc = mdb_cursor_open(txn, s->dbi[DB_AUDIT], &cur);
	if (rc) {
		lmdb_fail(s, "mdb_cursor_open (audit)", rc);
		goto out;
	}
	rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	if (rc == 0 && k.mv_size == 8)
		seq = get_be64(k.mv_data);
	else if (rc && rc != MDB_NOTFOUND)
		lmdb_fail(s, "mdb_cursor_get (audit)", rc);
out:
	if (cur)
		mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return seq;
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

int store_read_audit(struct store *s, uint64_t from_seq, size_t max,
		     store_audit_fn fn, void *data)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	unsigned char key[8];
	size_t n = 0;
	int rc, code;

	if ((code = read_begin(s, &txn)) != 0)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_AUDIT], &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (audit)", rc);
	}
	put_be64(key, from_seq);
	k.mv_data = key;
	k.mv_size = sizeof key;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && (!max || n < max);
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__V1__RunEvent *ev;

		if (k.mv_size != 8)
			continue;
		ev = kpl__v1__run_event__unpack(NULL, v.mv_size, v.mv_data);
		if (!ev) {
			code = KPL_ECORRUPT;
			break;
		}
		n++;
		code = fn(data, get_be64(k.mv_data), ev);
		kpl__v1__run_event__free_unpacked(ev, NULL);
		if (code)
			break;
	}
	if (rc && rc != MDB_NOTFOUND && !code)
		code = lmdb_fail(s, "mdb_cursor_get (audit)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
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

int store_get_registered(struct store *s, const char *name,
			 Kpl__V1__RegisteredPipeline **out)
{
	MDB_txn *txn;
	MDB_val k, v;
	int rc, code;

	*out = NULL;
	if (!registered_name_ok(name))
		return KPL_EINVAL;
	if ((code = read_begin(s, &txn)) != 0)
		return code;
	k.mv_data = (void *)name;
	k.mv_size = strlen(name);
	rc = mdb_get(txn, s->dbi[DB_PIPELINES_REGISTERED], &k, &v);
	if (rc == MDB_NOTFOUND)
		code = KPL_ENOTFOUND;
	else if (rc)
		code = lmdb_fail(s, "mdb_get (pipelines_registered)", rc);
	else if (!(*out = kpl__v1__registered_pipeline__unpack(NULL, v.mv_size, v.mv_data)))
		code = KPL_ECORRUPT;
	mdb_txn_abort(txn);
	return code;
}

int store_list_registered(struct store *s, store_registered_fn fn, void *data)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, code;

	if ((code = read_begin(s, &txn)) != 0)
		return code;
	rc = mdb_cursor_open(txn, s->dbi[DB_PIPELINES_REGISTERED], &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return lmdb_fail(s, "mdb_cursor_open (pipelines_registered)", rc);
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		Kpl__V1__RegisteredPipeline *rec =
			kpl__v1__registered_pipeline__unpack(NULL, v.mv_size, v.mv_data);

		if (!rec) {
			code = KPL_ECORRUPT;
			break;
		}
		code = fn(data, rec);
		kpl__v1__registered_pipeline__free_unpacked(rec, NULL);
		if (code)
			break;
	}
	if (rc && rc != MDB_NOTFOUND && !code)
		code = lmdb_fail(s, "mdb_cursor_get (pipelines_registered)", rc);
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	return code;
}
