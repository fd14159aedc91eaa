/*
 * proc.h - one command of a stage, run through the shim (stages/shim.h) so
 * that it outlives a kpld restart and runs exactly once.
 *
 * A kind starts a command in a directory of its own (the attempt's, or one
 * per step for a kind that runs several commands in turn). The shim claims
 * DIR/lock, runs the command detached from kpld and appends its output lines
 * to DIR/output; proc follows that file (inotify through uv_fs_event), hands
 * each line to the kind (by default as a staged log line) and saves the read
 * offset with stage_save_resume, so the lines and the offset land in one
 * commit. When the shim has ended and every line is read, proc calls the
 * kind's exit callback once, then frees itself.
 *
 * Resume data: proc records "PREFIX" followed by the offset in decimal
 * (stage_record_resume at spawn, stage_save_resume after each read). The
 * prefix is the kind's: a multi-step kind names its step there, and after a
 * restart parses it back, finds the step's directory and calls proc_resume
 * with the offset that follows.
 *
 * A multi-step kind replays deterministically: after a restart it resumes
 * the step its resume data names, and on that step's exit decides the next
 * one again from the exit status and the step's files only. proc_start on a
 * directory whose shim a previous kpld already started (its commit naming
 * the step never landed) attaches to that shim instead of starting another.
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_STAGES_PROC_H
#define KPL_STAGES_PROC_H

#include <spawn.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "stages/stage.h"

struct proc;

enum proc_end {
	PROC_EXITED,    /* code is the exit status */
	PROC_SIGNALED,  /* code is the signal */
	PROC_ERROR,     /* the shim could not run it; error says why */
	PROC_LOST,      /* the shim ended without an exit file (killed?) */
	PROC_END_LAST
};

struct proc_exit {
	enum proc_end how;
	int code;
	const char *error;      /* PROC_ERROR only; borrowed for the callback */
	bool cancelled;         /* proc_cancel was called */
};

struct proc_ops {
	/* One output line (len bytes, no newline, no '\r'). NULL: the line
	 * becomes a staged log line (stage_log_staged); a kind that sets it
	 * must stage the line itself if it wants it kept, and must not commit
	 * (the offset that follows rides in the next commit). */
	void (*line)(struct proc *p, Kpl__V1__LogStream stream, const char *line,
		     size_t len);
	/* The command has ended and all its output was delivered. Called once,
	 * never after proc_abandon. The proc is freed after it returns; the
	 * callback may start the next command (a new proc). */
	void (*exit)(struct proc *p, const struct proc_exit *e);
};

/*
 * Stage isolation (docs/security.md, "Stage isolation"): how proc runs
 * every command. PROC_SANDBOX_BWRAP: inside bubblewrap, which shows the
 * command a read-only view of the system, a private /tmp, /proc of its own
 * pid namespace and only its run's workspace read-write; the data directory
 * (all but that workspace) and the hidden paths are not there at all.
 * PROC_SANDBOX_NONE: as kpld's user, with everything kpld can reach (an
 * explicit choice of the operator, logged by kpld).
 */
enum proc_sandbox_mode {
	PROC_SANDBOX_BWRAP,
	PROC_SANDBOX_NONE,
};

struct proc_sandbox {
	enum proc_sandbox_mode mode;
	const char *bwrap;      /* the program (a path, or looked up on PATH) */
	const char *data_dir;   /* hidden; absolute */
	const char *const *hide;        /* more paths hidden; NULL-terminated */
	const char *const *bind;        /* paths shown read-write; NULL-terminated */
};

/* Sets how commands run; kpld calls it once at startup, before the engine
 * starts any stage. Copies sb. Loop thread. */
void proc_set_sandbox(const struct proc_sandbox *sb);
/* The current setting (borrowed). */
const struct proc_sandbox *proc_sandbox(void);
/* The program bwrap resolves to on PATH (or itself when it names a path),
 * malloc'd, or NULL with errno set when it cannot be run. */
char *proc_find_program(const char *prog, const char *path);

/*
 * What the sandbox allows a command beyond the usual (docs/security.md):
 * PROC_PROFILE_BUILDAH keeps root's capabilities (buildah mounts in its own
 * namespaces and chroots a Dockerfile's RUN lines, with fewer ones), a
 * private /run and /var/tmp, and DATA_DIR/buildah, buildah's storage,
 * read-write. When kpld is not root buildah runs rootless, in user
 * namespaces bwrap's would not allow: then it runs outside the sandbox.
 */
