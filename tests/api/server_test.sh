#!/bin/sh
# Runs server_test.py with Debian's python (grpcio, protobuf) against the
# echo_server given as $1. Bazel runs this from the runfiles tree.
# With "valgrind" as $2 the server runs under memcheck, and any memory error
# or definite leak (in any server process the test starts) fails the test;
# the logs are kept in the test outputs (bazel-testlogs/.../outputs).
set -e
server=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
if [ "$2" = valgrind ]; then
	tmp=${TEST_TMPDIR:-$(mktemp -d)}
	logs=${TEST_UNDECLARED_OUTPUTS_DIR:-$tmp}
	cat > "$tmp/vg_server" <<EOS
#!/bin/sh
exec valgrind -q --error-exitcode=99 --leak-check=full \
	--errors-for-leak-kinds=definite --log-file="$logs/vg.%p.log" "$server" "\$@"
EOS
	chmod +x "$tmp/vg_server"
	server=$tmp/vg_server
	export KPL_TEST_UNDER_VALGRIND=1
fi
exec /usr/bin/python3 tests/api/server_test.py "$server"
