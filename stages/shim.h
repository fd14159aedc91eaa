/*
 * shim.h - the process that runs a script's command for kpld (see shim.c):
 * `kpld __shim DIR GRACE_MS [--sandboxed] -- ARGV...` (--sandboxed: ARGV is
 * bwrap's, see shim.c).
 *
 * Files in DIR, the attempt's directory:
 *   lock    created O_EXCL and flock'ed by the shim for its life (pid inside);
 *           created by kpld instead when it gives up an attempt that never
 *           started, which stops a late shim from running the command
 *   output  records: '1' stdout, '2' stderr or 'S' note, the line, '\n'
 *   exit    "exit N", "signal N" or "error TEXT", written last (rename)
 */
#ifndef KPL_SHIM_H
#define KPL_SHIM_H

/* Exit status of a shim that found its attempt already claimed. */
#define SHIM_EXIT_CLAIMED 111

/* The argv[1] that makes kpld a shim. */
#define SHIM_ARGV1 "__shim"

/* Opens DIR (O_PATH) the way the shim does: below the workspace (DIR's
 * part before its last "/.kpl/") no symlink is followed. -1 with errno. */
int shim_open_dir(const char *dir);

/* mkdir -p DIR with mode 0700, from the deepest missing directory up: 0,
 * or -1 with errno. */
int shim_mkdir_p(const char *dir);

/* Runs the shim; returns the process exit status. */
int shim_main(int argc, char **argv);

#endif