enum proc_profile {
	PROC_PROFILE_COMMAND,
	PROC_PROFILE_BUILDAH,
};

struct proc_spec {
	const char *dir;        /* created (with parents) if missing */
	char *const *argv;      /* argv[0] is looked up on PATH */
	char *const *env;       /* NULL: kpld's own environment */
	const char *cwd;        /* must exist */
	const char *what;       /* for kpld's own log lines; may be NULL */
	const char *resume_prefix; /* NULL: "" */
	int grace_ms;           /* SIGTERM to SIGKILL on cancel; 0: 5000 */
	enum proc_profile profile;
};

/*
 * Starts spec's command under a shim, or attaches to the shim a previous
 * kpld started in spec->dir. Records the shim's pid and PREFIX "0" as the
 * stage's resume data. On error returns a negative code with err saying
 * why (KPL_EINVAL for a missing cwd or program directory, KPL_EIO for
 * others, KPL_ESTATE for a directory a previous kpld gave up); ops and data
 * are then unused. *out is borrowed: valid until the exit callback returns
 * or proc_abandon.
 */
int proc_start(struct stage *st, const struct proc_spec *spec,
	       const struct proc_ops *ops, void *data, struct proc **out,
	       struct kpl_err *err);

/*
 * After a restart, re-attaches to the shim of dir, reading on from offset
 * (what the resume data said after the prefix). Returns KPL_ENOTFOUND when
 * the shim never claimed dir (proc claims it, so a late shim never runs the
 * command), KPL_ESTATE when it ended without reporting, KPL_EIO on others.
 */
int proc_resume(struct stage *st, const char *dir, const char *resume_prefix,
		uint64_t offset, const struct proc_ops *ops, void *data,
		struct proc **out, struct kpl_err *err);

/* SIGTERM to the shim (which forwards it to the command's process group
 * and escalates to SIGKILL after the grace); kpld SIGKILLs a shim that has
 * not ended 5 s after that. The exit callback follows with cancelled. */
void proc_cancel(struct proc *p);

/* kpld is stopping: stop following and free, leaving the shim running for
 * the next kpld. No callback follows. */
void proc_abandon(struct proc *p);

void *proc_data(struct proc *p);
struct stage *proc_stage(struct proc *p);
const char *proc_dir(struct proc *p);

/*
 * The last line the command wrote on stream (STDOUT or STDERR), read back
 * from DIR/output's last 64 KiB, or NULL; a malloc'd string, caller frees.
 * For messages built from a command's output (kinds pass them through
 * stage_redact) and small results (a `git rev-parse`).
 */
char *proc_last_line(struct proc *p, Kpl__V1__LogStream stream);
/* Like proc_last_line, but the first line of the tail that starts with
 * prefix (malloc'd, the caller's), or NULL if none does. */
char *proc_first_line_with(struct proc *p, Kpl__V1__LogStream stream, const char *prefix);

/*
 * The environment every stage command gets: kpld's environment without
 * its own KPL_* variables; KPL_RUN_ID, KPL_STAGE, KPL_ATTEMPT,
 * KPL_WORKSPACE, KPL_OUTPUTS (when outputs_path is not NULL); the params as
 * KPL_PARAM_<NAME>; then the pipeline's env and the stage's, expanded.
 * A NULL-terminated malloc'd array; free with proc_strv_free.
 */
char **proc_stage_env(struct stage *st, const char *outputs_path);
/* The same with KPL_WORKSPACE=workspace, and kpld's environment only when
 * inherit (a pod's environment is the stage's alone). */
char **proc_stage_env_at(struct stage *st, const char *outputs_path, const char *workspace,
			 bool inherit);
/* Sets NAME=value in a proc_stage_env array, replacing an earlier NAME. */
void proc_env_set(char ***env, const char *name, const char *value);
void proc_strv_free(char **v);

/* WORKSPACE/.kpl/STAGE.ATTEMPT (malloc'd). */
char *proc_attempt_dir(struct stage *st);

/*
 * The step runner, for kinds that run several commands in turn ("steps",
 * numbered from 0 in a fixed table of names): step N runs in
 * ATTEMPT_DIR/N-NAME with the resume prefix "N:", its command logged first
 * as "$ argv..." (staged, so it lands with the step's first record).
 *
 * The kind embeds a struct proc_steps in its attempt and hands the runner
 * the attempt's lifetime: the runner is the stage's impl, follows the
 * running step, ends the stage on cancel ("cancelled") and when the next
 * step cannot start (the error's message, redacted), and frees the attempt
 * through ops->free once the stage is done or abandoned. The kind decides
 * each step's command and, from a step's exit, which step comes next; on
 * resume that decision is made again from the exit and the step's files
 * (see the replay rule above).
 *
 * Threads: loop thread only.
 */
