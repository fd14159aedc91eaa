#!/bin/sh
# The Kubernetes/Istio emulator (kube/kube_emulator.py) checked with the real, installed kubectl:
# discovery, get, apply, set image, rollout status/undo, the progress deadline, Istio CRD
# validation, watch (kubectl and raw: history replay, BOOKMARK, 410), optimistic locking,
# /metrics, faults, TLS + bearer token + client certificates, SIGTERM.
#
# Runs under Bazel (sh_test //tests/emulators:kube_test) or directly: sh tests/emulators/kube_test.sh
set -u

here=$(cd "$(dirname "$0")" && pwd)
emu="$here/kube/kube_emulator.py"
PY=/usr/bin/python3
KUBECTL=${KUBECTL:-$(command -v kubectl || echo /usr/bin/kubectl)}
work=${TEST_TMPDIR:-$(mktemp -d)}/kube_test
rm -rf "$work" && mkdir -p "$work" || exit 1
export HOME="$work"            # kubectl's discovery cache goes here, not into the real home
export KUBECONFIG="$work/kubeconfig"

fails=0
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null; done
}
trap cleanup EXIT INT TERM

pass() { echo "ok   - $1"; }
fail() { echo "FAIL - $1"; fails=$((fails + 1)); }
# expect_in NAME NEEDLE FILE: FILE contains NEEDLE (fixed string)
expect_in() {
    if grep -qF -- "$2" "$3"; then pass "$1"; else fail "$1: '$2' not in output:"; sed 's/^/    | /' "$3"; fi
}
# expect_re NAME REGEX FILE: a line of FILE matches the extended REGEX
expect_re() {
    if grep -qE -- "$2" "$3"; then pass "$1"; else fail "$1: /$2/ not in output:"; sed 's/^/    | /' "$3"; fi
}
expect_eq() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1: expected '$3', got '$2'"; fi
}
k() { "$KUBECTL" "$@"; }

# start_emulator NAME ARGS...: starts it, sets $port and $pid
start_emulator() {
    name=$1; shift
    rm -f "$work/$name.port"
    "$PY" "$emu" --port-file "$work/$name.port" --lifetime 180 "$@" >"$work/$name.out" 2>"$work/$name.err" &
    pid=$!
    pids="$pids $pid"
    i=0
    while [ ! -s "$work/$name.port" ]; do     # waiting for a process to start listening
        i=$((i + 1))
        if [ $i -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "emulator $name did not start:"; cat "$work/$name.err"; exit 1
        fi
        sleep 0.1
    done
    port=$(cat "$work/$name.port")
    grep -q "^PORT=$port\$" "$work/$name.out" || fail "$name prints PORT=$port"
}

start_emulator plain --pace 0.2 --traffic-interval 0.2 --bookmark-interval 0.5
base="http://127.0.0.1:$port"
cat >"$KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: emu
  cluster: {server: "$base"}
users:
- name: u
  user: {}
contexts:
- name: emu
  context: {cluster: emu, user: u, namespace: default}
current-context: emu
EOF
echo "# emulator on $base, $("$KUBECTL" version --client 2>/dev/null | head -1)"

# --- discovery and namespaces
k version >"$work/out" 2>&1
expect_in "kubectl version sees the server" "Server Version: v1.32" "$work/out"
k api-resources >"$work/out" 2>&1
expect_re "api-resources lists deployments" "^deployments +deploy +apps/v1 +true +Deployment$" "$work/out"
expect_in "api-resources lists virtualservices" "virtualservices" "$work/out"
k get ns >"$work/out" 2>&1
expect_in "get ns (table)" "default           Active" "$work/out"

# --- apply a Deployment + Service, rollout status
cat >"$work/app.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  progressDeadlineSeconds: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v1}
    spec:
      containers:
      - name: web
        image: registry.example/web:1.0
        ports:
        - containerPort: 8080
        env:
        - {name: MODE, value: prod}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 8080}
