#!/bin/sh
# with_fake.sh FAKE PROTO CMD [ARGS...]: runs CMD with KPL_SERVER pointing at
# a fresh tests/clients/fake_pipelines.py, which is stopped afterwards.
set -u
FAKE=$1
PROTO=$2
shift 2
T=${TEST_TMPDIR:-$(mktemp -d)}
/usr/bin/python3 "$FAKE" --proto "$PROTO" --lifetime 170 --step 0.05 \
	>"$T/with_fake.out" 2>"$T/with_fake.err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait 2>/dev/null' EXIT
i=0
while ! grep -q '^PORT=' "$T/with_fake.out" 2>/dev/null; do
	i=$((i + 1))
	if [ $i -gt 200 ] || ! kill -0 $pid 2>/dev/null; then
		echo "fake server did not start:" >&2
		cat "$T/with_fake.err" >&2
		exit 1
	fi
	sleep 0.1
done
KPL_SERVER=127.0.0.1:$(sed -n 's/^PORT=//p' "$T/with_fake.out")
export KPL_SERVER
"$@"
