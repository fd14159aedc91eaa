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

struct proc_spec {
	const char *dir;        /* created (with parents) if missing */
	char *const *argv;      /* argv[0] is looked up on PATH */
	char *const *env;       /* NULL: kpld's own environment */
	const char *cwd;        /* must exist */
	const char *what;       /* for kpld's own log lines; may be NULL */
	const char *resume_prefix; /* NULL: "" */
	int grace_ms;           /* SIGTERM to SIGKILL on cancel; 0: 5000 */
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

/*
 * The environment every stage command gets: kpld's environment without
 * its own KPL_* variables; KPL_RUN_ID, KPL_STAGE, KPL_ATTEMPT,
 * KPL_WORKSPACE, KPL_OUTPUTS (when outputs_path is not NULL); the params as
 * KPL_PARAM_<NAME>; then the pipeline's env and the stage's, expanded.
 * A NULL-terminated malloc'd array; free with proc_strv_free.
 */
char **proc_stage_env(struct stage *st, const char *outputs_path);
/* Sets NAME=value in a proc_stage_env array, replacing an earlier NAME. */
void proc_env_set(char ***env, const char *name, const char *value);
void proc_strv_free(char **v);

/*
 * Kinds that run several commands in turn ("steps", numbered from 0 in a
 * fixed table of names): step N runs in ATTEMPT_DIR/N-NAME with the resume
 * prefix "N:".
 */
/* WORKSPACE/.kpl/STAGE.ATTEMPT (malloc'd). */
char *proc_attempt_dir(struct stage *st);
/* Logs "$ argv..." (staged, so it lands with the step's first record) and
 * starts step n like proc_start, in cwd with env. */
int proc_step_start(struct stage *st, unsigned n, const char *name,
		    char *const *argv, char *const *env, const char *cwd,
		    const struct proc_ops *ops, void *data, struct proc **out,
		    struct kpl_err *err);
/* After a restart: re-attaches to the step the resume data names (step 0
 * at offset 0 if none), like proc_resume; *n is that step. KPL_ENOTFOUND
 * only for step 0: a later step that never began is KPL_ESTATE (earlier
 * ones ran). names has n_names entries. */
int proc_step_resume(struct stage *st, const char *const *names, unsigned n_names,
		     const struct proc_ops *ops, void *data, struct proc **out,
		     unsigned *n, struct kpl_err *err);

/* mkdir -p with mode 0700; 0 or a negative errno. */
int proc_mkdir_p(const char *path);

/* Start time of pid in clock ticks since boot, 0 if it is not running. */
uint64_t proc_pid_start_time(int64_t pid);

#endif