EOF
k apply -f "$work/app.yaml" >"$work/out" 2>&1
expect_in "apply creates the deployment" "deployment.apps/web created" "$work/out"
expect_in "apply creates the service" "service/web created" "$work/out"
k rollout status deploy/web --timeout=30s >"$work/out" 2>&1
expect_in "rollout status (first rollout)" 'deployment "web" successfully rolled out' "$work/out"
expect_eq "all replicas ready" "$(k get deploy web -o jsonpath='{.status.readyReplicas}/{.status.availableReplicas}/{.status.observedGeneration}')" "2/2/1"
sed 's/progressDeadlineSeconds: 2/progressDeadlineSecond: 2/' "$work/app.yaml" >"$work/typo.yaml"
k apply -f "$work/typo.yaml" >"$work/out" 2>&1
expect_in "strict field validation (kubectl's default)" 'strict decoding error: unknown field "spec.progressDeadlineSecond"' "$work/out"
k apply -f "$work/app.yaml" >"$work/out" 2>&1
expect_in "re-apply is a no-op" "deployment.apps/web unchanged" "$work/out"
expect_eq "pods carry the template labels" "$(k get pods -l app=web,version=v1 -o name | wc -l | tr -d ' ')" "2"

# --- set image: a second revision
k set image deploy/web web=registry.example/web:2.0 >"$work/out" 2>&1
expect_in "set image" "deployment.apps/web image updated" "$work/out"
k rollout status deploy/web --timeout=30s >"$work/out" 2>&1
expect_in "rollout status after set image" 'deployment "web" successfully rolled out' "$work/out"
expect_eq "two ReplicaSets, revisions 1 and 2" \
    "$(k get rs -l app=web -o jsonpath='{range .items[*]}{.metadata.annotations.deployment\.kubernetes\.io/revision}:{.spec.replicas} {end}' | tr ' ' '\n' | sort | tr '\n' ' ')" \
    "1:0 2:2 "
k get rs >"$work/out" 2>&1
expect_in "get rs shows the scaled-down revision" "0         0         0" "$work/out"

# --- rollout undo back to the first image
k rollout undo deploy/web >"$work/out" 2>&1
expect_in "rollout undo" "deployment.apps/web rolled back" "$work/out"
k rollout status deploy/web --timeout=30s >"$work/out" 2>&1
expect_in "rollout status after undo" 'deployment "web" successfully rolled out' "$work/out"
expect_eq "undo restored the first image" "$(k get deploy web -o jsonpath='{.spec.template.spec.containers[0].image}')" "registry.example/web:1.0"
expect_eq "undo made the old ReplicaSet revision 3" "$(k get deploy web -o jsonpath='{.metadata.annotations.deployment\.kubernetes\.io/revision}')" "3"
k rollout undo deploy/web --to-revision=3 >"$work/out" 2>&1
expect_in "undo to the current revision is skipped" "skipped rollback (current template already matches revision 3)" "$work/out"

# --- a crashloop image never becomes ready: progress deadline
k set image deploy/web web=registry.example/web:crashloop >/dev/null 2>&1
if k rollout status deploy/web --timeout=30s >"$work/out" 2>&1; then fail "rollout status of a crashloop image must fail"; else pass "rollout status of a crashloop image fails"; fi
expect_in "progress deadline message" 'error: deployment "web" exceeded its progress deadline' "$work/out"
expect_eq "Progressing condition" "$(k get deploy web -o jsonpath='{.status.conditions[?(@.type=="Progressing")].reason}/{.status.conditions[?(@.type=="Progressing")].status}')" "ProgressDeadlineExceeded/False"
k get pods >"$work/out" 2>&1
expect_in "crashloop pod shown as CrashLoopBackOff" "CrashLoopBackOff" "$work/out"
k rollout undo deploy/web >/dev/null 2>&1
k rollout status deploy/web --timeout=30s >"$work/out" 2>&1
expect_in "undo recovers from the failed rollout" 'deployment "web" successfully rolled out' "$work/out"