struct proc_steps;

/* What ops->exit returns when it has ended the stage. */
#define PROC_STEPS_END (-1)

struct proc_steps_ops {
	const char *const *names;       /* the step table: n_names entries */
	unsigned n_names;
	unsigned first;                 /* the step a new attempt starts with */
	/* Reads the stage's `with` into a new attempt (on start and on resume
	 * alike) with its proc_steps initialised (proc_steps_init); NULL with
	 * err set when it cannot. */
	struct proc_steps *(*attempt_new)(struct stage *st, struct kpl_err *err);
	/* Starts step n: builds its command and calls proc_steps_run, returning
	 * what that returns (or a negative code with err set). */
	int (*start)(struct proc_steps *s, unsigned n, struct kpl_err *err);
	/* Step s->step ended, and the stage was not cancelled; p is valid for
	 * proc_last_line. Returns the step to start next, or PROC_STEPS_END
	 * after ending the stage with proc_steps_finish or proc_steps_fail. */
	int (*exit)(struct proc_steps *s, struct proc *p, const struct proc_exit *e);
	/* Frees the kind's attempt (s with it): after the stage is done, on
	 * abandon, or when proc_steps_start or proc_steps_resume fails. */
	void (*free)(struct proc_steps *s);
	enum proc_profile profile;      /* every step's, as proc_spec's */
};

struct proc_steps {
	const struct proc_steps_ops *ops;
	struct stage *st;
	void *data;             /* the kind's; the runner never touches it */
	struct proc *proc;      /* the running step's; NULL between steps */
	unsigned step;          /* the step running, or the one that just ended */
	bool cancelled;
};

void proc_steps_init(struct proc_steps *s, struct stage *st,
		     const struct proc_steps_ops *ops, void *data);
/* The kind's start: a new attempt (ops->attempt_new) whose step ops->first
 * is started through ops->start, made the stage's impl. On error returns the
 * code, err saying why, with the attempt freed. */
int proc_steps_start(struct stage *st, const struct proc_steps_ops *ops,
		     struct kpl_err *err);
/* The kind's resume: a new attempt re-attached to the step the resume data
 * names (step 0 at offset 0 if none), made the stage's impl. KPL_ESTATE when
 * the attempt cannot be made again; KPL_ENOTFOUND when the step never began,
 * for any step: the engine then starts the attempt again from its first step.
 * So a step runner's steps must act only on the run's workspace (checkout,
 * build's local driver), never on anything outside kpld that a second run
 * of them would change twice. On error the attempt is freed. */
int proc_steps_resume(struct stage *st, const struct proc_steps_ops *ops,
		      struct kpl_err *err);
/* From ops->start: starts step n (argv run in cwd with env), like
 * proc_start. */
int proc_steps_run(struct proc_steps *s, unsigned n, char *const *argv,
		   char *const *env, const char *cwd, struct kpl_err *err);
/* Ends the stage with state and msg (may be NULL) and frees the attempt;
 * s is gone when it returns. */
void proc_steps_finish(struct proc_steps *s, Kpl__V1__StageState state, const char *msg);
/* Ends the stage FAILED with why step s->step failed, for a person:
 * "PROG NAME failed (exit status N): LAST STDERR LINE", "... killed by
 * signal N", the shim's error, or "... its process ended without reporting
 * an exit status (killed?)", redacted. p and e as ops->exit got them. */
void proc_steps_fail(struct proc_steps *s, struct proc *p, const struct proc_exit *e,
		     const char *prog);
/* The stage kind's cancel and abandon, for a kind whose impl is a
 * proc_steps. */
void proc_steps_cancel(struct stage *st);
void proc_steps_abandon(struct stage *st);

/* mkdir -p with mode 0700; 0 or a negative errno. */
int proc_mkdir_p(const char *path);

/*
 * What every process kpld starts to outlive it gets (a shim, the spawner):
 * appends stdin and stdout on /dev/null to fa (stderr stays kpld's) and
 * initialises at with its own session, default signal dispositions and an
 * empty mask. fa is the caller's, initialised; the caller destroys both.
 */
void proc_spawn_detached(posix_spawn_file_actions_t *fa, posix_spawnattr_t *at);

#endif
