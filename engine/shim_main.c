/*
 * shim_main.c - kpl-shim, the shim (stages/shim.c) as a binary of its own.
 *
 * kpld starts `kpl-shim __shim DIR GRACE_MS [--sandboxed] -- ARGV...` for
 * every script attempt when this binary sits beside it (stages/proc.c), the
 * same argv it gives itself otherwise, so a restarted kpld recognises either
 * by its /proc cmdline. Linking libc only keeps its exec cheap: that exec is
 * on the path of every script stage.
 */
#include <stdio.h>
#include <string.h>

#include "stages/shim.h"
#include "stages/spawner.h"

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], SHIM_ARGV1) == 0)
		return shim_main(argc, argv);
	if (argc > 1 && strcmp(argv[1], SPAWNER_ARGV1) == 0)
		return spawner_main(argc, argv);
	fprintf(stderr, "kpl-shim is started by kpld for script stages; it takes no "
			"other command\n");
	return 2;
}