# --- Istio CRDs
cat >"$work/istio.yaml" <<'EOF'
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  subsets:
  - {name: stable, labels: {version: v1}}
  - {name: canary, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - name: primary
    route:
    - destination: {host: web, subset: stable}
      weight: 90
    - destination: {host: web, subset: canary}
      weight: 10
EOF
k apply -f "$work/istio.yaml" >"$work/out" 2>&1
expect_in "apply DestinationRule" "destinationrule.networking.istio.io/web created" "$work/out"
expect_in "apply VirtualService 90/10" "virtualservice.networking.istio.io/web created" "$work/out"
sed 's/weight: 10/weight: 20/' "$work/istio.yaml" >"$work/istio-bad.yaml"
if k apply -f "$work/istio-bad.yaml" >"$work/out" 2>&1; then fail "90/20 must be rejected"; else pass "90/20 rejected"; fi
expect_in "rejection message" 'The VirtualService "web" is invalid: spec.http[0].route: Invalid value: total destination weight 110 != 100' "$work/out"
expect_eq "weights unchanged" "$(k get vs web -o jsonpath='{.spec.http[0].route[*].weight}')" "90 10"
k get virtualservices.v1alpha3.networking.istio.io web >"$work/out" 2>&1
expect_in "VirtualService served as v1alpha3 too" 'web               [web]' "$work/out"
curl -s -X PATCH -H 'Content-Type: application/strategic-merge-patch+json' -d '{"spec":{}}' \
    "$base/apis/networking.istio.io/v1/namespaces/default/virtualservices/web" >"$work/out"
expect_in "no strategic merge patch for CRDs (415)" '"code": 415' "$work/out"
curl -s -X PUT -H 'Content-Type: application/json' \
    -d '{"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"web"},"spec":{"hosts":["web"]}}' \
    "$base/apis/networking.istio.io/v1/namespaces/default/virtualservices/web" >"$work/out"
expect_in "PUT of a CR without resourceVersion is 422" "must be specified for an update" "$work/out"

# --- watch: kubectl get --watch sees the initial state and a change
k get deploy web --watch --output-watch-events --request-timeout=4s >"$work/watch.out" 2>&1 &
wpid=$!
i=0
while ! grep -q ADDED "$work/watch.out" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done   # the watch is up
k scale deploy/web --replicas=3 >/dev/null 2>&1
k rollout status deploy/web --timeout=30s >/dev/null 2>&1
wait $wpid
expect_in "get --watch: initial ADDED" "ADDED      web    2/2" "$work/watch.out"
expect_in "get --watch: MODIFIED on scale" "MODIFIED   web    3/3" "$work/watch.out"

# raw watch from an old resourceVersion: replayed history, bookmarks, then 410 after compaction
rv=$(k get deploy web -o jsonpath='{.metadata.resourceVersion}')
k annotate deploy web note=watched >/dev/null 2>&1
k get --raw "/apis/apps/v1/namespaces/default/deployments?watch=1&resourceVersion=$rv&allowWatchBookmarks=true&timeoutSeconds=1&fieldSelector=metadata.name%3Dweb" >"$work/out" 2>&1
expect_in "raw watch replays the change after rv $rv" '"type": "MODIFIED"' "$work/out"
expect_in "raw watch event carries the annotation" '"note": "watched"' "$work/out"
expect_in "raw watch sends BOOKMARK" '"type": "BOOKMARK"' "$work/out"
curl -s -X POST "$base/emulator/compact" >/dev/null
k get --raw "/apis/apps/v1/namespaces/default/deployments?watch=1&resourceVersion=$rv&timeoutSeconds=1" >"$work/out" 2>&1
expect_in "watch from a compacted rv: ERROR 410 Expired" '"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version' "$work/out"
expect_in "410 code" '"reason": "Expired", "code": 410' "$work/out"

# --- optimistic concurrency: replace with a stale resourceVersion
k get deploy web -o json >"$work/stale.json"
k annotate deploy web touched=yes >/dev/null 2>&1
if k replace -f "$work/stale.json" >"$work/out" 2>&1; then fail "stale replace must fail"; else pass "stale replace fails"; fi
expect_in "stale replace: Conflict" 'Error from server (Conflict): error when replacing' "$work/out"
expect_in "stale replace: message" 'Operation cannot be fulfilled on deployments.apps "web": the object has been modified; please apply your changes to the latest version and try again' "$work/out"
k get deploy nosuch >"$work/out" 2>&1
expect_in "NotFound" 'Error from server (NotFound): deployments.apps "nosuch" not found' "$work/out"
k create -f "$work/app.yaml" >"$work/out" 2>&1
expect_in "AlreadyExists" 'Error from server (AlreadyExists): error when creating' "$work/out"
expect_in "AlreadyExists message" 'deployments.apps "web" already exists' "$work/out"
k create deployment other --image=x >"$work/out" 2>&1
expect_in "protobuf bodies (typed kubectl create) get 415" "the emulator decodes JSON only" "$work/out"

# --- metrics: synthetic Istio traffic, per version, with an error rate
curl -s -X POST -d '{"version":"v1","rate":0.5}' "$base/emulator/error-rate" >/dev/null
i=0
while ! curl -s "$base/metrics" | grep -q 'response_code="500"' && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
curl -s "$base/metrics" >"$work/metrics"
expect_in "metrics: istio_requests_total for v1" 'istio_requests_total{reporter="destination",source_workload="unknown",source_workload_namespace="unknown",destination_workload="web",destination_workload_namespace="default",destination_app="web",destination_version="v1"' "$work/metrics"
expect_in "metrics: 500s after the error-rate control" 'response_code="500"' "$work/metrics"
expect_in "metrics: duration histogram" 'istio_request_duration_milliseconds_bucket{' "$work/metrics"
expect_in "metrics: +Inf bucket" 'le="+Inf"}' "$work/metrics"
expect_in "metrics: TYPE line" '# TYPE istio_request_duration_milliseconds histogram' "$work/metrics"

# --- fault injection
curl -s -X POST -d '{"path_prefix":"/api/v1/namespaces","count":1,"status":503}' "$base/emulator/fault" >/dev/null
expect_eq "fault: first request gets 503" "$(curl -s -o /dev/null -w '%{http_code}' "$base/api/v1/namespaces")" "503"
expect_eq "fault: then normal service" "$(curl -s -o /dev/null -w '%{http_code}' "$base/api/v1/namespaces")" "200"
curl -s -X POST -d '{"path_prefix":"/api/v1/namespaces","count":1,"reset":true}' "$base/emulator/fault" >/dev/null
curl -s "$base/api/v1/namespaces" >/dev/null 2>&1
expect_eq "fault: connection reset (curl exit 56 or 52)" "$(echo $? | sed 's/^5[26]$/reset/')" "reset"

# --- TLS, bearer token, client certificates
tls="$work/tls"
mkdir -p "$tls"
(
    cd "$tls" &&
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=emu-ca -keyout ca.key -out ca.crt &&
    openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr &&
    printf 'subjectAltName=IP:127.0.0.1\n' >srv.ext &&
    openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile srv.ext -out srv.crt &&
    openssl req -newkey rsa:2048 -nodes -subj /CN=kpl/O=system:masters -keyout cli.key -out cli.csr &&
    openssl x509 -req -in cli.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out cli.crt
) >"$work/openssl.log" 2>&1 || { fail "openssl"; cat "$work/openssl.log"; }
start_emulator tls --pace 0.2 --tls-cert "$tls/srv.crt" --tls-key "$tls/srv.key" --client-ca "$tls/ca.crt" --token s3cret
tbase="https://127.0.0.1:$port"
cat >"$work/kc-tls" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: emu
  cluster: {server: "$tbase", certificate-authority: "$tls/ca.crt"}
users:
- name: tok
  user: {token: s3cret}
- name: bad
  user: {token: wrong}
- name: cert
  user: {client-certificate: "$tls/cli.crt", client-key: "$tls/cli.key"}
contexts:
- {name: tok, context: {cluster: emu, user: tok}}
- {name: bad, context: {cluster: emu, user: bad}}
- {name: cert, context: {cluster: emu, user: cert}}
current-context: tok
EOF
KUBECONFIG="$work/kc-tls" k get ns default >"$work/out" 2>&1
expect_in "https + bearer token" "default   Active" "$work/out"
KUBECONFIG="$work/kc-tls" k --context bad get ns >"$work/out" 2>&1
expect_in "wrong token: 401" "error: You must be logged in to the server (Unauthorized)" "$work/out"
KUBECONFIG="$work/kc-tls" k --context cert get ns default >"$work/out" 2>&1
expect_in "https + client certificate" "default   Active" "$work/out"
curl -s --cacert "$tls/ca.crt" "$tbase/api/v1/namespaces" >"$work/out"
expect_in "no credentials: 401 Status" '"reason": "Unauthorized", "code": 401' "$work/out"

# --- SIGTERM stops the emulator
kill -TERM "$pid"
i=0
while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 "$pid" 2>/dev/null; then fail "emulator exits on SIGTERM"; else pass "emulator exits on SIGTERM"; fi

if [ -s "$work/plain.err" ] && grep -q Traceback "$work/plain.err"; then
    fail "emulator logged a traceback:"; cat "$work/plain.err"
fi
if [ "$fails" -ne 0 ]; then
    echo "$fails check(s) failed"
    exit 1
fi
echo "all checks passed"
