#!/bin/sh
# web_test.sh WEB_TEST_MJS ANY_FILE_IN_CLIENTS_WEB: the console's pure parts
# under node (Debian's nodejs, which ./dev installs).
set -eu
command -v node >/dev/null || { echo "node is missing: install nodejs (./dev does)" >&2; exit 1; }
exec node "$1" "$(dirname "$2")"
