#!/bin/sh
# Runs http_test under valgrind memcheck: any invalid access or definite
# leak fails it (base/http.c frees on close callbacks; this checks it).
set -eu
exec valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite \
	--error-exitcode=9 "$1"
