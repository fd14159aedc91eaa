#!/usr/bin/python3
"""Kubernetes API + Istio CRD emulator for kpl's deploy-stage tests.

Test infrastructure only, never part of the daemon.  Python 3 standard library.
See README.md next to this file for what is emulated and the known gaps.

Start:  kube_emulator.py [--pace 0.2] [--port-file F] [--lifetime 600]
                         [--tls-cert C --tls-key K [--client-ca CA]] [--token T]
Prints PORT=N on stdout once it listens on 127.0.0.1:N.
"""

import argparse
import collections
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPTS = None  # argparse namespace, set in main()


# ---------------------------------------------------------------------------
# helpers

def now_iso(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def parse_iso(s):
    try:
        return float(time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))) - time.timezone
    except (TypeError, ValueError):
        return time.time()


def jcopy(o):
    return json.loads(json.dumps(o))


def canon(o):
    return json.dumps(o, sort_keys=True, separators=(",", ":"))


def rand_suffix(n=5):
    # same alphabet as k8s.io/apimachinery/pkg/util/rand (no vowels, no 0/1/3)
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


def human_duration(sec):
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(sec)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return "%ds" % s
    m = s // 60
    if m < 10:
        return "%dm" % m if s % 60 == 0 else "%dm%ds" % (m, s % 60)
    if m < 180:
        return "%dm" % m
    h = m // 60
    if h < 8:
        return "%dh" % h if m % 60 == 0 else "%dh%dm" % (h, m % 60)
    if h < 48:
        return "%dh" % h
    if h < 24 * 8:
        return "%dd" % (h // 24) if h % 24 == 0 else "%dd%dh" % (h // 24, h % 24)
    if h < 24 * 365 * 2:
        return "%dd" % (h // 24)
    if h < 24 * 365 * 8:
        y = h // (24 * 365)
        d = (h // 24) % 365
        return "%dy" % y if d == 0 else "%dy%dd" % (y, d)
    return "%dy" % (h // (24 * 365))


def log(msg):
    if OPTS is not None and OPTS.verbose:
        sys.stderr.write("kube-emulator: %s\n" % msg)
        sys.stderr.flush()


class ApiError(Exception):
    """An error answered as a metav1.Status object."""

    def __init__(self, code, reason, message, details=None):
        Exception.__init__(self, message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self):
        st = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            st["details"] = self.details
        return st


REASON_BY_CODE = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                  405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Gone",
                  413: "RequestEntityTooLarge", 415: "UnsupportedMediaType", 422: "Invalid",
                  429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                  504: "Timeout"}


# ---------------------------------------------------------------------------
# resource table (registry as data: discovery, routing, validation read it)

class Res:
    def __init__(self, group, versions, plural, singular, kind, namespaced, short=(),
                 crd=False, subresources=(), categories=(), generation=False):
        self.group, self.versions, self.plural, self.singular = group, versions, plural, singular
        self.kind, self.namespaced, self.short, self.crd = kind, namespaced, list(short), crd
        self.subresources, self.categories = subresources, list(categories)
        self.generation = generation or crd

    @property
    def storage_version(self):
        return self.versions[0]

    def api_version(self, version=None):
        v = version or self.storage_version
        return "%s/%s" % (self.group, v) if self.group else v

    def qualified(self):
        """deployments.apps, pods, virtualservices.networking.istio.io"""
        return "%s.%s" % (self.plural, self.group) if self.group else self.plural

    def kind_qualified(self):
        return "%s.%s" % (self.kind, self.group) if self.group else self.kind


ISTIO = "networking.istio.io"
ISTIO_VERSIONS = ["v1", "v1beta1", "v1alpha3"]
RBAC = "rbac.authorization.k8s.io"
AUTHZ = "authorization.k8s.io"
RESOURCES = [
    Res("", ["v1"], "namespaces", "namespace", "Namespace", False, ["ns"], subresources=("status",)),
    Res("", ["v1"], "pods", "pod", "Pod", True, ["po"], subresources=("status", "log"), categories=["all"]),
    Res("", ["v1"], "services", "service", "Service", True, ["svc"], subresources=("status",),
        categories=["all"]),
    Res("", ["v1"], "configmaps", "configmap", "ConfigMap", True, ["cm"]),
    Res("", ["v1"], "events", "event", "Event", True, ["ev"]),
    Res("", ["v1"], "secrets", "secret", "Secret", True),
    Res("", ["v1"], "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", True, ["pvc"],
        subresources=("status",)),
    Res("", ["v1"], "serviceaccounts", "serviceaccount", "ServiceAccount", True, ["sa"]),
    Res("apps", ["v1"], "deployments", "deployment", "Deployment", True, ["deploy"],
        subresources=("status", "scale"), categories=["all"], generation=True),
    Res("apps", ["v1"], "replicasets", "replicaset", "ReplicaSet", True, ["rs"],
        subresources=("status", "scale"), categories=["all"], generation=True),
    Res("apps", ["v1"], "statefulsets", "statefulset", "StatefulSet", True, ["sts"],
        subresources=("status", "scale"), categories=["all"], generation=True),
    Res(RBAC, ["v1"], "roles", "role", "Role", True),
    Res(RBAC, ["v1"], "rolebindings", "rolebinding", "RoleBinding", True),
    Res(RBAC, ["v1"], "clusterroles", "clusterrole", "ClusterRole", False),
    Res(RBAC, ["v1"], "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", False),
    Res(AUTHZ, ["v1"], "selfsubjectaccessreviews", "selfsubjectaccessreview", "SelfSubjectAccessReview", False),
    Res(AUTHZ, ["v1"], "selfsubjectrulesreviews", "selfsubjectrulesreview", "SelfSubjectRulesReview", False),
    Res(ISTIO, ISTIO_VERSIONS, "virtualservices", "virtualservice", "VirtualService", True, ["vs"],
        crd=True, subresources=("status",), categories=["istio-io", "networking-istio-io"]),
    Res(ISTIO, ISTIO_VERSIONS, "destinationrules", "destinationrule", "DestinationRule", True, ["dr"],
        crd=True, subresources=("status",), categories=["istio-io", "networking-istio-io"]),
]
RES_BY_GVP = {}
for _r in RESOURCES:
    for _v in _r.versions:
        RES_BY_GVP[(_r.group, _v, _r.plural)] = _r
GROUPS = collections.OrderedDict()
for _r in RESOURCES:
    GROUPS.setdefault(_r.group, _r.versions)

RES = {r.plural: r for r in RESOURCES}   # plurals are unique here


# ---------------------------------------------------------------------------
# label and field selectors

_SEL_RE = re.compile(r"\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(==|!=|=|\s+in\s+|\s+notin\s+)\s*(\([^)]*\)|[A-Za-z0-9_./-]*))?\s*$")


def split_selector(sel):
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_label_selector(sel):
    """Returns a predicate over a labels dict; raises ApiError 400 on syntax errors."""
    reqs = []
    for part in split_selector(sel or ""):
        m = _SEL_RE.match(part)
        if not m:
            raise ApiError(400, "BadRequest", "unable to parse requirement: invalid label selector: %r" % part)
        neg, key, op, val = m.group(1), m.group(2), (m.group(3) or "").strip(), m.group(4)
        if neg and op:
            raise ApiError(400, "BadRequest", "unable to parse requirement: %r" % part)
        if op in ("in", "notin"):
            vals = set(v.strip() for v in val.strip("()").split(",") if v.strip())
        else:
            vals = {val} if op else None
        reqs.append((neg, key, op, vals))

    def pred(labels):
        labels = labels or {}
        for neg, key, op, vals in reqs:
            if not op:
                if bool(neg) == (key in labels):
                    return False
            elif op in ("=", "==", "in"):
                if labels.get(key) not in vals:
                    return False
            elif op in ("!=", "notin"):
                if key in labels and labels[key] in vals:
                    return False
        return True
    return pred


def selector_from_label_selector_obj(ls):
    """metav1.LabelSelector → predicate (matchLabels + matchExpressions)."""
    ls = ls or {}
    ml = ls.get("matchLabels") or {}
    exprs = ls.get("matchExpressions") or []

    def pred(labels):
        labels = labels or {}
        for k, v in ml.items():
            if labels.get(k) != v:
                return False
        for e in exprs:
            k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
            if op == "In" and labels.get(k) not in vals:
                return False
            if op == "NotIn" and k in labels and labels[k] in vals:
                return False
            if op == "Exists" and k not in labels:
                return False
            if op == "DoesNotExist" and k in labels:
                return False
        return True
    return pred


def label_selector_string(ls):
    ls = ls or {}
    parts = ["%s=%s" % kv for kv in sorted((ls.get("matchLabels") or {}).items())]
    for e in ls.get("matchExpressions") or []:
        op = e.get("operator")
        if op in ("In", "NotIn"):
            parts.append("%s %s (%s)" % (e["key"], op.lower(), ",".join(e.get("values") or [])))
        elif op == "Exists":
            parts.append(e["key"])
        else:
            parts.append("!" + e["key"])
    return ",".join(parts)


def parse_field_selector(sel):
    reqs = []
    for part in split_selector(sel or ""):
        m = re.match(r"\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", part)
        if not m:
            raise ApiError(400, "BadRequest", "invalid field selector: %r" % part)
        reqs.append(m.groups())

    def field(obj, path):
        cur = obj
        for p in path.split("."):
            if not isinstance(cur, dict):
                return ""
            cur = cur.get(p)
        return "" if cur is None else str(cur)

    def pred(obj):
        for path, op, val in reqs:
            got = field(obj, path)
            if (got == val) != (op != "!="):
                return False
        return True
    return pred


# ---------------------------------------------------------------------------
# patches

DELETE = object()


def merge_patch(orig, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    res = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if v is None:
            res.pop(k, None)
        else:
            res[k] = merge_patch(res.get(k), v)
    return res


def smp_merge_key(path):
    """Merge keys of the list fields strategic merge patch treats specially (apps/v1, core/v1)."""
    last = path[-1]
    if last == "ports":
        return "containerPort" if ("containers" in path or "initContainers" in path) else "port"
    return {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
            "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
            "imagePullSecrets": "name", "conditions": "type", "hostAliases": "ip",
            "ownerReferences": "uid", "topologySpreadConstraints": "topologyKey",
            "resourceClaims": "name", "envFrom": None, "tolerations": None}.get(last)


SMP_PRIMITIVE_MERGE = {"finalizers"}


def strategic_merge(orig, patch, path=()):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return DELETE
    if directive == "replace":
        return {k: v for k, v in patch.items() if not k.startswith("$")}
    res = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    orders = {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(res.get(f), list):
                res[f] = [x for x in res[f] if x not in (v or [])]
            continue
        if k.startswith("$"):
            continue
        if v is None:
            res.pop(k, None)
        elif isinstance(v, dict):
            r = strategic_merge(res.get(k), v, path + (k,))
            if r is DELETE:
                res.pop(k, None)
            else:
                res[k] = r
        elif isinstance(v, list):
            mk = smp_merge_key(path + (k,))
            if mk:
                res[k] = smp_merge_list(res.get(k) or [], v, mk, path + (k,))
            elif k in SMP_PRIMITIVE_MERGE:
                cur = list(res.get(k) or [])
                res[k] = cur + [x for x in v if x not in cur]
            else:
                res[k] = copy.deepcopy(v)
        else:
            res[k] = v
    for f, order in orders.items():
        mk = smp_merge_key(path + (f,))
        if isinstance(res.get(f), list) and mk:
            keys = [o.get(mk) for o in order if isinstance(o, dict)]
            items = res[f]
            ordered = [x for key in keys for x in items if isinstance(x, dict) and x.get(mk) == key]
            rest = [x for x in items if not (isinstance(x, dict) and x.get(mk) in keys)]
            res[f] = ordered + rest
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        res = {k: v for k, v in res.items() if k in retain}
    return res


def smp_merge_list(orig, patch, mk, path):
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [strategic_merge({}, i, path) for i in patch
                if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    res = copy.deepcopy(orig)
    for item in patch:
        if not isinstance(item, dict):
            res.append(item)
            continue
        key = item.get(mk)
        idx = next((i for i, x in enumerate(res) if isinstance(x, dict) and x.get(mk) == key), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del res[idx]
            continue
        if idx is None:
            res.append(strategic_merge({}, item, path))
        else:
            res[idx] = strategic_merge(res[idx], item, path)
    return res


def _ptr(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", "invalid JSON pointer %r" % path)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _ptr_get(doc, toks):
    cur = doc
    for t in toks:
        if isinstance(cur, dict) and t in cur:
            cur = cur[t]
        elif isinstance(cur, list) and t.isdigit() and int(t) < len(cur):
            cur = cur[int(t)]
        else:
            raise ApiError(422, "Invalid", "jsonpatch: path /%s not found" % "/".join(toks))
    return cur


def json_patch(doc, ops):
    """RFC 6902."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, toks = op.get("op"), _ptr(op.get("path", ""))
        if kind == "test":
            if canon(_ptr_get(doc, toks)) != canon(op.get("value")):
                raise ApiError(422, "Invalid", "the server rejected our request due to an error in our "
                               "request: testing value %s failed: test failed" % op.get("path"))
            continue
        if kind in ("move", "copy"):
            src = _ptr(op.get("from", ""))
            val = copy.deepcopy(_ptr_get(doc, src))
            if kind == "move":
                doc = _ptr_remove(doc, src)
            doc = _ptr_add(doc, toks, val)
        elif kind == "add":
            doc = _ptr_add(doc, toks, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _ptr_remove(doc, toks)
        elif kind == "replace":
            _ptr_get(doc, toks)
            doc = _ptr_remove(doc, toks)
            doc = _ptr_add(doc, toks, copy.deepcopy(op.get("value")))
        else:
            raise ApiError(400, "BadRequest", "unexpected json patch operation %r" % kind)
    return doc


def _ptr_add(doc, toks, val):
    if not toks:
        return val
    parent = _ptr_get(doc, toks[:-1])
    t = toks[-1]
    if isinstance(parent, dict):
        parent[t] = val
    elif isinstance(parent, list):
        if t == "-":
            parent.append(val)
        elif t.isdigit() and int(t) <= len(parent):
            parent.insert(int(t), val)
        else:
            raise ApiError(422, "Invalid", "jsonpatch add: index out of range: %s" % t)
    else:
        raise ApiError(422, "Invalid", "jsonpatch add: parent is not a container")
    return doc


def _ptr_remove(doc, toks):
    if not toks:
        return None
    parent = _ptr_get(doc, toks[:-1])
    t = toks[-1]
    if isinstance(parent, dict) and t in parent:
        del parent[t]
    elif isinstance(parent, list) and t.isdigit() and int(t) < len(parent):
        del parent[int(t)]
    else:
        raise ApiError(422, "Invalid", "jsonpatch remove: path %s not found" % "/".join(toks))
    return doc


# ---------------------------------------------------------------------------
# defaulting and validation (the subset that matters to kubectl and kpl)

DNS1123_SUB = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def invalid(res, name, causes):
    """422 Invalid in the apiserver's format: Kind.group "name" is invalid: field: msg, field: msg."""
    msg = '%s "%s" is invalid: %s' % (res.kind_qualified(), name, ", ".join(
        "%s: %s" % (c["field"], c["message"]) if c.get("field") else c["message"] for c in causes))
    return ApiError(422, "Invalid", msg, {"name": name, "group": res.group, "kind": res.kind,
                                         "causes": [dict(reason="FieldValueInvalid", **c) for c in causes]})


def default_pod_spec(ps):
    ps.setdefault("restartPolicy", "Always")
    ps.setdefault("terminationGracePeriodSeconds", 30)
    ps.setdefault("dnsPolicy", "ClusterFirst")
    ps.setdefault("securityContext", {})
    ps.setdefault("schedulerName", "default-scheduler")
    for c in (ps.get("containers") or []) + (ps.get("initContainers") or []):
        if not isinstance(c, dict):
            continue
        img = c.get("image") or ""
        tag = img.rsplit("/", 1)[-1]
        latest = "@" not in tag and (":" not in tag or tag.endswith(":latest"))
        c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for p in c.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")


def apply_defaults(res, obj):
    spec = obj.get("spec")
    if res.plural in ("deployments", "replicasets") and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        if res.plural == "deployments":
            spec.setdefault("progressDeadlineSeconds", 600)
            st = spec.setdefault("strategy", {})
            st.setdefault("type", "RollingUpdate")
            if st["type"] == "RollingUpdate":
                ru = st.setdefault("rollingUpdate", {})
                ru.setdefault("maxSurge", "25%")
                ru.setdefault("maxUnavailable", "25%")
        else:
            spec.pop("revisionHistoryLimit", None)
        tmpl = spec.get("template")
        if isinstance(tmpl, dict):
            tmpl.setdefault("metadata", {}).setdefault("creationTimestamp", None)
            if isinstance(tmpl.get("spec"), dict):
                default_pod_spec(tmpl["spec"])
    elif res.plural == "statefulsets" and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        spec.setdefault("persistentVolumeClaimRetentionPolicy", {"whenDeleted": "Retain", "whenScaled": "Retain"})
        tmpl = spec.get("template")
        if isinstance(tmpl, dict):
            tmpl.setdefault("metadata", {}).setdefault("creationTimestamp", None)
            if isinstance(tmpl.get("spec"), dict):
                default_pod_spec(tmpl["spec"])
    elif res.plural == "pods" and isinstance(spec, dict):
        default_pod_spec(spec)
    elif res.plural == "secrets":
        import base64
        obj.setdefault("type", "Opaque")
        sd = obj.pop("stringData", None)
        if isinstance(sd, dict):   # write-only: merged into data (wins), never stored
            data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
            for k, v in sd.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
    elif res.plural == "persistentvolumeclaims" and isinstance(spec, dict):
        spec.setdefault("volumeMode", "Filesystem")
        spec.setdefault("storageClassName", "standard")
    elif res.plural == "serviceaccounts":
        pass
    elif res.plural == "services" and isinstance(spec, dict):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                p.setdefault("targetPort", p.get("port"))
    elif res.plural == "namespaces":
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj["status"] = obj.get("status") or {"phase": "Active"}
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


def validate(res, obj):
    name = obj["metadata"].get("name", "")
    causes = []
    if res.plural == "namespaces" or res.crd or res.plural in ("deployments", "replicasets", "services"):
        pat = DNS1123_LABEL if res.plural in ("namespaces", "services") else DNS1123_SUB
        if not pat.match(name) or len(name) > 253:
            causes.append({"field": "metadata.name", "message": "Invalid value: %s: a lowercase RFC 1123 "
                           "subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
                           "must start and end with an alphanumeric character" % json.dumps(name)})
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else None
    if res.plural in ("deployments", "replicasets", "statefulsets"):
        if spec is None:
            spec = {}
        sel = spec.get("selector")
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if not sel or not ((sel.get("matchLabels") or sel.get("matchExpressions"))):
            causes.append({"field": "spec.selector", "message": "Required value"})
        elif not selector_from_label_selector_obj(sel)(labels):
            causes.append({"field": "spec.template.metadata.labels", "message": "Invalid value: %s: "
                           "`selector` does not match template `labels`" % json.dumps(labels)})
        cs = ((tmpl.get("spec") or {}).get("containers"))
        if not cs:
            causes.append({"field": "spec.template.spec.containers", "message": "Required value"})
        for i, c in enumerate(cs or []):
            if not isinstance(c, dict) or not c.get("name"):
                causes.append({"field": "spec.template.spec.containers[%d].name" % i, "message": "Required value"})
            if not isinstance(c, dict) or not c.get("image"):
                causes.append({"field": "spec.template.spec.containers[%d].image" % i, "message": "Required value"})
        r = spec.get("replicas")
        if not isinstance(r, int) or r < 0:
            causes.append({"field": "spec.replicas", "message": "Invalid value: %s: must be greater than or "
                           "equal to 0" % json.dumps(r)})
    elif res.plural == "services" and spec is not None:
        for i, p in enumerate(spec.get("ports") or []):
            if not isinstance(p, dict) or not isinstance(p.get("port"), int):
                causes.append({"field": "spec.ports[%d].port" % i, "message": "Required value"})
    elif res.plural == "pods":
        if not (spec or {}).get("containers"):
            causes.append({"field": "spec.containers", "message": "Required value"})
        if not DNS1123_SUB.match(name):
            causes.append({"field": "metadata.name", "message": "Invalid value: %s: a lowercase RFC 1123 "
                           "subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
                           "must start and end with an alphanumeric character" % json.dumps(name)})
        names = [c.get("name") for c in (spec or {}).get("containers") or [] if isinstance(c, dict)]
        for i, c in enumerate((spec or {}).get("containers") or []):
            if not isinstance(c, dict) or not c.get("name"):
                causes.append({"field": "spec.containers[%d].name" % i, "message": "Required value"})
            elif names.count(c["name"]) > 1:
                causes.append({"field": "spec.containers[%d].name" % i,
                               "message": "Duplicate value: %s" % json.dumps(c["name"])})
            if not isinstance(c, dict) or not c.get("image"):
                causes.append({"field": "spec.containers[%d].image" % i, "message": "Required value"})
        if (spec or {}).get("restartPolicy") not in ("Always", "OnFailure", "Never"):
            causes.append({"field": "spec.restartPolicy", "message": "Unsupported value: %s: supported values: "
                           '"Always", "OnFailure", "Never"' % json.dumps((spec or {}).get("restartPolicy"))})
    elif res.plural == "secrets":
        import base64
        for k, v in (obj.get("data") or {}).items():
            try:
                base64.b64decode(v or "", validate=True)
            except (ValueError, TypeError):
                causes.append({"field": "data[%s]" % k, "message": "Invalid value: illegal base64 data"})
        if len(canon(obj.get("data") or {})) > 1024 * 1024 * 4 // 3 + 64:
            causes.append({"field": "data", "message": "Too long: must have at most 1048576 bytes"})
    elif res.plural in ("rolebindings", "clusterrolebindings"):
        rr = obj.get("roleRef") or {}
        if not rr.get("kind") or not rr.get("name"):
            causes.append({"field": "roleRef", "message": "Required value"})
    elif res.plural == "virtualservices":
        causes += validate_virtualservice(spec or {})
    elif res.plural == "destinationrules":
        if not (spec or {}).get("host"):
            causes.append({"field": "spec.host", "message": "Required value: host is required"})
    if causes:
        if res.crd and OPTS.webhook_denials:
            # what a real cluster answers: Istio's validating webhook, code 400 (see README)
            raise ApiError(400, "BadRequest", 'admission webhook "validation.istio.io" denied the request: '
                           "configuration is invalid: " + "; ".join(c["message"] for c in causes))
        raise invalid(res, name, causes)


KNOWN_FIELDS = {   # for fieldValidation=Strict (kubectl's default): top level and spec of the main kinds
    "": {"apiVersion", "kind", "metadata", "spec", "status"},
    "configmaps": {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"},
    "deployments.spec": {"replicas", "selector", "template", "strategy", "minReadySeconds",
                         "revisionHistoryLimit", "paused", "progressDeadlineSeconds"},
    "replicasets.spec": {"replicas", "selector", "template", "minReadySeconds"},
    "services.spec": {"ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs", "sessionAffinity",
                      "loadBalancerIP", "loadBalancerSourceRanges", "externalName", "externalTrafficPolicy",
                      "healthCheckNodePort", "publishNotReadyAddresses", "sessionAffinityConfig", "ipFamilies",
                      "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass",
                      "internalTrafficPolicy", "trafficDistribution"},
    "secrets": {"apiVersion", "kind", "metadata", "data", "stringData", "type", "immutable"},
    "serviceaccounts": {"apiVersion", "kind", "metadata", "secrets", "imagePullSecrets",
                        "automountServiceAccountToken"},
    "roles": {"apiVersion", "kind", "metadata", "rules"},
    "clusterroles": {"apiVersion", "kind", "metadata", "rules", "aggregationRule"},
    "rolebindings": {"apiVersion", "kind", "metadata", "subjects", "roleRef"},
    "clusterrolebindings": {"apiVersion", "kind", "metadata", "subjects", "roleRef"},
    "statefulsets.spec": {"replicas", "selector", "template", "volumeClaimTemplates", "serviceName",
                          "podManagementPolicy", "updateStrategy", "revisionHistoryLimit", "minReadySeconds",
                          "persistentVolumeClaimRetentionPolicy", "ordinals"},
    "persistentvolumeclaims.spec": {"accessModes", "selector", "resources", "volumeName", "storageClassName",
                                    "volumeMode", "dataSource", "dataSourceRef", "volumeAttributesClassName"},
    "virtualservices.spec": {"hosts", "gateways", "http", "tls", "tcp", "exportTo"},
    "destinationrules.spec": {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"},
}


def strict_check(res, obj, mode="Strict"):
    """Unknown fields → 400 as the apiserver's strict decoder does (checked at the top level and in
    spec); with fieldValidation Ignore/Warn (or none) they are dropped, as the apiserver's decoder drops them."""
    if res.plural == "events" or not isinstance(obj, dict):
        return
    bad = [k for k in obj if k not in KNOWN_FIELDS.get(res.plural, KNOWN_FIELDS[""])]
    spec_known = KNOWN_FIELDS.get(res.plural + ".spec")
    if spec_known and isinstance(obj.get("spec"), dict):
        bad += ["spec." + k for k in obj["spec"] if k not in spec_known]
    if bad and mode != "Strict":
        for b in bad:
            (obj["spec"] if b.startswith("spec.") else obj).pop(b.split(".", 1)[-1] if b.startswith("spec.") else b, None)
        return
    if bad:
        raise ApiError(400, "BadRequest", '%s in version "%s" cannot be handled as a %s: strict decoding error: %s'
                       % (res.kind, res.storage_version, res.kind,
                          ", ".join('unknown field "%s"' % b for b in bad)))


def validate_virtualservice(spec):
    causes = []
    hosts = spec.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        causes.append({"field": "spec.hosts", "message": "Required value: virtual service must have at least one host"})
    for i, route in enumerate(spec.get("http") or []):
        dests = (route or {}).get("route") or []
        if not dests and not (route or {}).get("redirect") and not (route or {}).get("directResponse"):
            causes.append({"field": "spec.http[%d].route" % i,
                           "message": "Required value: HTTP route or redirect is required"})
            continue
        total = 0
        for j, d in enumerate(dests):
            w = (d or {}).get("weight", 0)
            if not isinstance(w, int) or w < 0:
                causes.append({"field": "spec.http[%d].route[%d].weight" % (i, j),
                               "message": "Invalid value: %s: weight %s < 0" % (json.dumps(w), w)})
                continue
            total += w
            if not ((d or {}).get("destination") or {}).get("host"):
                causes.append({"field": "spec.http[%d].route[%d].destination.host" % (i, j),
                               "message": "Required value: destination.host is required"})
        if len(dests) > 1 or (len(dests) == 1 and "weight" in (dests[0] or {}) and total != 0):
            if total != 100:
                causes.append({"field": "spec.http[%d].route" % i,
                               "message": "Invalid value: total destination weight %d != 100" % total})
    return causes


# ---------------------------------------------------------------------------
# the store: objects, resourceVersion, watch history

Event = collections.namedtuple("Event", "rv res ns name type obj old")


class Store:
    def __init__(self, history):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.objs = {r.plural: {} for r in RESOURCES}
        self.rv = 1000
        self.history = collections.deque()
        self.history_max = history
        self.compacted = self.rv   # watches from an rv < compacted get 410
        self.ip_seq = 10

    # all methods: call with or without the lock held (RLock)

    def next_rv(self):
        self.rv += 1
        return self.rv

    def _emit(self, res, typ, obj, old):
        md = obj["metadata"]
        ev = Event(int(md["resourceVersion"]), res, md.get("namespace", ""), md["name"], typ, obj, old)
        self.history.append(ev)
        while len(self.history) > self.history_max:
            self.compacted = self.history.popleft().rv
        self.cond.notify_all()

    def compact(self):
        with self.lock:
            self.history.clear()
            self.compacted = self.rv
            self.cond.notify_all()

    def get(self, res, ns, name):
        with self.lock:
            o = self.objs[res.plural].get((ns if res.namespaced else "", name))
            return jcopy(o) if o is not None else None

    def list(self, res, ns=None, pred=None):
        with self.lock:
            out = []
            for (ons, _), o in sorted(self.objs[res.plural].items()):
                if res.namespaced and ns and ons != ns:
                    continue
                if pred and not pred(o):
                    continue
                out.append(jcopy(o))
            return out

    def not_found(self, res, name):
        return ApiError(404, "NotFound", '%s "%s" not found' % (res.qualified(), name),
                        {"name": name, "group": res.group, "kind": res.plural})

    def create(self, res, ns, obj, dry_run=False):
        with self.lock:
            if not isinstance(obj, dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            obj = jcopy(obj)
            md = obj.setdefault("metadata", {})
            if not isinstance(md, dict):
                raise ApiError(400, "BadRequest", "metadata must be an object")
            if not md.get("name") and md.get("generateName"):
                md["name"] = md["generateName"] + rand_suffix()
            if not md.get("name"):
                raise invalid(res, "", [{"field": "metadata.name", "message": "Required value: name or "
                                         "generateName is required"}])
            if res.namespaced:
                if md.get("namespace") and md["namespace"] != ns:
                    raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                   "the namespace sent on the request")
                if self.objs["namespaces"].get(("", ns)) is None:
                    raise ApiError(404, "NotFound", 'namespaces "%s" not found' % ns,
                                   {"name": ns, "kind": "namespaces"})
                md["namespace"] = ns
            else:
                md.pop("namespace", None)
            key = (ns if res.namespaced else "", md["name"])
            if key in self.objs[res.plural]:
                raise ApiError(409, "AlreadyExists", '%s "%s" already exists' % (res.qualified(), md["name"]),
                               {"name": md["name"], "group": res.group, "kind": res.plural})
            obj["apiVersion"], obj["kind"] = res.api_version(), res.kind
            if not res.crd and res.plural not in ("namespaces",):
                obj.pop("status", None)
            if res.plural == "pods":
                obj["status"] = {"phase": "Pending", "qosClass": pod_qos(obj.get("spec") or {})}
            apply_defaults(res, obj)
            validate(res, obj)
            if res.plural == "services" and obj.get("spec", {}).get("type") != "ExternalName":
                if not obj["spec"].get("clusterIP"):
                    self.ip_seq += 1
                    ip = "10.96.%d.%d" % (self.ip_seq // 250, self.ip_seq % 250 + 1)
                    obj["spec"]["clusterIP"] = ip
                    obj["spec"]["clusterIPs"] = [ip]
                obj["status"] = {"loadBalancer": {}}
            if dry_run:
                return obj
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now_iso()
            md.pop("deletionTimestamp", None)
            if res.generation:
                md["generation"] = 1
            else:
                md.pop("generation", None)
            if res.plural == "persistentvolumeclaims":
                bind_claim(obj)
            md["resourceVersion"] = str(self.next_rv())
            self.objs[res.plural][key] = obj
            self._emit(res, "ADDED", jcopy(obj), None)
            return jcopy(obj)

    def update(self, res, ns, name, new, sub=None, check_rv=True, require_rv=None, dry_run=False,
               internal=False):
        """PUT semantics: `new` is the whole object; for sub=="status" only its status is taken."""
        with self.lock:
            key = (ns if res.namespaced else "", name)
            cur = self.objs[res.plural].get(key)
            if cur is None:
                raise self.not_found(res, name)
            if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            new = jcopy(new)
            md = new.setdefault("metadata", {})
            if md.get("name") not in (None, name):
                raise ApiError(400, "BadRequest", "the name of the object (%s) does not match the name on "
                               "the URL (%s)" % (md.get("name"), name))
            rv = md.get("resourceVersion")
            if check_rv and rv in (None, "") and (require_rv if require_rv is not None else res.crd):
                raise invalid(res, name, [{"field": "metadata.resourceVersion",
                                           "message": "Invalid value: 0x0: must be specified for an update"}])
            if check_rv and rv not in (None, "") and rv != cur["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", 'Operation cannot be fulfilled on %s "%s": the object has been '
                               "modified; please apply your changes to the latest version and try again"
                               % (res.qualified(), name),
                               {"name": name, "group": res.group, "kind": res.plural})
            if sub == "status":
                out = jcopy(cur)
                out["status"] = new.get("status")
            else:
                out = new
                out["apiVersion"], out["kind"] = res.api_version(), res.kind
                omd = out["metadata"]
                for k in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                    if k in cur["metadata"]:
                        omd[k] = cur["metadata"][k]
                    else:
                        omd.pop(k, None)
                if res.namespaced:
                    omd["namespace"] = ns
                if not internal:
                    if "status" in cur:
                        out["status"] = cur["status"]
                    else:
                        out.pop("status", None)
                apply_defaults(res, out)
                if res.plural == "services":
                    for f in ("clusterIP", "clusterIPs"):
                        if f in cur.get("spec", {}):
                            out.setdefault("spec", {})[f] = cur["spec"][f]
                validate(res, out)
                if res.generation:
                    a = {k: v for k, v in out.items() if k not in ("metadata", "status", "apiVersion", "kind")}
                    b = {k: v for k, v in cur.items() if k not in ("metadata", "status", "apiVersion", "kind")}
                    if canon(a) != canon(b):
                        omd["generation"] = cur["metadata"].get("generation", 1) + 1
            out["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            if canon(out) == canon(cur) or dry_run:
                return jcopy(out)   # no-op updates do not bump resourceVersion (as the apiserver)
            out["metadata"]["resourceVersion"] = str(self.next_rv())
            self.objs[res.plural][key] = out
            self._emit(res, "MODIFIED", jcopy(out), jcopy(cur))
            return jcopy(out)

    def delete(self, res, ns, name, dry_run=False):
        with self.lock:
            key = (ns if res.namespaced else "", name)
            cur = self.objs[res.plural].get(key)
            if cur is None:
                raise self.not_found(res, name)
            if dry_run:
                return jcopy(cur)
            del self.objs[res.plural][key]
            if res.plural == "persistentvolumeclaims" and POD_ROOT:
                shutil.rmtree(pvc_dir(ns, name), ignore_errors=True)
            out = jcopy(cur)
            out["metadata"]["resourceVersion"] = str(self.next_rv())
            if res.plural == "namespaces":
                for r in RESOURCES:
                    if r.namespaced:
                        for (ons, oname) in list(self.objs[r.plural]):
                            if ons == name:
                                self.delete(r, ons, oname)
                out["status"] = {"phase": "Terminating"}
                out["metadata"]["deletionTimestamp"] = now_iso()
            self._emit(res, "DELETED", jcopy(out), jcopy(cur))
            return out


STORE = None


def bind_claim(pvc):
    """The volume binder at creation: phase Bound at once, a host directory per claim."""
    spec = pvc.setdefault("spec", {})
    spec["volumeName"] = "pvc-" + pvc["metadata"]["uid"]
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
    pvc["status"] = {"phase": "Bound", "accessModes": jcopy(spec.get("accessModes") or ["ReadWriteOnce"]),
                     "capacity": {"storage": storage}}
    ann = pvc["metadata"].setdefault("annotations", {})
    ann.setdefault("pv.kubernetes.io/bind-completed", "yes")
    ann.setdefault("pv.kubernetes.io/bound-by-controller", "yes")
    pvc["metadata"].setdefault("finalizers", ["kubernetes.io/pvc-protection"])
    if POD_ROOT:
        os.makedirs(pvc_dir(pvc["metadata"]["namespace"], pvc["metadata"]["name"]), exist_ok=True)


# ---------------------------------------------------------------------------
# controllers: garbage collector, deployment, replicaset, kubelet (pods)

REV = "deployment.kubernetes.io/revision"
REV_HISTORY = "deployment.kubernetes.io/revision-history"
HASH = "pod-template-hash"
# deployment annotations not copied to its ReplicaSets (kubectl/pkg/util/deployment, controller util)
NOT_COPIED = {"kubectl.kubernetes.io/last-applied-configuration", REV, REV_HISTORY,
              "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas",
              "deprecated.deployment.rollback.to"}


def template_hash(tmpl):
    h = hashlib.sha256(canon(tmpl).encode()).digest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int.from_bytes(h[:8], "big")
    out = ""
    for _ in range(10):
        out += alphabet[n % len(alphabet)]
        n //= len(alphabet)
    return out


def strip_hash(tmpl):
    t = jcopy(tmpl or {})
    labels = (t.get("metadata") or {}).get("labels")
    if isinstance(labels, dict):
        labels.pop(HASH, None)
    return t


def int_or_percent(v, total, round_up):
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.endswith("%"):
        try:
            f = float(v[:-1]) * total / 100.0
        except ValueError:
            return 0
        return int(math.ceil(f)) if round_up else int(math.floor(f))
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def surge_unavailable(dep):
    spec = dep["spec"]
    replicas = spec.get("replicas", 1)
    st = spec.get("strategy") or {}
    if st.get("type") == "Recreate":
        return 0, replicas
    ru = st.get("rollingUpdate") or {}
    surge = int_or_percent(ru.get("maxSurge", "25%"), replicas, True)
    unavail = int_or_percent(ru.get("maxUnavailable", "25%"), replicas, False)
    if surge == 0 and unavail == 0:
        unavail = 1
    return surge, min(unavail, replicas)


def controlled_by(obj, owner):
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") == owner["metadata"]["uid"]:
            return True
    return False


def is_crashloop(pod_spec):
    return any("crashloop" in (c.get("image") or "") for c in (pod_spec or {}).get("containers") or [])


def rs_revision(rs):
    try:
        return int((rs["metadata"].get("annotations") or {}).get(REV, "0"))
    except ValueError:
        return 0


class Controller(threading.Thread):
    def __init__(self, store):
        threading.Thread.__init__(self, name="controller", daemon=True)
        self.store = store
        self.pods = {}       # pod uid -> {"born": t, "ready_at": t|None, "restart_at": t}
        self.deps = {}       # deployment uid -> {"progress": t, "new_rs": name}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with self.store.lock:
                    self.tick(time.time())
            except Exception as e:   # keep the emulator alive; the test sees the log
                sys.stderr.write("kube-emulator: controller error: %r\n" % (e,))
                import traceback
                traceback.print_exc()
            self.stop.wait(min(0.05, max(OPTS.pace / 4.0, 0.01)))

    # -- helpers
    def write(self, res, obj):
        ns = obj["metadata"].get("namespace", "")
        return self.store.update(res, ns, obj["metadata"]["name"], obj, check_rv=False, internal=True)

    def tick(self, now):
        self.gc()
        pods = self.store.list(RES["pods"])
        RUNTIME.sync(pods)
        for pod in pods:
            if not is_real_pod(pod):
                self.kubelet(pod, now)
        for sts in self.store.list(RES["statefulsets"]):
            self.sync_statefulset(sts)
        for (ns, name), c in list(self.store.objs["persistentvolumeclaims"].items()):
            if c["metadata"].get("deletionTimestamp") and not claim_in_use(ns, name):
                self.store.delete(RES["persistentvolumeclaims"], ns, name)
        for dep in self.store.list(RES["deployments"]):
            self.sync_deployment(dep, now)
        for rs in self.store.list(RES["replicasets"]):
            self.sync_replicaset(rs, now)
        for dep in self.store.list(RES["deployments"]):
            self.deployment_status(dep, now)

    def gc(self):
        """The garbage collector: an object all of whose owners (by uid) are gone is deleted."""
        uids = set(o["metadata"]["uid"] for objs in self.store.objs.values() for o in objs.values())
        for r in RESOURCES:
            if not r.namespaced:
                continue
            for (ns, name), o in list(self.store.objs[r.plural].items()):
                refs = o["metadata"].get("ownerReferences") or []
                if not refs or any(x.get("uid") in uids for x in refs):
                    continue
                if r.plural == "pods" and is_real_pod(o):
                    if not o["metadata"].get("deletionTimestamp"):
                        delete_pod(ns, name, None)
                    continue
                self.store.delete(r, ns, name)
                self.pods.pop(o["metadata"]["uid"], None)

    # -- statefulset controller: pods NAME-0..N-1 (synthetic, like a ReplicaSet's) and a claim per
    # volumeClaimTemplate and pod (CLAIM-NAME-i, retained on scale down and delete, as by default)
    def sync_statefulset(self, sts):
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        spec = sts.get("spec") or {}
        want = spec.get("replicas", 1)
        tmpl = spec.get("template") or {}
        ready = 0
        current = 0
        for i in range(max(want, 0)):
            pname = "%s-%d" % (name, i)
            for t in spec.get("volumeClaimTemplates") or []:
                cname = "%s-%s" % ((t.get("metadata") or {}).get("name"), pname)
                if self.store.get(RES["persistentvolumeclaims"], ns, cname) is None:
                    labels = dict(((spec.get("selector") or {}).get("matchLabels") or {}))
                    self.store.create(RES["persistentvolumeclaims"], ns, {
                        "metadata": {"name": cname, "labels": labels},
                        "spec": jcopy(t.get("spec") or {})})
            pod = self.store.get(RES["pods"], ns, pname)
            if pod is None:
                tm = tmpl.get("metadata") or {}
                labels = jcopy(tm.get("labels") or {})
                labels.update({"statefulset.kubernetes.io/pod-name": pname,
                               "apps.kubernetes.io/pod-index": str(i)})
                pspec = jcopy(tmpl.get("spec") or {})
                pspec["hostname"] = pname
                if spec.get("serviceName"):
                    pspec["subdomain"] = spec["serviceName"]
                pspec["nodeName"] = NODE_NAME
                vols = pspec.setdefault("volumes", [])
                for t in spec.get("volumeClaimTemplates") or []:
                    tn = (t.get("metadata") or {}).get("name")
                    vols[:] = [v for v in vols if v.get("name") != tn]
                    vols.append({"name": tn, "persistentVolumeClaim": {"claimName": "%s-%s" % (tn, pname)}})
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": pname, "labels": labels, "ownerReferences": [
                           {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
                            "uid": sts["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
                       "spec": pspec}
                if tm.get("annotations"):
                    pod["metadata"]["annotations"] = jcopy(tm["annotations"])
                self.store.create(RES["pods"], ns, pod)
                break   # OrderedReady: one pod at a time
            current += 1
            if self.pods.get(pod["metadata"]["uid"], {}).get("ready_at") is not None:
                ready += 1
            else:
                break
        for p in self.store.list(RES["pods"], ns):
            if controlled_by(p, sts):
                idx = p["metadata"]["name"].rsplit("-", 1)[-1]
                if idx.isdigit() and int(idx) >= want:
                    self.store.delete(RES["pods"], ns, p["metadata"]["name"])
        rev = "%s-%s" % (name, template_hash(tmpl))
        status = {"observedGeneration": sts["metadata"].get("generation", 1), "replicas": current,
                  "readyReplicas": ready, "currentReplicas": current, "updatedReplicas": current,
                  "availableReplicas": ready, "currentRevision": rev, "updateRevision": rev,
                  "collisionCount": 0}
        for k in ("readyReplicas", "availableReplicas", "currentReplicas", "updatedReplicas"):
            if not status[k]:
                del status[k]
        if canon(status) != canon(sts.get("status")):
            sts["status"] = status
            self.write(RES["statefulsets"], sts)

    # -- kubelet: a pod becomes Ready `pace` seconds after creation, unless its image says crashloop
    def kubelet(self, pod, now):
        uid = pod["metadata"]["uid"]
        st = self.pods.setdefault(uid, {"born": now, "ready_at": None, "restart_at": now, "restarts": 0})
        spec = pod.get("spec") or {}
        crash = is_crashloop(spec)
        started = now - st["born"] >= OPTS.pace
        if crash and started and now - st["restart_at"] >= max(OPTS.pace * 5, 1.0):
            st["restarts"] += 1
            st["restart_at"] = now
        if started and not crash and st["ready_at"] is None:
            st["ready_at"] = now
        status = self.pod_status(pod, st, started, crash)
        if canon(status) != canon(pod.get("status")):
            pod["status"] = status
            self.write(RES["pods"], pod)

    def pod_status(self, pod, st, started, crash):
        spec = pod.get("spec") or {}
        born = now_iso(st["born"])
        ready = st["ready_at"] is not None
        cond = lambda t, ok, reason=None: dict({"type": t, "status": "True" if ok else "False",
                                                 "lastProbeTime": None, "lastTransitionTime": born},
                                                **({"reason": reason} if reason and not ok else {}))
        cstats = []
        for c in spec.get("containers") or []:
            cs = {"name": c.get("name"), "image": c.get("image"), "imageID": "", "ready": ready,
                  "restartCount": st["restarts"] if crash else 0, "started": started and not crash,
                  "containerID": "emulated://%s-%s" % (pod["metadata"]["uid"][:8], c.get("name"))}
            if not started:
                cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
                cs.pop("containerID")
            elif crash:
                cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting "
                               "failed container=%s pod=%s" % (c.get("name"), pod["metadata"]["name"])}}
                cs["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": born,
                                                  "finishedAt": born}}
            else:
                cs["state"] = {"running": {"startedAt": now_iso(st["ready_at"])}}
            cstats.append(cs)
        status = {"phase": "Running" if started else "Pending", "hostIP": "10.0.0.1", "startTime": born,
                  "qosClass": "BestEffort", "containerStatuses": cstats,
                  "conditions": [cond("Initialized", True), cond("Ready", ready, "ContainersNotReady"),
                                 cond("ContainersReady", ready, "ContainersNotReady"),
                                 cond("PodScheduled", True)]}
        if started:
            n = int(hashlib.md5(pod["metadata"]["uid"].encode()).hexdigest()[:4], 16)
            status["podIP"] = "10.244.%d.%d" % (n // 250 % 250, n % 250 + 1)
            status["podIPs"] = [{"ip": status["podIP"]}]
        return status

    def pod_available(self, pod, min_ready):
        st = self.pods.get(pod["metadata"]["uid"])
        return bool(st and st["ready_at"] is not None and time.time() - st["ready_at"] >= min_ready)

    # -- replicaset controller
    def sync_replicaset(self, rs, now):
        ns = rs["metadata"]["namespace"]
        spec = rs.get("spec") or {}
        want = spec.get("replicas", 1)
        pods = [p for p in self.store.list(RES["pods"], ns) if controlled_by(p, rs)]
        if len(pods) < want:
            tmpl = spec.get("template") or {}
            for _ in range(want - len(pods)):
                tm = tmpl.get("metadata") or {}
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"generateName": rs["metadata"]["name"] + "-",
                                    "labels": jcopy(tm.get("labels") or {}),
                                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                         "name": rs["metadata"]["name"],
                                                         "uid": rs["metadata"]["uid"], "controller": True,
                                                         "blockOwnerDeletion": True}]},
                       "spec": jcopy(tmpl.get("spec") or {})}
                if tm.get("annotations"):
                    pod["metadata"]["annotations"] = jcopy(tm["annotations"])
                pod["spec"]["nodeName"] = "emulated-node"
                pods.append(self.store.create(RES["pods"], ns, pod))
        elif len(pods) > want:
            # delete not-ready pods first, then the newest
            pods.sort(key=lambda p: (self.pods.get(p["metadata"]["uid"], {}).get("ready_at") is not None,
                                     -self.pods.get(p["metadata"]["uid"], {}).get("born", 0)))
            for p in pods[:len(pods) - want]:
                self.store.delete(RES["pods"], ns, p["metadata"]["name"])
                self.pods.pop(p["metadata"]["uid"], None)
            pods = pods[len(pods) - want:]
        min_ready = spec.get("minReadySeconds", 0) or 0
        sel = selector_from_label_selector_obj(spec.get("selector"))
        status = {"replicas": len(pods),
                  "fullyLabeledReplicas": sum(1 for p in pods if sel(p["metadata"].get("labels"))),
                  "readyReplicas": sum(1 for p in pods if self.pods.get(p["metadata"]["uid"], {}).get("ready_at")),
                  "availableReplicas": sum(1 for p in pods if self.pod_available(p, min_ready)),
                  "observedGeneration": rs["metadata"].get("generation", 1)}
        for k in ("readyReplicas", "availableReplicas", "fullyLabeledReplicas"):
            if not status[k]:
                del status[k]
        if canon(status) != canon(rs.get("status")):
            rs["status"] = status
            self.write(RES["replicasets"], rs)

    # -- deployment controller
    def sync_deployment(self, dep, now):
        ns = dep["metadata"]["namespace"]
        spec = dep["spec"]
        dstate = self.deps.setdefault(dep["metadata"]["uid"], {"progress": now, "new_rs": None,
                                                                "reason": None})
        rss = [r for r in self.store.list(RES["replicasets"], ns) if controlled_by(r, dep)]
        tmpl = spec.get("template") or {}
        new = next((r for r in rss if canon(strip_hash(r["spec"].get("template"))) == canon(tmpl)), None)
        maxrev = max([rs_revision(r) for r in rss] or [0])
        replicas = spec.get("replicas", 1)
        surge, unavail = surge_unavailable(dep)
        copied = {k: v for k, v in (dep["metadata"].get("annotations") or {}).items() if k not in NOT_COPIED}
        if new is None:
            if spec.get("paused"):
                return
            h = template_hash(tmpl)
            t = jcopy(tmpl)
            t.setdefault("metadata", {}).setdefault("labels", {})[HASH] = h
            sel = jcopy(spec.get("selector") or {})
            sel.setdefault("matchLabels", {})[HASH] = h
            ann = dict(copied)
            ann.update({REV: str(maxrev + 1), "deployment.kubernetes.io/desired-replicas": str(replicas),
                        "deployment.kubernetes.io/max-replicas": str(replicas + surge)})
            rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                  "metadata": {"name": "%s-%s" % (dep["metadata"]["name"], h), "labels": jcopy(
                      t["metadata"]["labels"]), "annotations": ann,
                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                           "name": dep["metadata"]["name"], "uid": dep["metadata"]["uid"],
                                           "controller": True, "blockOwnerDeletion": True}]},
                  "spec": {"replicas": 0, "minReadySeconds": spec.get("minReadySeconds", 0),
                           "selector": sel, "template": t}}
            if not rss and (spec.get("strategy") or {}).get("type") != "Recreate":
                rs["spec"]["replicas"] = replicas   # first rollout: straight to the full size
            new = self.store.create(RES["replicasets"], ns, rs)
            rss.append(new)
            maxrev += 1
            self.set_progress(dep, dstate, "NewReplicaSetCreated", 'Created new replica set "%s"'
                              % new["metadata"]["name"], now)
        elif rs_revision(new) < maxrev or dstate["new_rs"] != new["metadata"]["name"]:
            ann = new["metadata"].setdefault("annotations", {})
            if rs_revision(new) < maxrev:
                old = ann.get(REV)
                ann[REV_HISTORY] = ",".join(x for x in [ann.get(REV_HISTORY), old] if x)
                ann[REV] = str(maxrev + 1)
                for k in list(ann):
                    if k not in NOT_COPIED and k not in copied:
                        del ann[k]
                ann.update(copied)
                maxrev += 1
                new = self.write(RES["replicasets"], new)
                rss = [r if r["metadata"]["uid"] != new["metadata"]["uid"] else new for r in rss]
            if dstate["new_rs"] is not None:
                self.set_progress(dep, dstate, "FoundNewReplicaSet", 'Found new replica set "%s"'
                                  % new["metadata"]["name"], now)
        dstate["new_rs"] = new["metadata"]["name"]
        dann = dep["metadata"].setdefault("annotations", {})
        if dann.get(REV) != new["metadata"]["annotations"].get(REV):
            dann[REV] = new["metadata"]["annotations"].get(REV)
            dep = self.write(RES["deployments"], dep)
        if spec.get("paused"):
            return
        olds = sorted([r for r in rss if r["metadata"]["uid"] != new["metadata"]["uid"]], key=rs_revision)
        want = {r["metadata"]["uid"]: r["spec"].get("replicas", 0) for r in rss}
        avail = {r["metadata"]["uid"]: min((r.get("status") or {}).get("availableReplicas", 0),
                                           r["spec"].get("replicas", 0)) for r in rss}
        nuid = new["metadata"]["uid"]
        if (spec.get("strategy") or {}).get("type") == "Recreate":
            for r in olds:
                want[r["metadata"]["uid"]] = 0
            if all((r.get("status") or {}).get("replicas", 0) == 0 for r in olds):
                want[nuid] = replicas
        else:
            if want[nuid] > replicas:
                want[nuid] = replicas
            elif want[nuid] < replicas:
                up = min(replicas + surge - sum(want.values()), replicas - want[nuid])
                if up > 0:
                    want[nuid] += up
            min_avail = replicas - unavail
            new_unavail = want[nuid] - avail[nuid]
            budget = sum(want.values()) - min_avail - new_unavail
            for r in olds:   # first old replicas that are not available anyway
                u = r["metadata"]["uid"]
                bad = want[u] - avail[u]
                if budget <= 0:
                    break
                if bad > 0:
                    d = min(bad, budget)
                    want[u] -= d
                    budget -= d
            down = sum(min(avail[u], want[u]) for u in want) - min_avail
            for r in olds:
                u = r["metadata"]["uid"]
                if down <= 0:
                    break
                d = min(want[u], down)
                want[u] -= d
                down -= d
        for r in rss:
            u = r["metadata"]["uid"]
            ann = r["metadata"].setdefault("annotations", {})
            changed = want[u] != r["spec"].get("replicas", 0)
            if u == nuid and (ann.get("deployment.kubernetes.io/desired-replicas") != str(replicas)):
                ann["deployment.kubernetes.io/desired-replicas"] = str(replicas)
                ann["deployment.kubernetes.io/max-replicas"] = str(replicas + surge)
                changed = True
            if changed:
                r["spec"]["replicas"] = want[u]
                self.write(RES["replicasets"], r)
        # revisionHistoryLimit: drop the oldest scaled-down ReplicaSets
        limit = spec.get("revisionHistoryLimit", 10)
        dead = [r for r in olds if want[r["metadata"]["uid"]] == 0 and
                (r.get("status") or {}).get("replicas", 0) == 0]
        for r in dead[:max(0, len(dead) - limit)]:
            self.store.delete(RES["replicasets"], ns, r["metadata"]["name"])

    def set_progress(self, dep, dstate, reason, message, now):
        dstate["progress"] = now
        dstate["reason"], dstate["message"] = reason, message

    def deployment_status(self, dep, now):
        ns = dep["metadata"]["namespace"]
        spec = dep["spec"]
        dstate = self.deps.setdefault(dep["metadata"]["uid"], {"progress": now, "new_rs": None, "reason": None})
        rss = [r for r in self.store.list(RES["replicasets"], ns) if controlled_by(r, dep)]
        new = next((r for r in rss if r["metadata"]["name"] == dstate["new_rs"]), None)
        old = dep.get("status") or {}
        replicas = spec.get("replicas", 1)
        g = lambda r, k: (r.get("status") or {}).get(k, 0)
        st = {"observedGeneration": dep["metadata"].get("generation", 1),
              "replicas": sum(g(r, "replicas") for r in rss),
              "updatedReplicas": g(new, "replicas") if new else 0,
              "readyReplicas": sum(g(r, "readyReplicas") for r in rss),
              "availableReplicas": sum(g(r, "availableReplicas") for r in rss)}
        st["unavailableReplicas"] = max(0, sum(r["spec"].get("replicas", 0) for r in rss) - st["availableReplicas"])
        if old.get("collisionCount") is not None:
            st["collisionCount"] = old["collisionCount"]
        _, unavail = surge_unavailable(dep)
        conds = {c["type"]: c for c in jcopy(old.get("conditions") or [])}
        ts = now_iso(now)

        def setcond(typ, status, reason, message, progress_time=None):
            c = conds.get(typ)
            if c and c["status"] == status and c["reason"] == reason:
                if c.get("message") == message and progress_time is None:
                    return
                c["message"] = message
                c["lastUpdateTime"] = now_iso(progress_time or now)
                return
            conds[typ] = {"type": typ, "status": status, "lastUpdateTime": now_iso(progress_time or now),
                          "lastTransitionTime": ts if not c or c["status"] != status else c["lastTransitionTime"],
                          "reason": reason, "message": message}

        if st["availableReplicas"] >= replicas - unavail:
            setcond("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            setcond("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        name = new["metadata"]["name"] if new else ""
        complete = (st["updatedReplicas"] == replicas and st["replicas"] == replicas and
                    st["availableReplicas"] == replicas)
        progressing = (st["updatedReplicas"] > old.get("updatedReplicas", 0) or
                       st["replicas"] < old.get("replicas", 0) or
                       st["readyReplicas"] > old.get("readyReplicas", 0) or
                       st["availableReplicas"] > old.get("availableReplicas", 0))
        deadline = spec.get("progressDeadlineSeconds")
        if spec.get("paused"):
            setcond("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused")
        elif dstate.get("reason") in ("NewReplicaSetCreated", "FoundNewReplicaSet"):
            setcond("Progressing", "True", dstate["reason"], dstate["message"], dstate["progress"])
            dstate["reason"] = None
        elif complete and new:
            setcond("Progressing", "True", "NewReplicaSetAvailable",
                    'ReplicaSet "%s" has successfully progressed.' % name)
        elif progressing and new:
            dstate["progress"] = now
            setcond("Progressing", "True", "ReplicaSetUpdated", 'ReplicaSet "%s" is progressing.' % name, now)
        elif (new and deadline is not None and now - dstate["progress"] > deadline and
              (conds.get("Progressing") or {}).get("reason") != "NewReplicaSetAvailable"):
            setcond("Progressing", "False", "ProgressDeadlineExceeded",
                    'ReplicaSet "%s" has timed out progressing.' % name)
        order = [c for c in ("Available", "Progressing", "ReplicaFailure") if c in conds]
        st["conditions"] = [conds[c] for c in order]
        for k in ("readyReplicas", "availableReplicas", "unavailableReplicas", "updatedReplicas", "replicas"):
            if not st[k]:
                del st[k]
        if canon(st) != canon(old):
            dep["status"] = st
            self.write(RES["deployments"], dep)


# ---------------------------------------------------------------------------
# pod runtime: the kubelet that runs a standalone pod's containers as local processes
#
# A pod no ReplicaSet/StatefulSet controls ("a real pod") is real work: each container's
# command runs as a local process in a bubblewrap mount namespace, with the host's file system
# except a private /tmp, its volumes bound at their mountPaths and its termination message file
# bound at terminationMessagePath.  The image is recorded, never pulled.  Controller-made pods
# keep the synthetic behaviour above (deploy stages' web servers never "run").
#
# Threads: one per real pod (scheduling, volumes, then waiting for its containers) and one per
# container (env, process, log reader, restarts).  Lock order: PodRun.plock -> PodRun.cond, and
# PodRun.plock -> STORE.lock; never PodRun.cond -> STORE.lock.

NODE_NAME = "emulated-node"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
POD_ROOT = None        # per-emulator directory (pods/, pvcs/), set in main()
CONTROLLER_KINDS = ("ReplicaSet", "StatefulSet", "DaemonSet")
UNSCHEDULABLE_MSG = ("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: "
                     "1 No preemption victims found for incoming pod.")
TERMINATION_MESSAGE_MAX = 4096
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def pod_qos(spec):
    cs = [c for c in (spec.get("containers") or []) if isinstance(c, dict)]
    res = [c.get("resources") or {} for c in cs]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    guaranteed = all((r.get("limits") or {}).get(k) and
                     (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k)) == (r.get("limits") or {})[k]
                     for r in res for k in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


def is_real_pod(pod):
    return not any(r.get("controller") and r.get("kind") in CONTROLLER_KINDS
                   for r in pod["metadata"].get("ownerReferences") or [])


def image_oom(image):
    """`oom` as a word of the image name (`app:oom`, `oom-test`), not inside `bloom`."""
    return re.search(r"(?<![A-Za-z0-9])oom(?![A-Za-z0-9])", image or "") is not None


def ts_nano(ns):
    """RFC3339Nano with 9 fixed digits, as the kubelet prefixes log lines."""
    s, frac = divmod(ns, 10 ** 9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + ".%09dZ" % frac


def parse_rfc3339(s):
    """RFC 3339 (any fraction, Z or offset) -> seconds since the epoch (float), or None."""
    m = re.match(r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$", s or "")
    if not m:
        return None
    import calendar
    t = calendar.timegm(tuple(int(m.group(i)) for i in range(1, 7)) + (0, 0, 0))
    if m.group(8) not in ("Z", "z"):
        sign = 1 if m.group(8)[0] == "+" else -1
        t -= sign * (int(m.group(8)[1:3]) * 3600 + int(m.group(8)[4:6]) * 60)
    return t + (float(m.group(7)) if m.group(7) else 0.0)


def expand_vars(s, env):
    """Kubernetes' $(VAR) expansion in command/args: defined names are replaced, $$ is a literal $,
    anything else stays as written (k8s.io/kubernetes/third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "$" and i + 1 < len(s):
            if s[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if s[i + 1] == "(":
                j = s.find(")", i + 2)
                if j > 0:
                    name = s[i + 2:j]
                    if name in env:
                        out.append(env[name])
                    else:
                        out.append(s[i:j + 1])
                    i = j + 1
                    continue
        out.append(s[i])
        i += 1
    return "".join(out)


def secret_bytes(sec):
    """A stored Secret's data, decoded: {key: bytes}."""
    import base64
    out = {}
    for k, v in ((sec or {}).get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v or "")
        except ValueError:
            out[k] = b""
    return out


class RunLog:
    """One container run's log records [(time_ns, bytes)], at most --container-log-max-bytes: the oldest
    lines go first, as the kubelet's rotation (containerLogMaxSize) drops old files. Positions are
    absolute (dropped lines keep counting), so a follower never skips or repeats. Guarded by the pod's cond."""

    def __init__(self):
        self.lines = []
        self.dropped = 0
        self.size = 0

    def add(self, recs):
        self.lines.extend(recs)
        self.size += sum(len(r[1]) for r in recs)
        cap = OPTS.container_log_max_bytes if OPTS else 0
        if cap and self.size > cap:
            n = 0
            while self.size > cap and n < len(self.lines) - 1:
                self.size -= len(self.lines[n][1])
                n += 1
            del self.lines[:n]
            self.dropped += n

    def end(self):
        return self.dropped + len(self.lines)

    def since(self, pos):
        return self.lines[max(0, pos - self.dropped):]


class ContainerRun:
    """One container of a real pod: its state as the kubelet reports it and the log of each run."""

    def __init__(self, spec, init=False, wait_reason="ContainerCreating"):
        self.spec = spec
        self.init = init              # an init container: runs to completion before the others
        self.name = spec.get("name") or ""
        self.image = spec.get("image") or ""
        self.state = {"waiting": {"reason": wait_reason}}
        self.last_state = {}
        self.restarts = 0
        self.ever_started = False     # a process was started once (containerID, imageID known)
        self.running = False
        self.done = False             # terminated and not restarting
        self.proc = None
        self.logs = [RunLog()]        # per run, the last one is current
        self.run_ended = False        # the current run's process has exited and its log is complete
        self.oom = False


class PodRun:
    def __init__(self, runtime, pod):
        md = pod["metadata"]
        self.runtime = runtime
        self.uid, self.ns, self.name = md["uid"], md["namespace"], md["name"]
        self.spec = jcopy(pod.get("spec") or {})
        self.dir = os.path.join(POD_ROOT, "pods", "%s_%s_%s" % (self.ns, self.name, self.uid))
        self.cond = threading.Condition()
        self.plock = threading.Lock()
        self.inits = [ContainerRun(c, init=True) for c in self.spec.get("initContainers") or []]
        self.containers = [ContainerRun(c, wait_reason="PodInitializing" if self.inits else "ContainerCreating")
                           for c in self.spec.get("containers") or []]
        self.init_failed = False       # an init container failed with restartPolicy Never
        self.scheduled = None         # None: not yet; True; or the Unschedulable message
        self.start_time = None
        self.stop = threading.Event()  # termination requested (delete, eviction, node lost)
        self.deleting = False          # graceful delete: remove the object when all containers ended
        self.kill_at = None            # monotonic SIGKILL deadline while terminating
        self.pod_reason = self.pod_message = None
        self.disruption = None         # (reason, message) of a DisruptionTarget condition
        self.node_lost = False
        self.ltt = {}                  # condition type -> (status, lastTransitionTime)
        self.finished = threading.Event()
        self.token = None              # the mounted service account token, valid while the pod exists
        self.thread = threading.Thread(target=self.run, name="pod-%s" % self.name, daemon=True)

    # -- status
    def cond_entry(self, typ, ok, reason=None, message=None):
        status = "True" if ok else "False"
        prev = self.ltt.get(typ)
        if not prev or prev[0] != status:
            prev = (status, now_iso())
            self.ltt[typ] = prev
        c = {"type": typ, "status": status, "lastProbeTime": None, "lastTransitionTime": prev[1]}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        return c

    def all_containers(self):
        return self.inits + self.containers

    def phase(self):
        cs = self.containers
        if self.pod_reason and all(c.done for c in self.all_containers()):
            return "Failed"       # Evicted, DeadlineExceeded
        if self.init_failed:
            return "Failed"
        if not cs or any(not c.ever_started and not c.done for c in cs):
            return "Pending"
        if not all(c.done for c in cs):
            return "Running"
        ok = all((c.state.get("terminated") or {}).get("exitCode") == 0 for c in cs)
        return "Succeeded" if ok else "Failed"

    def build_status(self):
        spec = self.spec
        st = {"phase": self.phase(), "qosClass": pod_qos(spec)}
        if self.scheduled is not True:
            if self.scheduled is not None:
                st["conditions"] = [self.cond_entry("PodScheduled", False, "Unschedulable", self.scheduled)]
            return st
        n = int(hashlib.md5(self.uid.encode()).hexdigest()[:4], 16)
        ip = "10.244.%d.%d" % (n // 250 % 250, n % 250 + 1)
        st.update({"hostIP": "10.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}]})
        cstats, istats = [], []
        for c in self.all_containers():
            ready = (c.running if not c.init else
                     (c.state.get("terminated") or {}).get("exitCode") == 0) and not self.node_lost
            cs = {"name": c.name, "image": c.image, "imageID": "", "ready": ready,
                  "restartCount": c.restarts, "started": c.running, "state": jcopy(c.state),
                  "lastState": jcopy(c.last_state)}
            if c.ever_started:
                digest = hashlib.sha256(c.image.encode()).hexdigest()
                cs["imageID"] = "%s@sha256:%s" % (c.image.split("@")[0].rsplit(":", 1)[0]
                                                  if ":" in c.image.rsplit("/", 1)[-1] else c.image, digest)
                cs["containerID"] = "containerd://%s" % hashlib.sha256(
                    ("%s/%s/%d" % (self.uid, c.name, c.restarts)).encode()).hexdigest()
            (istats if c.init else cstats).append(cs)
        pending_inits = [c["name"] for c in istats if not c["ready"]]
        ready = bool(self.containers) and all(c["ready"] for c in cstats)
        terminal = st["phase"] in ("Succeeded", "Failed")
        not_ready_reason = "PodCompleted" if terminal else ("ContainersNotReady" if not self.node_lost else None)
        not_ready_msg = None
        if not ready and not terminal and not self.node_lost:
            not_ready_msg = "containers with unready status: [%s]" % " ".join(
                c["name"] for c in cstats if not c["ready"])
        if self.start_time is not None:
            st["startTime"] = self.start_time
            st["podIP"], st["podIPs"] = ip, [{"ip": ip}]
        conds = [self.cond_entry("PodReadyToStartContainers", self.start_time is not None and not terminal
                                 and not self.node_lost),
                 self.cond_entry("Initialized", not pending_inits,
                                 "ContainersNotInitialized" if pending_inits else None,
                                 "containers with incomplete status: [%s]" % " ".join(pending_inits)
                                 if pending_inits else None),
                 self.cond_entry("Ready", ready, None if ready else not_ready_reason, not_ready_msg),
                 self.cond_entry("ContainersReady", ready, None if ready else not_ready_reason, not_ready_msg),
                 self.cond_entry("PodScheduled", True)]
        if self.disruption:
            conds.insert(0, self.cond_entry("DisruptionTarget", True, self.disruption[0], self.disruption[1]))
        st["conditions"] = conds
        if istats:
            st["initContainerStatuses"] = istats
        st["containerStatuses"] = cstats
        if self.pod_reason:
            st["reason"], st["message"] = self.pod_reason, self.pod_message
        return st

    def publish(self, node_controller=False):
        """Writes the pod's status (the kubelet's status manager); a pod gone from the store is fine.
        After the node is lost only the node controller writes."""
        with self.plock:
            if self.node_lost and not node_controller:
                return
            with self.cond:
                status = self.build_status()
                self.cond.notify_all()
            with STORE.lock:
                cur = STORE.objs["pods"].get((self.ns, self.name))
                if cur is None or cur["metadata"]["uid"] != self.uid:
                    return
                if canon(cur.get("status")) == canon(status):
                    return
                STORE.update(RES["pods"], self.ns, self.name, {"metadata": {}, "status": status},
                             sub="status", check_rv=False)

    def set_state(self, c, state, **kw):
        with self.cond:
            c.state = state
            for k, v in kw.items():
                setattr(c, k, v)
            self.cond.notify_all()
        self.publish()

    # -- the pod's thread
    def run(self):
        try:
            self.run_pod()
        except Exception:
            import traceback
            traceback.print_exc()
        finally:
            for c in self.all_containers():
                with self.cond:
                    c.run_ended = True
                    self.cond.notify_all()
            self.finished.set()
            if self.deleting:
                self.runtime.remove_object(self)

    def run_pod(self):
        os.makedirs(self.dir, exist_ok=True)
        images = [c.image for c in self.all_containers()]
        if any("unschedulable" in i for i in images):
            self.scheduled = UNSCHEDULABLE_MSG
            self.publish()
            self.stop.wait()
            return
        while not self.stop.is_set():
            missing = [v["persistentVolumeClaim"].get("claimName") for v in self.spec.get("volumes") or []
                       if isinstance(v.get("persistentVolumeClaim"), dict) and
                       STORE.get(RES["persistentvolumeclaims"], self.ns,
                                 v["persistentVolumeClaim"].get("claimName") or "") is None]
            if not missing:
                break
            self.scheduled = ('0/1 nodes are available: persistentvolumeclaim "%s" not found. preemption: '
                              '0/1 nodes are available: 1 Preemption is not helpful for scheduling.' % missing[0])
            self.publish()
            self.stop.wait(0.2)
        if self.stop.is_set():
            return
        with STORE.lock:    # the scheduler's binding
            cur = STORE.objs["pods"].get((self.ns, self.name))
            if cur is None or cur["metadata"]["uid"] != self.uid:
                return
            if (cur.get("spec") or {}).get("nodeName") != NODE_NAME:
                new = jcopy(cur)
                new["spec"]["nodeName"] = NODE_NAME
                STORE.update(RES["pods"], self.ns, self.name, new, check_rv=False, internal=True)
        self.scheduled = True
        self.start_time = now_iso()
        self.publish()
        ads = self.spec.get("activeDeadlineSeconds")
        if isinstance(ads, int) and ads > 0:
            threading.Thread(target=self.deadline_watch, args=(ads,), daemon=True).start()
        for c in self.inits:   # one after the other, each to a successful end
            self.run_container(c)
            ok = (c.state.get("terminated") or {}).get("exitCode") == 0
            if not ok or self.stop.is_set():
                with self.cond:
                    self.init_failed = not ok and not self.stop.is_set()
                    for m in self.containers:
                        m.done = True      # never started: they keep waiting PodInitializing
                self.publish()
                return
        threads = [threading.Thread(target=self.run_container, args=(c,), daemon=True,
                                    name="ctr-%s-%s" % (self.name, c.name)) for c in self.containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.publish()

    # -- volumes: host paths bound into the container's mount namespace
    def volume_paths(self, c):
        """[(host path, mountPath, read only)] for c's volumeMounts, or raises RuntimeError(reason, message)."""
        vols = {v.get("name"): v for v in self.spec.get("volumes") or []}
        out = []
        for m in c.spec.get("volumeMounts") or []:
            v = vols.get(m.get("name"))
            if v is None:
                raise RuntimeError("CreateContainerConfigError", 'cannot find volume "%s" to mount into '
                                   'container "%s"' % (m.get("name"), c.name))
            host = os.path.join(self.dir, "volumes", v["name"])
            ro = bool(m.get("readOnly"))
            if isinstance(v.get("emptyDir"), dict):
                os.makedirs(host, exist_ok=True)
            elif isinstance(v.get("persistentVolumeClaim"), dict):
                claim = v["persistentVolumeClaim"].get("claimName") or ""
                host = pvc_dir(self.ns, claim)
                os.makedirs(host, exist_ok=True)
                ro = ro or bool(v["persistentVolumeClaim"].get("readOnly"))
            elif isinstance(v.get("secret"), dict):
                sv = v["secret"]
                sec = STORE.get(RES["secrets"], self.ns, sv.get("secretName") or "")
                if sec is None and not sv.get("optional"):
                    raise RuntimeError("ContainerCreating", 'MountVolume.SetUp failed for volume "%s" : secret '
                                       '"%s" not found' % (v["name"], sv.get("secretName")))
                data = secret_bytes(sec)
                items = sv.get("items")
                files = [(i.get("key"), i.get("path") or i.get("key")) for i in items] if items else \
                    [(k, k) for k in sorted(data)]
                tmp = host + ".new"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                for key, rel in files:
                    if key not in data:
                        raise RuntimeError("ContainerCreating", 'MountVolume.SetUp failed for volume "%s" : '
                                           'references non-existent secret key: %s' % (v["name"], key))
                    p = os.path.join(tmp, rel)
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    with open(p, "wb") as f:
                        f.write(data[key])
                    os.chmod(p, sv.get("defaultMode", 0o644) & 0o777)
                shutil.rmtree(host, ignore_errors=True)
                os.rename(tmp, host)
                ro = True
            elif isinstance(v.get("configMap"), dict):
                cm = STORE.get(RES["configmaps"], self.ns, v["configMap"].get("name") or "")
                if cm is None and not v["configMap"].get("optional"):
                    raise RuntimeError("ContainerCreating", 'MountVolume.SetUp failed for volume "%s" : '
                                       'configmap "%s" not found' % (v["name"], v["configMap"].get("name")))
                os.makedirs(host, exist_ok=True)
                for k, val in ((cm or {}).get("data") or {}).items():
                    with open(os.path.join(host, k), "w") as f:
                        f.write(val)
                ro = True
            else:
                raise RuntimeError("CreateContainerConfigError", 'volume "%s": only emptyDir, '
                                   'persistentVolumeClaim, secret and configMap volumes are emulated' % v["name"])
            src = os.path.join(host, m["subPath"]) if m.get("subPath") else host
            if m.get("subPath"):
                os.makedirs(src, exist_ok=True)
            out.append((src, m.get("mountPath") or "/", ro))
        sa = self.service_account_dir()
        if sa and not any(p == SA_MOUNT for _, p, _ in out):
            out.append((sa, SA_MOUNT, True))
        return out

    def service_account_dir(self):
        """The token, ca.crt and namespace the kubelet mounts at SA_MOUNT (automountServiceAccountToken,
        the pod's else its service account's, default true); the token authenticates as the pod's
        service account, under RBAC, while the pod exists."""
        name = self.spec.get("serviceAccountName") or self.spec.get("serviceAccount") or "default"
        auto = self.spec.get("automountServiceAccountToken")
        if auto is None:
            sa = STORE.get(RES["serviceaccounts"], self.ns, name)
            auto = (sa or {}).get("automountServiceAccountToken", True)
        if auto is False:
            return None
        d = os.path.join(self.dir, "serviceaccount")
        with self.cond:      # once per pod, whichever container comes first
            if self.token is not None:
                return d
            os.makedirs(d, exist_ok=True)
            tok = "sa-%s-%s" % (self.uid[:8], uuid.uuid4().hex)
            with AUTHZ_LOCK:
                SA_TOKENS[tok] = (self.ns, name)
            self.token = tok
            ca = b""
            for f in (OPTS.ca_cert, OPTS.tls_cert):
                if f:
                    with open(f, "rb") as fh:
                        ca = fh.read()
                    break
            for fname, data in (("token", tok.encode()), ("namespace", self.ns.encode()), ("ca.crt", ca)):
                with open(os.path.join(d, fname), "wb") as fh:
                    fh.write(data)
        return d

    def container_env(self, c):
        """The container's environment (env wins over envFrom; later envFrom wins), or raises
        RuntimeError("CreateContainerConfigError", message) for a missing Secret/ConfigMap or key."""
        env = {"PATH": CONTAINER_PATH, "HOSTNAME": self.name, "HOME": "/root",
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.runtime.port),
               "KUBERNETES_PORT": "tcp://127.0.0.1:%d" % self.runtime.port}
        for ef in c.spec.get("envFrom") or []:
            prefix = ef.get("prefix") or ""
            for kind, res in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
                ref = ef.get(kind)
                if not isinstance(ref, dict):
                    continue
                obj = STORE.get(RES[res], self.ns, ref.get("name") or "")
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError("CreateContainerConfigError", '%s "%s" not found'
                                       % ("secret" if res == "secrets" else "configmap", ref.get("name")))
                vals = {k: v.decode("utf-8", "replace") for k, v in secret_bytes(obj).items()} \
                    if res == "secrets" else dict(obj.get("data") or {})
                for k, v in vals.items():
                    env[prefix + k] = v
        for e in c.spec.get("env") or []:
            name = e.get("name")
            if "value" in e or not isinstance(e.get("valueFrom"), dict):
                env[name] = expand_vars(str(e.get("value", "")), env)
                continue
            vf = e["valueFrom"]
            if isinstance(vf.get("secretKeyRef"), dict):
                ref = vf["secretKeyRef"]
                sec = STORE.get(RES["secrets"], self.ns, ref.get("name") or "")
                if sec is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError("CreateContainerConfigError", 'secret "%s" not found' % ref.get("name"))
                data = secret_bytes(sec)
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError("CreateContainerConfigError", "couldn't find key %s in Secret %s/%s"
                                       % (ref.get("key"), self.ns, ref.get("name")))
                env[name] = data[ref["key"]].decode("utf-8", "replace")
            elif isinstance(vf.get("configMapKeyRef"), dict):
                ref = vf["configMapKeyRef"]
                cm = STORE.get(RES["configmaps"], self.ns, ref.get("name") or "")
                val = ((cm or {}).get("data") or {}).get(ref.get("key"))
                if val is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError("CreateContainerConfigError", 'configmap "%s" not found' % ref.get("name")
                                       if cm is None else "couldn't find key %s in ConfigMap %s/%s"
                                       % (ref.get("key"), self.ns, ref.get("name")))
                env[name] = val
            elif isinstance(vf.get("fieldRef"), dict):
                fp = vf["fieldRef"].get("fieldPath")
                env[name] = {"metadata.name": self.name, "metadata.namespace": self.ns,
                             "metadata.uid": self.uid, "spec.nodeName": NODE_NAME,
                             "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                             "status.hostIP": "10.0.0.1"}.get(fp, "")
        return env

    def argv(self, c, env):
        cmd = [expand_vars(str(x), env) for x in c.spec.get("command") or []]
        args = [expand_vars(str(x), env) for x in c.spec.get("args") or []]
        argv = cmd + args
        if not argv:   # the image's entrypoint is unknown: an idle server
            argv = ["sleep", "2147483647"]
        return argv

    def sandbox_argv(self, c, argv, binds, term_file):
        bw = [shutil.which("bwrap") or "bwrap", "--die-with-parent"]
        for d in sorted(os.listdir("/")):
            p = "/" + d
            if d in ("proc", "dev", "tmp", "sys", "run"):
                continue
            if os.path.islink(p):
                bw += ["--symlink", os.readlink(p), p]
            elif os.path.isdir(p):
                bw += ["--bind", p, p]
        ctmp, crun = os.path.join(self.dir, "tmp"), os.path.join(self.dir, "run")
        os.makedirs(ctmp, exist_ok=True)
        os.makedirs(crun, exist_ok=True)
        bw += ["--dev-bind", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev", "--bind", ctmp, "/tmp",
               "--bind", crun, "/run"]
        for host, path, ro in binds:
            bw += ["--ro-bind" if ro else "--bind", host, sandbox_path(path)]
        bw += ["--bind", term_file, c.spec.get("terminationMessagePath") or "/dev/termination-log"]
        wd = c.spec.get("workingDir")
        if wd:
            bw += ["--dir", wd, "--chdir", wd]
        else:
            bw += ["--chdir", "/"]
        return bw + ["--"] + argv

    def wait_or_stop(self, seconds):
        return self.stop.wait(seconds)

    def run_container(self, c):
        try:
            self.run_container_runs(c)
        except Exception as e:   # an emulator bug: the container ends, the pod does not hang
            import traceback
            traceback.print_exc()
            now = now_iso()
            self.end_run(c, {"terminated": {"exitCode": 128, "reason": "StartError", "message":
                                            "kube emulator bug: %r" % (e,), "startedAt": now,
                                            "finishedAt": now}}, 128)

    def run_container_runs(self, c):
        backoff = max(OPTS.pace, 0.1)
        while not self.stop.is_set():
            if "pullerror" in c.image:
                self.pull_fails(c)
                return
            try:
                env = self.container_env(c)
                binds = self.volume_paths(c)
            except RuntimeError as e:
                reason, message = e.args
                self.set_state(c, {"waiting": {"reason": reason, "message": message}})
                self.wait_or_stop(0.2)   # the kubelet retries: the Secret may appear
                continue
            argv = self.argv(c, env)
            cdir = os.path.join(self.dir, "containers", c.name)
            os.makedirs(cdir, exist_ok=True)
            term_file = os.path.join(cdir, "termination-log-%d" % c.restarts)
            open(term_file, "wb").close()
            started = now_iso()
            exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", CONTAINER_PATH))
            if not exe or not os.path.exists(exe):
                msg = ('failed to create containerd task: failed to create shim task: OCI runtime create failed: '
                       'runc create failed: unable to start container process: exec: "%s": %s: unknown'
                       % (argv[0], "executable file not found in $PATH" if "/" not in argv[0]
                          else "stat %s: no such file or directory" % argv[0]))
                state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": msg,
                                        "startedAt": "1970-01-01T00:00:00Z", "finishedAt": started}}
                if not self.end_run(c, state, 128):
                    return
                continue
            with self.cond:
                if c.ever_started:
                    c.logs.append(RunLog())   # a new run: the old log is `previous`
            try:
                proc = subprocess.Popen(self.sandbox_argv(c, argv, binds, term_file), env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
            except OSError as e:
                state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(e),
                                        "startedAt": "1970-01-01T00:00:00Z", "finishedAt": started}}
                if not self.end_run(c, state, 128):
                    return
                continue
            with self.cond:
                c.proc = proc
                c.run_ended = False
            self.set_state(c, {"running": {"startedAt": started}}, running=True, ever_started=True)
            if self.stop.is_set():     # deleted while starting
                self.signal(c, signal.SIGTERM if self.deleting else signal.SIGKILL)
            if image_oom(c.image):
                threading.Thread(target=self.oom_killer, args=(c, proc), daemon=True).start()
            self.read_log(c, proc)
            rc = proc.wait()
            code = rc if rc >= 0 else 128 - rc
            finished = now_iso()
            with open(term_file, "rb") as f:
                msg = f.read(TERMINATION_MESSAGE_MAX)
            msg = msg.decode("utf-8", "replace")
            if (not msg and code != 0 and
                    c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"):
                with self.cond:
                    tail = b"".join(l for _, l in c.logs[-1].lines[-80:])[-2048:]
                msg = tail.decode("utf-8", "replace")
            if c.oom:
                code, reason = 137, "OOMKilled"
            else:
                reason = "Completed" if code == 0 else "Error"
            term = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished,
                    "containerID": "containerd://%s" % hashlib.sha256(
                        ("%s/%s/%d" % (self.uid, c.name, c.restarts)).encode()).hexdigest()}
            if msg:
                term["message"] = msg
            if not self.end_run(c, {"terminated": term}, code):
                return
            backoff = min(backoff * 2, 300)
        with self.cond:
            c.done = True      # stopped before (re)starting: no more runs

    def end_run(self, c, state, code):
        """Records a run's end; returns True when the container is restarted (after a back-off)."""
        policy = self.spec.get("restartPolicy", "Always")
        restart = (not self.stop.is_set() and self.pod_reason is None and
                   (policy == "Always" or (policy == "OnFailure" and code != 0)))
        if c.init:    # must succeed once: restarted on failure unless the pod's policy is Never
            restart = not self.stop.is_set() and self.pod_reason is None and code != 0 and policy != "Never"
        with self.cond:
            c.proc = None
            c.running = False
            c.run_ended = True
            if not restart:
                c.state, c.done = state, True
                self.cond.notify_all()
        if not restart:
            self.publish()
            return False
        backoff = min(max(OPTS.pace, 0.1) * (2 ** min(c.restarts, 8)), 300)
        with self.cond:
            c.last_state = state
            c.restarts += 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off %s restarting failed "
                                   "container=%s pod=%s_%s(%s)" % (human_duration(backoff) if backoff >= 1
                                                                  else "%.1fs" % backoff, c.name, self.name,
                                                                  self.ns, self.uid)}}
            self.cond.notify_all()
        self.publish()
        return not self.wait_or_stop(backoff)

    def pull_fails(self, c):
        n = 0
        msg_pull = ('Failed to pull image "%s": rpc error: code = NotFound desc = failed to pull and unpack image '
                    '"%s": failed to resolve reference "%s": %s: not found' % (c.image, c.image, c.image, c.image))
        while not self.stop.is_set():
            self.set_state(c, {"waiting": {"reason": "ErrImagePull", "message": msg_pull}})
            if self.wait_or_stop(max(OPTS.pace, 0.1)):
                break
            self.set_state(c, {"waiting": {"reason": "ImagePullBackOff",
                                           "message": 'Back-off pulling image "%s"' % c.image}})
            if self.wait_or_stop(min(max(OPTS.pace, 0.1) * 2 ** n, 300)):
                break
            n += 1
        with self.cond:
            c.done = True
            c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "message":
                                      "The container could not be located when the pod was terminated",
                                      "startedAt": None, "finishedAt": None}} if self.deleting else c.state

    def read_log(self, c, proc):
        """Reads the process's stdout+stderr, one record per line, stamped as it arrives."""
        buf = b""
        fd = proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            lines = buf.split(b"\n")
            buf = lines.pop()
            if lines:
                t = time.time_ns()
                with self.cond:
                    c.logs[-1].add([(t, l + b"\n") for l in lines])
                    self.cond.notify_all()
        if buf:
            with self.cond:
                c.logs[-1].add([(time.time_ns(), buf)])
                self.cond.notify_all()
        proc.stdout.close()

    def oom_killer(self, c, proc):
        """The memory limit: an `oom` image's container is killed after --pace seconds of running."""
        deadline = time.monotonic() + max(OPTS.pace, 0.05)
        while proc.poll() is None and time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.02)   # polling the process, bounded by the deadline
        c.oom = True
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def signal(self, c, sig):
        """SIGKILL: the container's whole process group.  Any other signal: the group but bwrap itself,
        which would die of it and take its child with it (--die-with-parent) before a trap could run."""
        p = c.proc
        if p is None or p.poll() is not None:
            return
        if sig == signal.SIGKILL:
            try:
                os.killpg(p.pid, sig)
            except OSError:
                pass
            return
        for pid in process_group(p.pid):
            if pid != p.pid:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def terminate(self, grace):
        """Graceful termination: SIGTERM to every container's process group now, SIGKILL after grace."""
        with self.cond:
            deadline = time.monotonic() + grace
            if self.kill_at is not None and self.kill_at <= deadline:
                return
            self.kill_at = deadline
            self.deleting = True
        self.stop.set()
        for c in self.all_containers():
            self.signal(c, signal.SIGTERM)
        threading.Thread(target=self.killer, daemon=True).start()

    def killer(self):
        while not self.finished.is_set():
            if time.monotonic() >= self.kill_at:
                for c in self.all_containers():
                    self.signal(c, signal.SIGKILL)
            self.finished.wait(0.05)

    def kill(self):
        """Force: the object is already gone; kill everything now."""
        with self.cond:
            self.kill_at = time.monotonic()
        self.stop.set()
        for c in self.all_containers():
            self.signal(c, signal.SIGKILL)

    def lose_node(self, delete_after, gc_after):
        """The node is gone: its processes die with it, the API keeps their last status; the node
        controller sets Ready=False, the taint manager deletes the pod after delete_after (Terminating,
        DisruptionTarget DeletionByTaintManager), the pod GC removes it gc_after later."""
        with self.plock:
            with self.cond:
                status = self.build_status()
                self.node_lost = True
                for c in status.get("conditions") or []:
                    if c["type"] == "Ready" and c["status"] == "True":
                        c["status"], c["lastTransitionTime"] = "False", now_iso()
        with STORE.lock:
            cur = STORE.objs["pods"].get((self.ns, self.name))
            if cur is not None and cur["metadata"]["uid"] == self.uid:
                STORE.update(RES["pods"], self.ns, self.name, {"metadata": {}, "status": status},
                             sub="status", check_rv=False)
        self.stop.set()
        for c in self.all_containers():
            self.signal(c, signal.SIGKILL)

        def later():
            if STOPPING.wait(delete_after):
                return
            with STORE.lock:
                cur = STORE.objs["pods"].get((self.ns, self.name))
                if cur is None or cur["metadata"]["uid"] != self.uid:
                    return
                new = jcopy(cur)
                st = new.setdefault("status", {})
                st.setdefault("conditions", []).insert(0, {
                    "type": "DisruptionTarget", "status": "True", "lastProbeTime": None,
                    "lastTransitionTime": now_iso(), "reason": "DeletionByTaintManager",
                    "message": "Taint manager: deleting due to NoExecute taint"})
                grace = (new.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                new["metadata"]["deletionTimestamp"] = now_iso(time.time() + grace)
                new["metadata"]["deletionGracePeriodSeconds"] = grace
                new["metadata"]["resourceVersion"] = str(STORE.next_rv())
                STORE.objs["pods"][(self.ns, self.name)] = new
                STORE._emit(RES["pods"], "MODIFIED", jcopy(new), jcopy(cur))
            if STOPPING.wait(gc_after):
                return
            with STORE.lock:
                cur = STORE.objs["pods"].get((self.ns, self.name))
                if cur is not None and cur["metadata"]["uid"] == self.uid:
                    STORE.delete(RES["pods"], self.ns, self.name)
        threading.Thread(target=later, daemon=True).start()

    def deadline_watch(self, seconds):
        """activeDeadlineSeconds, counted from startTime: the kubelet stops the pod (SIGTERM, SIGKILL after
        its grace period) and fails it, reason DeadlineExceeded."""
        if self.finished.wait(seconds) or self.stop.is_set():
            return
        with self.cond:
            if all(c.done for c in self.all_containers()):
                return
            self.pod_reason = "DeadlineExceeded"
            self.pod_message = "Pod was active on the node longer than the specified deadline"
            self.kill_at = time.monotonic() + self.spec.get("terminationGracePeriodSeconds", 30)
        self.stop.set()
        for c in self.all_containers():
            self.signal(c, signal.SIGTERM)
        threading.Thread(target=self.killer, daemon=True).start()

    def evict(self, message):
        with self.cond:
            self.pod_reason, self.pod_message = "Evicted", message
            self.disruption = ("TerminationByKubelet", message)
        self.stop.set()
        for c in self.all_containers():
            self.signal(c, signal.SIGKILL)


def pod_fault(kind, body):
    """POST /emulator/evict or /emulator/node-lost: the real, scheduled pods matching namespace/name
    (all when not given; a given name that matches nothing is 404). Returns their names."""
    ns, name = body.get("namespace"), body.get("name")
    pods = [p for p in STORE.list(RES["pods"], ns or None)
            if is_real_pod(p) and (not name or p["metadata"]["name"] == name)
            and (p.get("spec") or {}).get("nodeName") and not p["metadata"].get("deletionTimestamp")]
    if name and not pods:
        raise ApiError(404, "NotFound", 'pods "%s" not found (or not a scheduled standalone pod)' % name)
    out = []
    for p in pods:
        run = RUNTIME.get(p["metadata"]["uid"])
        if run is None or run.stop.is_set():
            continue
        if kind == "evict":
            first = ((p.get("spec") or {}).get("containers") or [{}])[0].get("name", "")
            run.evict(body.get("message") or
                      "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi. "
                      "Container %s was using 812Mi, request is 0, has larger consumption of memory. " % first)
        else:
            run.lose_node(float(body.get("delete_after", 1.0)), float(body.get("gc_after", 1.0)))
        out.append("%s/%s" % (p["metadata"]["namespace"], p["metadata"]["name"]))
    return out


def process_group(pgid):
    """The pids of the process group pgid (from /proc/PID/stat's 5th field)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            out.append(int(d))
    return out


def sandbox_path(path):
    """A mount path as bubblewrap must name it: through the host's symlinks (/var/run -> /run), since
    it cannot make a mount point behind a symlink; /tmp, /run, /dev and /proc are the pod's own."""
    norm = os.path.normpath("/" + path)
    if norm.split("/")[1] in ("tmp", "run", "dev", "proc"):
        return norm
    return os.path.realpath(norm)


def pvc_dir(ns, claim):
    return os.path.join(POD_ROOT, "pvcs", ns, claim)


class Runtime:
    """The real pods' kubelet: starts a PodRun for each real pod, forgets it when its object is gone."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.Lock()
        self.runs = {}       # uid -> PodRun

    def sync(self, pods):
        """Called by the controller (store lock held) with every pod."""
        live = set()
        for p in pods:
            if not is_real_pod(p):
                continue
            uid = p["metadata"]["uid"]
            live.add(uid)
            with self.lock:
                if uid not in self.runs:
                    run = PodRun(self, p)
                    self.runs[uid] = run
                    run.thread.start()
        with self.lock:
            gone = [r for u, r in self.runs.items() if u not in live]
        for r in gone:
            if not r.stop.is_set():
                r.kill()
            if r.finished.is_set():
                with self.lock:
                    self.runs.pop(r.uid, None)
                if r.token:
                    with AUTHZ_LOCK:
                        SA_TOKENS.pop(r.token, None)
                shutil.rmtree(r.dir, ignore_errors=True)

    def get(self, uid):
        with self.lock:
            return self.runs.get(uid)

    def remove_object(self, run):
        """A gracefully deleted pod whose containers all ended: the kubelet's final delete."""
        with STORE.lock:
            cur = STORE.objs["pods"].get((run.ns, run.name))
            if cur is not None and cur["metadata"]["uid"] == run.uid:
                STORE.delete(RES["pods"], run.ns, run.name)

    def stop_all(self):
        with self.lock:
            runs = list(self.runs.values())
        for r in runs:
            r.kill()
        for r in runs:
            r.finished.wait(5)


RUNTIME = None


# ---------------------------------------------------------------------------
# identities and RBAC (rbac.authorization.k8s.io/v1, evaluated as the RBAC authorizer does)

Identity = collections.namedtuple("Identity", "user groups enforced")
ADMIN = Identity("system:admin", ("system:masters", "system:authenticated"), False)
AUTHZ_LOCK = threading.Lock()
SA_TOKENS = {}    # bearer token -> (namespace, service account)


def sa_identity(ns, name):
    return Identity("system:serviceaccount:%s:%s" % (ns, name),
                    ("system:serviceaccounts", "system:serviceaccounts:%s" % ns, "system:authenticated"), True)


def user_identity(user, groups):
    m = re.match(r"^system:serviceaccount:([^:]+):([^:]+)$", user)
    if m and not groups:
        return sa_identity(m.group(1), m.group(2))
    groups = tuple(groups) + ("system:authenticated",)
    return Identity(user, groups, "system:masters" not in groups)


def subject_matches(ident, s, binding_ns):
    kind = s.get("kind")
    if kind == "ServiceAccount":
        return ident.user == "system:serviceaccount:%s:%s" % (s.get("namespace") or binding_ns, s.get("name"))
    if kind == "User":
        return ident.user == s.get("name")
    if kind == "Group":
        return s.get("name") in ident.groups
    return False


def rule_allows(rule, verb, group, resource, sub, name):
    if not any(v in ("*", verb) for v in rule.get("verbs") or []):
        return False
    if not any(g in ("*", group) for g in rule.get("apiGroups") or []):
        return False
    want = resource + ("/" + sub if sub else "")
    if not any(r in ("*", want) or (sub and r == "*/" + sub) or (not sub and r == resource)
               for r in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name and name in names)


def authorize(ident, verb, group, resource, sub, ns, name):
    """(allowed, reason) for a resource request, as the RBAC authorizer: RoleBindings of ns (to a Role
    of ns or a ClusterRole) and ClusterRoleBindings; self-reviews are open to everyone (system:basic-user)."""
    if not ident.enforced:
        return True, ""
    if group == AUTHZ and resource in ("selfsubjectaccessreviews", "selfsubjectrulesreviews") and verb == "create":
        return True, 'RBAC: allowed by ClusterRoleBinding "system:basic-user" of ClusterRole "system:basic-user"'
    with STORE.lock:
        bindings = []
        if ns:
            bindings += [("RoleBinding", b) for b in STORE.list(RES["rolebindings"], ns)]
        bindings += [("ClusterRoleBinding", b) for b in STORE.list(RES["clusterrolebindings"])]
        for bkind, b in bindings:
            bns = b["metadata"].get("namespace", "")
            if not any(subject_matches(ident, s, bns) for s in b.get("subjects") or []):
                continue
            rr = b.get("roleRef") or {}
            if rr.get("kind") == "Role" and bkind == "RoleBinding":
                role = STORE.get(RES["roles"], bns, rr.get("name") or "")
            elif rr.get("kind") == "ClusterRole":
                role = STORE.get(RES["clusterroles"], "", rr.get("name") or "")
            else:
                role = None
            for rule in (role or {}).get("rules") or []:
                if rule_allows(rule, verb, group, resource, sub, name):
                    subj = next(s for s in b.get("subjects") or [] if subject_matches(ident, s, bns))
                    who = "%s \"%s%s\"" % (subj.get("kind"), subj.get("name"),
                                            "/" + (subj.get("namespace") or bns) if subj.get("kind") ==
                                            "ServiceAccount" else "")
                    where = '"%s/%s"' % (b["metadata"]["name"], bns) if bkind == "RoleBinding" else \
                        '"%s"' % b["metadata"]["name"]
                    return True, 'RBAC: allowed by %s %s of %s "%s" to %s' % (bkind, where, rr.get("kind"),
                                                                          rr.get("name"), who)
    return False, ""


def forbidden(ident, verb, res, sub, ns, name):
    what = res.qualified() + (' "%s"' % name if name else "")
    scope = 'in the namespace "%s"' % ns if ns else "at the cluster scope"
    return ApiError(403, "Forbidden", '%s is forbidden: User "%s" cannot %s resource "%s" in API group "%s" %s'
                    % (what, ident.user, verb, res.plural + ("/" + sub if sub else ""), res.group, scope),
                    {"name": name or "", "group": res.group, "kind": res.plural})


def pb_fields(buf):
    """A protobuf message's fields: {number: [value...]} (varints as int, length-delimited as bytes)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = pb_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = pb_varint(buf, i)
        elif wt == 2:
            n, i = pb_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ApiError(400, "BadRequest", "unsupported protobuf wire type %d" % wt)
        out.setdefault(num, []).append(v)
    return out


def pb_varint(buf, i):
    shift = v = 0
    while True:
        if i >= len(buf):
            raise ApiError(400, "BadRequest", "truncated protobuf")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def ssar_from_protobuf(raw):
    """The JSON form of a protobuf SelfSubjectAccessReview (runtime.Unknown envelope after 'k8s\\0';
    generated.proto field numbers of authorization/v1)."""
    if not raw.startswith(b"k8s\x00"):
        raise ApiError(400, "BadRequest", "protobuf body without the k8s envelope")
    unknown = pb_fields(raw[4:])
    review = pb_fields((unknown.get(2) or [b""])[0])
    spec = pb_fields((review.get(2) or [b""])[0])
    s = lambda f, n: (f.get(n) or [b""])[0].decode()
    out = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {}}
    if 1 in spec:
        ra = pb_fields(spec[1][0])
        out["spec"]["resourceAttributes"] = {k: s(ra, n) for k, n in (
            ("namespace", 1), ("verb", 2), ("group", 3), ("version", 4), ("resource", 5),
            ("subresource", 6), ("name", 7))}
    if 2 in spec:
        na = pb_fields(spec[2][0])
        out["spec"]["nonResourceAttributes"] = {"path": s(na, 1), "verb": s(na, 2)}
    return out


def ssrr_from_protobuf(raw):
    """A protobuf SelfSubjectRulesReview (kubectl auth can-i --list): spec.namespace is field 1 of field 2."""
    if not raw.startswith(b"k8s\x00"):
        raise ApiError(400, "BadRequest", "protobuf body without the k8s envelope")
    review = pb_fields((pb_fields(raw[4:]).get(2) or [b""])[0])
    spec = pb_fields((review.get(2) or [b""])[0])
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
            "spec": {"namespace": (spec.get(1) or [b""])[0].decode()}}


def self_subject_rules_review(ident, body):
    """The rules the caller has in spec.namespace: its RoleBindings' and ClusterRoleBindings' roles, plus
    the self reviews and discovery everyone has."""
    ns = (body.get("spec") or {}).get("namespace") or ""
    if not ident.enforced:
        rules = [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}]
        non = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
    else:
        rules = [{"verbs": ["create"], "apiGroups": [AUTHZ],
                  "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"]}]
        non = [{"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz",
                                                      "/livez", "/openapi", "/openapi/*", "/readyz",
                                                      "/version", "/version/"]}]
        with STORE.lock:
            bindings = [("RoleBinding", b) for b in (STORE.list(RES["rolebindings"], ns) if ns else [])]
            bindings += [("ClusterRoleBinding", b) for b in STORE.list(RES["clusterrolebindings"])]
            for bkind, b in bindings:
                bns = b["metadata"].get("namespace", "")
                if not any(subject_matches(ident, sj, bns) for sj in b.get("subjects") or []):
                    continue
                rr = b.get("roleRef") or {}
                role = (STORE.get(RES["roles"], bns, rr.get("name") or "")
                        if rr.get("kind") == "Role" and bkind == "RoleBinding" else
                        STORE.get(RES["clusterroles"], "", rr.get("name") or "")
                        if rr.get("kind") == "ClusterRole" else None)
                for rule in (role or {}).get("rules") or []:
                    if rule.get("nonResourceURLs"):
                        non.append({"verbs": rule.get("verbs") or [], "nonResourceURLs": rule["nonResourceURLs"]})
                    else:
                        r = {k: rule.get(k) or [] for k in ("verbs", "apiGroups", "resources")}
                        if rule.get("resourceNames"):
                            r["resourceNames"] = rule["resourceNames"]
                        rules.append(r)
    return {"kind": "SelfSubjectRulesReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": {"namespace": ns},
            "status": {"resourceRules": rules, "nonResourceRules": non, "incomplete": False}}


def self_subject_access_review(ident, body):
    spec = body.get("spec") or {}
    ra = spec.get("resourceAttributes")
    if ra:
        allowed, reason = authorize(ident, ra.get("verb", ""), ra.get("group", ""), ra.get("resource", ""),
                                    ra.get("subresource", ""), ra.get("namespace", ""), ra.get("name", ""))
    elif spec.get("nonResourceAttributes"):
        allowed, reason = True, "non-resource URLs are open (system:discovery, system:public-info-viewer)"
    else:
        raise ApiError(422, "Invalid", 'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                       "spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes "
                       "or resourceAttributes must be specified")
    if not ident.enforced:
        reason = ""
    st = {"allowed": allowed}
    if reason:
        st["reason"] = reason
    return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": st}


def delete_options(raw, q):
    """DeleteOptions from the body when there is one, else from the query (never both)."""
    opts = {}
    if raw and raw.strip():
        try:
            opts = json.loads(raw.decode())
        except ValueError as e:
            raise ApiError(400, "BadRequest", "the body of the request could not be decoded as JSON: %s" % e)
        if not isinstance(opts, dict):
            opts = {}
    else:
        for k in ("gracePeriodSeconds", "propagationPolicy", "orphanDependents"):
            if k in q:
                opts[k] = q[k]
    g = opts.get("gracePeriodSeconds")
    if g is not None:
        try:
            opts["gracePeriodSeconds"] = int(g)
        except (TypeError, ValueError):
            raise ApiError(400, "BadRequest", "gracePeriodSeconds: invalid value %r" % (g,))
    pp = opts.get("propagationPolicy")
    if pp not in (None, "Orphan", "Background", "Foreground"):
        raise ApiError(422, "Invalid", 'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                       'value: "%s": supported values: "Foreground", "Background", "Orphan", "nil"' % pp)
    return opts


def check_preconditions(res, cur, opts):
    pre = opts.get("preconditions") or {}
    md = cur["metadata"]
    if pre.get("uid") and pre["uid"] != md["uid"]:
        raise ApiError(409, "Conflict", 'Operation cannot be fulfilled on %s "%s": Precondition failed: UID in '
                       "precondition: %s, UID in object meta: %s" % (res.qualified(), md["name"], pre["uid"],
                                                                     md["uid"]),
                       {"name": md["name"], "group": res.group, "kind": res.plural})
    if pre.get("resourceVersion") and pre["resourceVersion"] != md["resourceVersion"]:
        raise ApiError(409, "Conflict", 'Operation cannot be fulfilled on %s "%s": Precondition failed: '
                       "ResourceVersion in precondition: %s, ResourceVersion in object meta: %s"
                       % (res.qualified(), md["name"], pre["resourceVersion"], md["resourceVersion"]),
                       {"name": md["name"], "group": res.group, "kind": res.plural})


def claim_in_use(ns, name):
    """A pod not yet Succeeded/Failed mounts the claim (the pvc-protection controller's test)."""
    for (pns, _), p in STORE.objs["pods"].items():
        if pns != ns or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for v in (p.get("spec") or {}).get("volumes") or []:
            if (v.get("persistentVolumeClaim") or {}).get("claimName") == name:
                return True
    return False


def delete_claim(ns, name, dry=False, opts=None):
    """DELETE of a claim: with a pod still using it, it stays Terminating (deletionTimestamp, finalizer
    kubernetes.io/pvc-protection) until that pod is gone; then it goes, with its directory."""
    res = RES["persistentvolumeclaims"]
    with STORE.lock:
        cur = STORE.objs[res.plural].get((ns, name))
        if cur is None:
            raise STORE.not_found(res, name)
        check_preconditions(res, cur, opts or {})
        if dry:
            return jcopy(cur)
        if not claim_in_use(ns, name):
            return STORE.delete(res, ns, name)
        if not cur["metadata"].get("deletionTimestamp"):
            new = jcopy(cur)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = str(STORE.next_rv())
            STORE.objs[res.plural][(ns, name)] = new
            STORE._emit(res, "MODIFIED", jcopy(new), jcopy(cur))
            cur = new
        return jcopy(cur)


def delete_pod(ns, name, grace, dry=False, opts=None):
    """DELETE of a pod.  Real pods terminate gracefully: deletionTimestamp set, SIGTERM, SIGKILL after
    the grace period, the object removed once every container ended.  0 (force), an unscheduled pod,
    a pod in a terminal phase or one with no process: removed at once.  Controller-made pods are removed
    at once (the synthetic kubelet has nothing to stop)."""
    res = RES["pods"]
    with STORE.lock:
        cur = STORE.objs["pods"].get((ns, name))
        if cur is None:
            raise STORE.not_found(res, name)
        check_preconditions(res, cur, opts or {})
        if dry:
            return jcopy(cur)
        if not is_real_pod(cur):
            return STORE.delete(res, ns, name)
        run = RUNTIME.get(cur["metadata"]["uid"])
        if grace is None:
            grace = (cur.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        if grace < 0:
            grace = 1
        phase = (cur.get("status") or {}).get("phase")
        if not (cur.get("spec") or {}).get("nodeName") or phase in ("Succeeded", "Failed") or run is None:
            grace = 0
        md = cur["metadata"]
        if grace == 0:
            out = STORE.delete(res, ns, name)
            if run is not None:
                run.kill()
            return out
        deadline = time.time() + grace
        old = md.get("deletionTimestamp")
        if old is None or parse_iso(old) > deadline:
            new = jcopy(cur)
            new["metadata"]["deletionTimestamp"] = now_iso(deadline)
            new["metadata"]["deletionGracePeriodSeconds"] = grace
            new["metadata"]["resourceVersion"] = str(STORE.next_rv())
            STORE.objs["pods"][(ns, name)] = new
            STORE._emit(res, "MODIFIED", jcopy(new), jcopy(cur))
            cur = new
    run.terminate(grace)
    return jcopy(cur)


def pod_log(pod, run, q):
    """Validates PodLogOptions; returns (container run, instance log, lines-so-far filter state) or raises."""
    name = pod["metadata"]["name"]
    cs = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    ics = [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
    cname = q.get("container")
    if not cname:
        if len(cs) != 1:
            raise ApiError(400, "BadRequest", "a container name must be specified for pod %s, choose one of: "
                           "[%s]%s" % (name, " ".join(cs), " or one of the init containers: [%s]" % " ".join(ics)
                                       if ics else ""))
        cname = cs[0]
    if cname not in cs + ics:
        raise ApiError(400, "BadRequest", "container %s is not valid for pod %s" % (cname, name))
    causes = []
    for k, lo in (("tailLines", 0), ("limitBytes", 1), ("sinceSeconds", 1)):
        if q.get(k) not in (None, ""):
            try:
                v = int(q[k])
            except ValueError:
                raise ApiError(400, "BadRequest", "%s: invalid value %r" % (k, q[k]))
            if v < lo:
                causes.append({"field": k, "message": "Invalid value: %d: must be greater than %s"
                               % (v, "or equal to 0" if lo == 0 else "0")})
    if q.get("sinceSeconds") and q.get("sinceTime"):
        causes.append({"field": "sinceSeconds", "message": "Forbidden: at most one of `sinceTime` or "
                       "`sinceSeconds` may be specified"})
    if q.get("sinceTime") and parse_rfc3339(q["sinceTime"]) is None:
        raise ApiError(400, "BadRequest", 'parsing time "%s" as "2006-01-02T15:04:05Z07:00": cannot parse'
                       % q["sinceTime"])
    if causes:
        raise ApiError(422, "Invalid", 'PodLogOptions "%s" is invalid: %s' % (name, ", ".join(
            "%s: %s" % (c["field"], c["message"]) for c in causes)),
            {"name": name, "kind": "PodLogOptions", "causes": [dict(reason="FieldValueInvalid", **c)
                                                                 for c in causes]})
    if run is None:
        return None, None
    c = next(x for x in run.all_containers() if x.name == cname)
    with run.cond:
        previous = truthy(q.get("previous"))
        if previous:
            if len(c.logs) < 2 or not c.last_state.get("terminated"):
                raise ApiError(400, "BadRequest", 'previous terminated container "%s" in pod "%s" not found'
                               % (cname, name))
            return c, c.logs[-2]
        if not c.ever_started:
            w = (c.state.get("waiting") or {}).get("reason", "ContainerCreating")
            if w in ("ErrImagePull",):
                msg = "trying and failing to pull image"
            elif w == "ImagePullBackOff":
                msg = "image can't be pulled"
            else:
                msg = w
            if run.scheduled is not True:
                return None, None    # not scheduled: no kubelet to ask, an empty body
            raise ApiError(400, "BadRequest", 'container "%s" in pod "%s" is waiting to start: %s'
                           % (cname, name, msg))
        return c, c.logs[-1]



# ---------------------------------------------------------------------------
# synthetic mesh traffic and the Istio metrics a real Prometheus scrapes

BUCKETS = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
           600000, 1800000, 3600000]   # istio's default duration buckets (ms)
LABELS = ("reporter", "source_workload", "source_workload_namespace", "destination_workload",
          "destination_workload_namespace", "destination_app", "destination_version", "destination_service",
          "destination_service_name", "destination_service_namespace", "destination_canonical_service",
          "destination_canonical_revision", "request_protocol", "response_code", "response_flags",
          "connection_security_policy")


def short_host(host, vs_ns):
    """VS destination host → (service name, namespace)."""
    parts = (host or "").split(".")
    if len(parts) >= 2 and parts[1] and (len(parts) == 2 or parts[2] == "svc"):
        return parts[0], parts[1]
    return parts[0], vs_ns


class Traffic(threading.Thread):
    def __init__(self, store):
        threading.Thread.__init__(self, name="traffic", daemon=True)
        self.store = store
        self.lock = threading.Lock()
        self.rng = random.Random(OPTS.seed)
        self.requests = collections.OrderedDict()    # label tuple -> count
        self.hist = collections.OrderedDict()        # label tuple -> [bucket counts..., sum, count]
        self.carry = collections.defaultdict(float)
        self.rates = {}     # (namespace|None, workload|None, version) -> {"rate":, "code":, "latency_ms":}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(OPTS.traffic_interval):
            try:
                with self.store.lock:
                    shares = self.shares()
                with self.lock:
                    for key, share in shares:
                        self.generate(key, share * OPTS.rps * OPTS.traffic_interval)
            except Exception as e:
                sys.stderr.write("kube-emulator: traffic error: %r\n" % (e,))

    def setting(self, ns, workload, version):
        for k in ((ns, workload, version), (ns, workload, None), (None, None, version)):
            if k in self.rates:
                return self.rates[k]
        return {}

    def shares(self):
        """[(label info, share of --rps)] for each (deployment, ReplicaSet version) with available pods."""
        out = []
        deps = [d for d in self.store.list(RES["deployments"]) if (d.get("status") or {}).get("availableReplicas")]
        weight = {}   # deployment uid -> (share, service) ; None = not routed by any VirtualService
        svcs = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self.store.list(RES["services"])}
        drs = self.store.list(RES["destinationrules"])

        def selects(svc, dep, extra):
            labels = ((dep["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
            sel = (svc.get("spec") or {}).get("selector") or {}
            return sel and all(labels.get(k) == v for k, v in list(sel.items()) + list(extra.items()))

        for vs in self.store.list(RES["virtualservices"]):
            vns = vs["metadata"]["namespace"]
            routes = (vs.get("spec") or {}).get("http") or []
            route = next((r for r in routes if not r.get("match")), routes[-1] if routes else None)
            dests = (route or {}).get("route") or []
            total = sum(d.get("weight", 0) for d in dests) or 100
            for d in dests:
                w = d.get("weight", 100 if len(dests) == 1 else 0) / float(total)
                host, hns = short_host((d.get("destination") or {}).get("host"), vns)
                svc = svcs.get((hns, host))
                if not svc:
                    continue
                subset = (d.get("destination") or {}).get("subset")
                extra = {}
                if subset:
                    for dr in drs:
                        if dr["metadata"]["namespace"] == vns and short_host(dr["spec"].get("host"), vns) == (host, hns):
                            for s in dr["spec"].get("subsets") or []:
                                if s.get("name") == subset:
                                    extra = s.get("labels") or {}
                targets = [dep for dep in deps if dep["metadata"]["namespace"] == hns and selects(svc, dep, extra)]
                n = sum(dep["status"]["availableReplicas"] for dep in targets)
                for dep in targets:
                    prev = weight.get(dep["metadata"]["uid"], (0.0, svc))[0]
                    weight[dep["metadata"]["uid"]] = (prev + w * dep["status"]["availableReplicas"] / n, svc)
                # deployments selected by a routed service but given weight 0 still count as routed
                for dep in deps:
                    if dep["metadata"]["namespace"] == hns and selects(svc, dep, {}):
                        weight.setdefault(dep["metadata"]["uid"], (0.0, svc))
        for dep in deps:
            ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
            share, svc = weight.get(dep["metadata"]["uid"], (None, None))
            if share is None:
                share = 1.0
                svc = next((s for s in svcs.values() if s["metadata"]["namespace"] == ns and
                            selects(s, dep, {})), None)
            if share <= 0:
                continue
            rss = [r for r in self.store.list(RES["replicasets"], ns) if controlled_by(r, dep)
                   and (r.get("status") or {}).get("availableReplicas")]
            n = sum(r["status"]["availableReplicas"] for r in rss)
            for r in rss:
                tmpl = r["spec"].get("template") or {}
                labels = (tmpl.get("metadata") or {}).get("labels") or {}
                images = [c.get("image") or "" for c in (tmpl.get("spec") or {}).get("containers") or []]
                info = {"ns": ns, "workload": name, "labels": labels, "images": images,
                        "svc": svc["metadata"]["name"] if svc else None}
                out.append((info, share * r["status"]["availableReplicas"] / n))
        return out

    def generate(self, info, n_float):
        ns, wl, labels = info["ns"], info["workload"], info["labels"]
        version = labels.get("version", "unknown")
        s = self.setting(ns, wl, version)
        # The tag only: in "reg:5000/app:1.2-bad@sha256:..." the digest's hex
        # may hold "bad" too, which must not make a good release fail.
        bad = any("bad" in img.rsplit("/", 1)[-1].split("@", 1)[0].partition(":")[2]
                  for img in info["images"])
        rate = s.get("rate", OPTS.bad_error_rate if bad else OPTS.error_rate)
        code = str(s.get("code", 500))
        base = s.get("latency_ms", OPTS.latency_ms)
        ck = (ns, wl, version)
        total = n_float + self.carry[ck]
        n = int(total)
        self.carry[ck] = total - n
        errs_f = n * rate + self.carry[ck + ("err",)]
        errs = int(errs_f)
        self.carry[ck + ("err",)] = errs_f - errs
        svc = info["svc"]
        common = {"reporter": "destination", "source_workload": "unknown", "source_workload_namespace": "unknown",
                  "destination_workload": wl, "destination_workload_namespace": ns,
                  "destination_app": labels.get("app", "unknown"), "destination_version": version,
                  "destination_service": "%s.%s.svc.cluster.local" % (svc, ns) if svc else "unknown",
                  "destination_service_name": svc or "unknown", "destination_service_namespace": ns if svc else "unknown",
                  "destination_canonical_service": labels.get("service.istio.io/canonical-name", labels.get("app", wl)),
                  "destination_canonical_revision": labels.get("service.istio.io/canonical-revision", labels.get("version", "latest")),
                  "request_protocol": "http", "response_flags": "-", "connection_security_policy": "mutual_tls"}
        for rcode, count in (("200", n - errs), (code, errs)):
            if count <= 0:
                continue
            key = tuple(common.get(k, rcode) if k != "response_code" else rcode for k in LABELS)
            self.requests[key] = self.requests.get(key, 0) + count
            h = self.hist.setdefault(key, [0] * len(BUCKETS) + [0.0, 0])
            for _ in range(count):
                lat = base * (0.5 + self.rng.random())
                for i, b in enumerate(BUCKETS):
                    if lat <= b:
                        h[i] += 1
                h[-2] += lat
                h[-1] += 1

    def render(self):
        def lbl(key, extra=""):
            s = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"'))
                         for k, v in zip(LABELS, key))
            return "{%s%s}" % (s, extra)
        out = ["# HELP istio_requests_total Total requests.", "# TYPE istio_requests_total counter"]
        with self.lock:
            for key, v in self.requests.items():
                out.append("istio_requests_total%s %d" % (lbl(key), v))
            out += ["# HELP istio_request_duration_milliseconds Request duration in milliseconds.",
                    "# TYPE istio_request_duration_milliseconds histogram"]
            for key, h in self.hist.items():
                for i, b in enumerate(BUCKETS):
                    out.append("istio_request_duration_milliseconds_bucket%s %d"
                               % (lbl(key, ',le="%s"' % b), h[i]))
                out.append("istio_request_duration_milliseconds_bucket%s %d" % (lbl(key, ',le="+Inf"'), h[-1]))
                out.append("istio_request_duration_milliseconds_sum%s %s" % (lbl(key), repr(round(h[-2], 3))))
                out.append("istio_request_duration_milliseconds_count%s %d" % (lbl(key), h[-1]))
        return "\n".join(out) + "\n"

    def state(self):
        with self.lock:
            tot = collections.defaultdict(lambda: collections.Counter())
            for key, v in self.requests.items():
                d = dict(zip(LABELS, key))
                tot["%s/%s/%s" % (d["destination_workload_namespace"], d["destination_workload"],
                                  d["destination_version"])][d["response_code"]] += v
            return {"requests": {k: dict(v) for k, v in tot.items()},
                    "settings": [{"namespace": k[0], "workload": k[1], "version": k[2], **v}
                                 for k, v in self.rates.items()]}


# ---------------------------------------------------------------------------
# fault injection

class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, f):
        if not isinstance(f, dict):
            raise ApiError(400, "BadRequest", "fault must be an object")
        f = {"path_prefix": f.get("path_prefix", f.get("path", "/")), "method": (f.get("method") or "").upper(),
             "count": int(f.get("count", 1)), "status": int(f.get("status", 500)),
             "reset": bool(f.get("reset", False)), "delay_ms": int(f.get("delay_ms", 0)),
             "after": bool(f.get("after", False)),
             "retry_after": f.get("retry_after"), "message": f.get("message")}
        with self.lock:
            self.items.append(f)
        return f

    def take(self, method, path):
        with self.lock:
            for f in self.items:
                if path.startswith(f["path_prefix"]) and f["method"] in ("", method) and f["count"] != 0:
                    f["count"] -= 1
                    if f["count"] == 0:
                        self.items.remove(f)
                    return dict(f)
        return None


FAULTS = Faults()


class RequestLog:
    """Every API request as Kubernetes' RequestInfo names it (GET /emulator/requests)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def record(self, e):
        with self.lock:
            e["seq"] = len(self.items) + 1 + getattr(self, "dropped", 0)
            self.items.append(e)
            if len(self.items) > 100000:
                self.dropped = getattr(self, "dropped", 0) + 50000
                del self.items[:50000]

    def snapshot(self):
        with self.lock:
            return list(self.items)


REQUESTS = RequestLog()
CONTROLLER = None
TRAFFIC = None


# ---------------------------------------------------------------------------
# server-side printing (kubectl get asks for meta.k8s.io Table)

def col(name, typ="string", fmt="", prio=0, desc=""):
    return {"name": name, "type": typ, "format": fmt, "description": desc or name, "priority": prio}


def age(obj):
    return human_duration(time.time() - parse_iso(obj["metadata"].get("creationTimestamp")))


def containers_images(tmpl_spec):
    cs = (tmpl_spec or {}).get("containers") or []
    return ",".join(c.get("name", "") for c in cs), ",".join(c.get("image", "") for c in cs)


def pod_row(p):
    """kubectl's printPod (pkg/printers/internalversion/printers.go)."""
    st = p.get("status") or {}
    cs = st.get("containerStatuses") or []
    ready = sum(1 for c in cs if c.get("ready"))
    total = len((p.get("spec") or {}).get("containers") or [])
    reason = st.get("reason") or st.get("phase", "Pending")
    has_running = False
    initializing = False
    inits = st.get("initContainerStatuses") or []
    for i, c in enumerate(inits):
        state = c.get("state") or {}
        t, w = state.get("terminated"), state.get("waiting")
        if t and t.get("exitCode") == 0:
            continue
        if t:
            reason = "Init:" + t["reason"] if t.get("reason") else "Init:ExitCode:%d" % t.get("exitCode", 0)
        elif w and w.get("reason") and w["reason"] != "PodInitializing":
            reason = "Init:" + w["reason"]
        else:
            reason = "Init:%d/%d" % (i, len((p.get("spec") or {}).get("initContainers") or []))
        initializing = True
        break
    for c in reversed(cs if not initializing else []):
        state = c.get("state") or {}
        w, t = state.get("waiting"), state.get("terminated")
        if w and w.get("reason"):
            reason = w["reason"]
        elif t and t.get("reason"):
            reason = t["reason"]
        elif t:
            reason = "Signal:%d" % t["signal"] if t.get("signal") else "ExitCode:%d" % t.get("exitCode", 0)
        elif c.get("ready") and state.get("running"):
            has_running = True
    if reason == "Completed" and has_running:
        reason = "Running"
    if p["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(c.get("restartCount", 0) for c in cs + inits)
    return ["%d/%d" % (ready, total), reason, str(restarts), age(p), st.get("podIP", "<none>"),
            (p.get("spec") or {}).get("nodeName", "<none>"), "<none>", "<none>"]


def svc_ports(s):
    out = []
    for p in (s.get("spec") or {}).get("ports") or []:
        x = "%s/%s" % (p.get("port"), p.get("protocol", "TCP"))
        if p.get("nodePort"):
            x = "%s:%s/%s" % (p.get("port"), p["nodePort"], p.get("protocol", "TCP"))
        out.append(x)
    return ",".join(out) or "<none>"


TABLES = {
    "namespaces": ([col("Status"), col("Age")],
                   lambda o: [(o.get("status") or {}).get("phase", ""), age(o)]),
    "pods": ([col("Ready"), col("Status"), col("Restarts"), col("Age"), col("IP", prio=1), col("Node", prio=1),
              col("Nominated Node", prio=1), col("Readiness Gates", prio=1)], pod_row),
    "services": ([col("Type"), col("Cluster-IP"), col("External-IP"), col("Port(s)"), col("Age"),
                  col("Selector", prio=1)],
                 lambda o: [o["spec"].get("type"), o["spec"].get("clusterIP", "<none>") or "<none>", "<none>",
                            svc_ports(o), age(o),
                            ",".join("%s=%s" % kv for kv in sorted((o["spec"].get("selector") or {}).items()))
                            or "<none>"]),
    "configmaps": ([col("Data", "integer"), col("Age")], lambda o: [len(o.get("data") or {}), age(o)]),
    "events": ([col("Last Seen"), col("Type"), col("Reason"), col("Object"), col("Message")],
               lambda o: [age(o), o.get("type", ""), o.get("reason", ""),
                          "%s/%s" % ((o.get("involvedObject") or {}).get("kind", "").lower(),
                                     (o.get("involvedObject") or {}).get("name", "")), o.get("message", "")]),
    "deployments": ([col("Ready"), col("Up-to-date", "integer"), col("Available", "integer"), col("Age"),
                     col("Containers", prio=1), col("Images", prio=1), col("Selector", prio=1)],
                    lambda o: ["%d/%d" % ((o.get("status") or {}).get("readyReplicas", 0), o["spec"].get("replicas", 1)),
                               (o.get("status") or {}).get("updatedReplicas", 0),
                               (o.get("status") or {}).get("availableReplicas", 0), age(o)] +
                    list(containers_images((o["spec"].get("template") or {}).get("spec"))) +
                    [label_selector_string(o["spec"].get("selector"))]),
    "replicasets": ([col("Desired", "integer"), col("Current", "integer"), col("Ready", "integer"), col("Age"),
                     col("Containers", prio=1), col("Images", prio=1), col("Selector", prio=1)],
                    lambda o: [o["spec"].get("replicas", 1), (o.get("status") or {}).get("replicas", 0),
                               (o.get("status") or {}).get("readyReplicas", 0), age(o)] +
                    list(containers_images((o["spec"].get("template") or {}).get("spec"))) +
                    [label_selector_string(o["spec"].get("selector"))]),
    "secrets": ([col("Type"), col("Data", "integer"), col("Age")],
                lambda o: [o.get("type", "Opaque"), len(o.get("data") or {}), age(o)]),
    "persistentvolumeclaims": ([col("Status"), col("Volume"), col("Capacity"), col("Access Modes"),
                                col("StorageClass"), col("VolumeAttributesClass"), col("Age"),
                                col("VolumeMode", prio=1)],
                               lambda o: [(o.get("status") or {}).get("phase", ""),
                                          (o.get("spec") or {}).get("volumeName", ""),
                                          ((o.get("status") or {}).get("capacity") or {}).get("storage", ""),
                                          ",".join({"ReadWriteOnce": "RWO", "ReadOnlyMany": "ROX",
                                                    "ReadWriteMany": "RWX", "ReadWriteOncePod": "RWOP"}.get(m, m)
                                                   for m in (o.get("status") or {}).get("accessModes") or []),
                                          (o.get("spec") or {}).get("storageClassName", "<unset>"), "<unset>",
                                          age(o), (o.get("spec") or {}).get("volumeMode", "")]),
    "serviceaccounts": ([col("Secrets", "integer"), col("Age")],
                        lambda o: [len(o.get("secrets") or []), age(o)]),
    "statefulsets": ([col("Ready"), col("Age"), col("Containers", prio=1), col("Images", prio=1)],
                     lambda o: ["%d/%d" % ((o.get("status") or {}).get("readyReplicas", 0),
                                           o["spec"].get("replicas", 1)), age(o)] +
                     list(containers_images((o["spec"].get("template") or {}).get("spec")))),
    "roles": ([col("Created At", "date")], lambda o: [o["metadata"].get("creationTimestamp")]),
    "clusterroles": ([col("Created At", "date")], lambda o: [o["metadata"].get("creationTimestamp")]),
    "rolebindings": ([col("Role"), col("Age"), col("Users", prio=1), col("Groups", prio=1),
                      col("ServiceAccounts", prio=1)], lambda o: binding_row(o)),
    "clusterrolebindings": ([col("Role"), col("Age"), col("Users", prio=1), col("Groups", prio=1),
                             col("ServiceAccounts", prio=1)], lambda o: binding_row(o)),
    "selfsubjectaccessreviews": ([col("Age")], lambda o: [age(o)]),
    "selfsubjectrulesreviews": ([col("Age")], lambda o: [age(o)]),
    # the CRDs' additionalPrinterColumns
    "virtualservices": ([col("Gateways"), col("Hosts"), col("Age", "date")],
                        lambda o: [(o.get("spec") or {}).get("gateways"), (o.get("spec") or {}).get("hosts"), age(o)]),
    "destinationrules": ([col("Host"), col("Age", "date")],
                         lambda o: [(o.get("spec") or {}).get("host"), age(o)]),
}


def binding_row(o):
    rr = o.get("roleRef") or {}
    subj = o.get("subjects") or []
    pick = lambda k: ", ".join(("%s/%s" % (s.get("namespace"), s.get("name")) if k == "ServiceAccount"
                                else s.get("name", "")) for s in subj if s.get("kind") == k)
    return ["%s/%s" % (rr.get("kind", ""), rr.get("name", "")), age(o), pick("User"), pick("Group"),
            pick("ServiceAccount")]


def to_table(res, objs, rv, headers=True):
    cols, fn = TABLES[res.plural]
    t = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(rv)},
         "columnDefinitions": [col("Name", fmt="name", desc="Name must be unique within a namespace.")] + cols
         if headers else None, "rows": []}
    for o in objs:
        pom = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
        t["rows"].append({"cells": [o["metadata"]["name"]] + fn(o), "object": pom})
    return t


# ---------------------------------------------------------------------------
# discovery

def k8s_version():
    major, minor = OPTS.k8s_version.lstrip("v").split(".")[:2]
    return {"major": major, "minor": minor, "gitVersion": OPTS.k8s_version,
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.6", "compiler": "gc",
            "platform": "linux/amd64", "emulator": "kpl kube_emulator.py"}


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def resource_list(group, version):
    gv = "%s/%s" % (group, version) if group else version
    out = []
    for r in RESOURCES:
        if r.group != group or version not in r.versions:
            continue
        e = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
             "verbs": VERBS, "storageVersionHash": hashlib.sha256(r.qualified().encode()).hexdigest()[:12]}
        if r.short:
            e["shortNames"] = r.short
        if r.categories:
            e["categories"] = r.categories
        out.append(e)
        for sub in r.subresources:
            if sub == "log":
                out.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]})
            elif sub == "scale":
                out.append({"name": "%s/scale" % r.plural, "singularName": "", "namespaced": True, "group": "autoscaling",
                            "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]})
            else:
                out.append({"name": "%s/%s" % (r.plural, sub), "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}


def api_group(group):
    versions = GROUPS[group]
    gvs = [{"groupVersion": "%s/%s" % (group, v), "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}


def openapi_v3_docs():
    docs = {}
    for r in RESOURCES:
        for v in r.versions:
            gvp = "apis/%s/%s" % (r.group, v) if r.group else "api/" + v
            doc = docs.setdefault(gvp, {"openapi": "3.0.0", "info": {"title": "Kubernetes (kpl emulator)",
                                                                       "version": OPTS.k8s_version}, "paths": {}})
            base = "/" + gvp + ("/namespaces/{namespace}" if r.namespaced else "") + "/" + r.plural + "/{name}"
            gvk = {"group": r.group, "version": v, "kind": r.kind}
            params = [{"name": n, "in": "query", "schema": {"type": "string"}}
                      for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
            doc["paths"][base] = {"patch": {"operationId": "patch%s" % r.kind, "parameters": params,
                                            "x-kubernetes-action": "patch",
                                            "x-kubernetes-group-version-kind": gvk}}
    return docs


def scale_of(res, obj):
    md = obj["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: md[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in md},
            "spec": {"replicas": obj["spec"].get("replicas", 1)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                       "selector": label_selector_string(obj["spec"].get("selector"))}}


# ---------------------------------------------------------------------------
# HTTP

PUBLIC_PATHS = {"/version", "/version/", "/healthz", "/livez", "/readyz", "/metrics"}


def truthy(v):
    return v in ("1", "true", "True")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-emulator"
    sys_version = ""

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                log("tls handshake failed: %s" % e)
                raise
            self.request.settimeout(None)
        BaseHTTPRequestHandler.setup(self)

    def handle(self):
        try:
            BaseHTTPRequestHandler.handle(self)
        except (ConnectionError, ssl.SSLError, socket.timeout, OSError):
            pass

    def log_message(self, fmt, *args):
        log("%s %s" % (self.address_string(), fmt % args))

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    # -- replies
    def send_body(self, code, body, ctype, extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, code, obj, extra=None):
        self.send_body(code, (json.dumps(obj) + "\n").encode(), "application/json", extra)

    def send_error_status(self, e, extra=None):
        self.send_json(e.code, e.status(), extra)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            return data
        return self.rfile.read(n) if n else b""

    def json_body(self, raw):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if raw and ("protobuf" in ctype or "cbor" in ctype):
            # kubectl's typed clients (kubectl create deployment, expose...) send protobuf
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json (the emulator decodes JSON only, "
                           "not %s)" % ctype)
        try:
            return json.loads(raw.decode() or "null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "BadRequest", "the body of the request could not be decoded as JSON: %s "
                           "(the emulator speaks JSON only)" % e)

    # -- entry point
    def dispatch(self, method):
        u = urllib.parse.urlsplit(self.path)
        path = u.path.rstrip("/") or "/"
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
        try:
            raw = self.read_body()
            if path.startswith("/emulator/") or path == "/emulator":
                return self.control(method, path, raw)
            fault = FAULTS.take(method, path)
            if fault:
                if fault["delay_ms"]:
                    time.sleep(fault["delay_ms"] / 1000.0)
                if fault["after"]:
                    # The request is carried out, its reply lost: what a
                    # client sees when the connection breaks after the
                    # server acted (a POST it cannot know the fate of).
                    real, self.wfile = self.wfile, io.BytesIO()
                    try:
                        self.authenticate(path)
                        self.route(method, path, q, raw)
                    except ApiError:
                        pass
                    finally:
                        self.wfile = real
                if fault["reset"] or fault["after"]:
                    self.close_connection = True
                    try:
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                    self.connection.close()
                    return
                if fault["status"] and fault["status"] != 200:
                    code = fault["status"]
                    extra = {"Retry-After": str(fault["retry_after"])} if fault.get("retry_after") is not None else None
                    return self.send_error_status(ApiError(code, REASON_BY_CODE.get(code, "Unknown"),
                                                           fault.get("message") or "injected fault: %d" % code), extra)
            if path == "/metrics":
                return self.send_body(200, TRAFFIC.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
            self.authenticate(path)
            self.route(method, path, q, raw)
        except ApiError as e:
            self.send_error_status(e)
        except (ConnectionError, ssl.SSLError, socket.timeout):
            self.close_connection = True
        except Exception as e:   # a bug in the emulator: answer 500 so the test shows it
            import traceback
            traceback.print_exc()
            try:
                self.send_error_status(ApiError(500, "InternalError", "emulator bug: %r" % (e,)))
            except OSError:
                pass

    def authenticate(self, path):
        """Sets self.ident.  A service account token (--sa-token, POST /emulator/token) is that
        service account, under RBAC; the --token, a client certificate or no credentials at all (when
        neither --token nor --client-ca is given) are the unrestricted admin.  The admin may
        impersonate (Impersonate-User/-Group, kubectl --as/--as-group): the identity is then under RBAC."""
        self.ident = ADMIN
        auth = self.headers.get("Authorization", "")
        tok = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with AUTHZ_LOCK:
            sa = SA_TOKENS.get(tok) if tok else None
        if sa:
            self.ident = sa_identity(*sa)
        elif not (path in PUBLIC_PATHS or (not OPTS.token and not OPTS.client_ca) or
                  (OPTS.token and tok == OPTS.token) or
                  (OPTS.client_ca and isinstance(self.connection, ssl.SSLSocket) and
                   self.connection.getpeercert())):
            raise ApiError(401, "Unauthorized", "Unauthorized")
        imp = self.headers.get("Impersonate-User")
        if imp:
            if self.ident is not ADMIN:
                raise ApiError(403, "Forbidden", 'users "%s" is forbidden: User "%s" cannot impersonate resource '
                               '"users" in API group "" at the cluster scope' % (imp, self.ident.user))
            self.ident = user_identity(imp, self.headers.get_all("Impersonate-Group") or [])
        self.user = self.ident.user

    def route(self, method, path, q, raw):
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if method not in ("GET", "HEAD") and (not parts or parts[0] not in ("api", "apis")):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if path in ("/version",):
            return self.send_json(200, k8s_version())
        if path in ("/healthz", "/livez", "/readyz"):
            return self.send_body(200, b"ok", "text/plain; charset=utf-8")
        if path == "/":
            return self.send_json(200, {"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/metrics",
                                                  "/readyz", "/version"] +
                                        ["/apis/%s/%s" % (g, v) for g, vs in GROUPS.items() if g for v in vs]})
        if parts[0] == "api":
            if len(parts) == 1:
                host = self.server.server_address
                return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": "%s:%d" % host[:2]}]})
            if parts[1] != "v1":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if len(parts) == 2:
                return self.send_json(200, resource_list("", "v1"))
            return self.resource(method, "", "v1", parts[2:], q, raw)
        if parts[0] == "apis":
            if len(parts) == 1:
                return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                            "groups": [api_group(g) for g in GROUPS if g]})
            g = parts[1]
            if g not in GROUPS or not g:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if len(parts) == 2:
                return self.send_json(200, api_group(g))
            if parts[2] not in GROUPS[g]:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if len(parts) == 3:
                return self.send_json(200, resource_list(g, parts[2]))
            return self.resource(method, g, parts[2], parts[3:], q, raw)
        if parts[0] == "openapi" and len(parts) >= 2 and parts[1] == "v3":
            return self.openapi_v3("/".join(parts[2:]))
        # /openapi/v2 and everything else: not served (kubectl copes, see README)
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def openapi_v3(self, gv_path):
        """Just enough OpenAPI v3 for kubectl: each PATCH operation declares the fieldValidation query
        parameter, so kubectl leaves validation to the server instead of downloading schemas (which
        the emulator does not have).  No requestBody, so kubectl apply computes its patches from its
        compiled-in types (strategic merge) or as JSON merge patches (CRDs)."""
        docs = openapi_v3_docs()
        if not gv_path:
            return self.send_json(200, {"paths": {k: {"serverRelativeURL": "/openapi/v3/%s?hash=%s" % (
                k, hashlib.sha256(canon(v).encode()).hexdigest()[:32].upper())} for k, v in docs.items()}})
        if gv_path not in docs:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return self.send_json(200, docs[gv_path])

    # -- resources
    def resource(self, method, group, version, parts, q, raw):
        ns = None
        if parts[0] == "namespaces" and len(parts) >= 3 and not (group == "" and parts[2] in ("status", "finalize")):
            ns, plural, rest = parts[1], parts[2], parts[3:]
        else:
            plural, rest = parts[0], parts[1:]
        res = RES_BY_GVP.get((group, version, plural))
        if res is None or (ns is not None and not res.namespaced) or len(rest) > 2:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[0] if rest else None
        sub = rest[1] if len(rest) > 1 else None
        if sub is not None and sub not in res.subresources and not (sub == "finalize" and res.plural == "namespaces"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced and ns is None and (name is not None or method not in ("GET", "HEAD")):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        dry = q.get("dryRun") == "All"
        accept = self.headers.get("Accept", "")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
        if method in ("GET", "HEAD"):
            verb = "get" if name is not None else ("watch" if truthy(q.get("watch")) else "list")
        elif method == "DELETE":
            verb = "delete" if name is not None else "deletecollection"
        REQUESTS.record({"verb": verb, "group": group, "version": version, "resource": res.plural,
                         "subresource": sub or "", "namespace": ns or "", "name": name or "",
                         "user": getattr(self, "user", "")})
        ident = getattr(self, "ident", ADMIN)
        if res.plural in ("selfsubjectaccessreviews", "selfsubjectrulesreviews"):
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                               "requested resource")
            if res.plural == "selfsubjectrulesreviews":
                return self.send_json(201, self_subject_rules_review(ident, self.ssar_body(raw, rules=True)))
            return self.send_json(201, self_subject_access_review(ident, self.ssar_body(raw)))
        allowed, _ = authorize(ident, verb, group, res.plural, sub or "", ns or "", name or "")
        if not allowed:
            raise forbidden(ident, verb, res, sub, ns, name)
        if name is None:
            if method in ("GET", "HEAD"):
                if truthy(q.get("watch")):
                    return self.watch(res, version, ns, q, accept)
                return self.list(res, version, ns, q, accept)
            if method == "POST":
                body = self.json_body(raw)
                self.check_kind(res, body)
                strict_check(res, body, q.get("fieldValidation"))
                out = STORE.create(res, ns or "", body, dry_run=dry)
                return self.send_json(201, self.out(res, version, out))
            if method == "DELETE":
                return self.delete_collection(res, version, ns, q, raw)
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if method in ("GET", "HEAD"):
            obj = STORE.get(res, ns, name)
            if obj is None:
                raise STORE.not_found(res, name)
            if sub == "scale":
                return self.send_json(200, scale_of(res, obj))
            if sub == "log" and is_real_pod(obj):
                return self.stream_log(obj, q)
            if sub == "log":
                text = "".join("%s emulated container %s of pod %s (image %s)\n" % (
                    obj["metadata"]["creationTimestamp"], c.get("name"), name, c.get("image"))
                    for c in obj["spec"].get("containers") or [] if not q.get("container") or c.get("name") == q["container"])
                return self.send_body(200, text.encode(), "text/plain")
            if "as=Table" in accept:
                return self.send_json(200, to_table(res, [obj], obj["metadata"]["resourceVersion"]))
            return self.send_json(200, self.out(res, version, obj))
        if method == "PUT":
            body = self.json_body(raw)
            with STORE.lock:
                if sub == "scale":
                    return self.put_scale(res, ns, name, body, dry)
                if sub != "status":
                    self.check_kind(res, body)
                strict_check(res, body, q.get("fieldValidation"))
                out = STORE.update(res, ns or "", name, body, sub=sub, dry_run=dry,
                                   require_rv=True if res.crd else False)
            return self.send_json(200, self.out(res, version, out))
        if method == "PATCH":
            return self.patch(res, version, ns or "", name, sub, raw, q, dry)
        if method == "DELETE":
            opts = delete_options(raw, q)
            if res.plural == "pods":
                out = delete_pod(ns, name, opts.get("gracePeriodSeconds"), dry, opts)
            elif res.plural == "persistentvolumeclaims":
                out = delete_claim(ns, name, dry, opts)
            else:
                with STORE.lock:
                    cur = STORE.get(res, ns or "", name)
                    if cur is None:
                        raise STORE.not_found(res, name)
                    check_preconditions(res, cur, opts)
                    out = STORE.delete(res, ns or "", name, dry_run=dry)
            return self.send_json(200, self.out(res, version, out))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def check_kind(self, res, body):
        if isinstance(body, dict) and body.get("kind") not in (None, "", res.kind):
            raise ApiError(400, "BadRequest", "the API version in the data (%s) does not match the expected API "
                           "version (%s)" % (body.get("apiVersion"), res.api_version())
                           if body.get("apiVersion") != res.api_version() else
                           "kind %s does not match the expected kind %s" % (body.get("kind"), res.kind))

    def out(self, res, version, obj):
        obj["apiVersion"] = res.api_version(version)
        obj["kind"] = res.kind
        return obj

    def list(self, res, version, ns, q, accept):
        lp = parse_label_selector(q.get("labelSelector"))
        fp = parse_field_selector(q.get("fieldSelector"))
        with STORE.lock:
            items = STORE.list(res, ns, lambda o: lp(o["metadata"].get("labels")) and fp(o))
            rv = STORE.rv
        if "as=Table" in accept:
            t = to_table(res, items, rv)
            if q.get("includeObject") == "Object":
                for row, o in zip(t["rows"], items):
                    row["object"] = self.out(res, version, o)
            return self.send_json(200, t)
        for o in items:
            if res.crd:
                self.out(res, version, o)
            else:
                o.pop("apiVersion", None)
                o.pop("kind", None)
        return self.send_json(200, {"kind": res.kind + "List", "apiVersion": res.api_version(version),
                                    "metadata": {"resourceVersion": str(rv)}, "items": items})

    def delete_collection(self, res, version, ns, q, raw):
        lp = parse_label_selector(q.get("labelSelector"))
        fp = parse_field_selector(q.get("fieldSelector"))
        opts = delete_options(raw, q)
        with STORE.lock:
            items = STORE.list(res, ns, lambda o: lp(o["metadata"].get("labels")) and fp(o))
            rv = STORE.rv
        if res.plural == "pods":
            out = [delete_pod(o["metadata"]["namespace"], o["metadata"]["name"], opts.get("gracePeriodSeconds"))
                   for o in items]
        else:
            with STORE.lock:
                out = [STORE.delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"])
                       for o in items]
                rv = STORE.rv
        return self.send_json(200, {"kind": res.kind + "List", "apiVersion": res.api_version(version),
                                    "metadata": {"resourceVersion": str(rv)}, "items": out})

    def put_scale(self, res, ns, name, body, dry):
        obj = STORE.get(res, ns, name)
        if obj is None:
            raise STORE.not_found(res, name)
        rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
        obj["spec"]["replicas"] = ((body or {}).get("spec") or {}).get("replicas", 0)
        if rv:
            obj["metadata"]["resourceVersion"] = rv
        out = STORE.update(res, ns, name, obj, dry_run=dry)
        return self.send_json(200, scale_of(res, out))

    def patch(self, res, version, ns, name, sub, raw, q, dry):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        p = self.json_body(raw)
        with STORE.lock:
            cur = STORE.get(res, ns, name)
            if ctype == "application/apply-patch+yaml":
                return self.server_side_apply(res, version, ns, name, cur, p, q, dry)
            if cur is None:
                raise STORE.not_found(res, name)
            if q.get("force"):
                raise invalid(res, name, [{"field": "force", "message": "Forbidden: may not be specified for "
                                           "non-apply patch"}])
            base = scale_of(res, cur) if sub == "scale" else cur
            if ctype == "application/json-patch+json":
                new = json_patch(base, p)
            elif ctype == "application/merge-patch+json":
                new = merge_patch(base, p)
            elif ctype == "application/strategic-merge-patch+json" and not res.crd:
                new = strategic_merge(base, p)
            else:
                raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                               "accepted media types include: application/json-patch+json, "
                               "application/merge-patch+json, application/apply-patch+yaml" +
                               ("" if res.crd else ", application/strategic-merge-patch+json"))
            if not isinstance(new, dict):
                raise ApiError(422, "Invalid", "patch result is not an object")
            if sub != "scale":
                strict_check(res, new, q.get("fieldValidation"))
            if sub == "scale":
                obj = jcopy(cur)
                obj["spec"]["replicas"] = (new.get("spec") or {}).get("replicas", 0)
                obj["metadata"]["resourceVersion"] = (new.get("metadata") or {}).get("resourceVersion")
                out = STORE.update(res, ns, name, obj, dry_run=dry, require_rv=False)
                return self.send_json(200, scale_of(res, out))
            out = STORE.update(res, ns, name, new, sub=sub, dry_run=dry, require_rv=False)
        return self.send_json(200, self.out(res, version, out))

    def server_side_apply(self, res, version, ns, name, cur, intent, q, dry):
        """Server-side apply, simplified: no managedFields, no field-ownership conflicts (see README)."""
        if not q.get("fieldManager"):
            raise invalid(res, name, [{"field": "fieldManager", "message": "Required value: is required for "
                                       "apply patch"}])
        if not isinstance(intent, dict):
            raise ApiError(400, "BadRequest", "apply patch must be an object")
        md = intent.setdefault("metadata", {})
        if md.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object (%s) does not match the name on the URL (%s)"
                           % (md.get("name"), name))
        md["name"] = name
        strict_check(res, intent, q.get("fieldValidation"))
        if cur is None:
            out = STORE.create(res, ns, intent, dry_run=dry)
            return self.send_json(201, self.out(res, version, out))
        new = merge_patch(cur, intent) if res.crd else strategic_merge(cur, intent)
        out = STORE.update(res, ns, name, new, dry_run=dry, require_rv=False)
        return self.send_json(200, self.out(res, version, out))

    def ssar_body(self, raw, rules=False):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype == "application/vnd.kubernetes.protobuf":   # kubectl auth can-i's typed client
            return ssrr_from_protobuf(raw) if rules else ssar_from_protobuf(raw)
        body = self.json_body(raw)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        return body

    # -- pod logs (the kubelet's, through the apiserver): text/plain, chunked; follow streams lines as
    # they arrive and ends when the container's run ends
    def stream_log(self, pod, q):
        run = RUNTIME.get(pod["metadata"]["uid"])
        c, inst = pod_log(pod, run, q)
        follow = truthy(q.get("follow"))
        stamps = truthy(q.get("timestamps"))
        since = None
        if q.get("sinceTime"):
            since = int(parse_rfc3339(q["sinceTime"])) * 10 ** 9   # the kubelet gets it at second precision
        elif q.get("sinceSeconds"):
            since = time.time_ns() - int(q["sinceSeconds"]) * 10 ** 9
        tail = int(q["tailLines"]) if q.get("tailLines") not in (None, "") else None
        left = [int(q["limitBytes"]) if q.get("limitBytes") else None]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.close_connection = True

        def emit(lines):
            data = b"".join((ts_nano(t).encode() + b" " if stamps else b"") + l for t, l in lines
                            if since is None or t >= since)
            if left[0] is not None:
                data = data[:left[0]]
                left[0] -= len(data)
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            return left[0] is None or left[0] > 0
        try:
            if c is None:
                return
            with run.cond:
                lines = [x for x in inst.lines if since is None or x[0] >= since]
                if tail is not None:
                    lines = lines[len(lines) - tail:] if tail else []
                idx = inst.end()
            if not emit(lines):
                return
            while follow and not STOPPING.is_set():
                with run.cond:
                    while (idx == inst.end() and not c.run_ended and inst is c.logs[-1]
                           and not STOPPING.is_set()):
                        run.cond.wait(0.5)
                    new = inst.since(idx)
                    idx = inst.end()
                    ended = c.run_ended or inst is not c.logs[-1]
                if not emit(new) or ended:
                    return
        finally:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass

    # -- watch
    def chunk(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, res, version, ns, q, accept):
        lp = parse_label_selector(q.get("labelSelector"))
        fp = parse_field_selector(q.get("fieldSelector"))
        table = "as=Table" in accept
        bookmarks = truthy(q.get("allowWatchBookmarks"))
        timeout = float(q.get("timeoutSeconds") or random.uniform(1800, 3600))
        deadline = time.time() + timeout
        rvp = q.get("resourceVersion", "")
        initial_events = truthy(q.get("sendInitialEvents"))

        def match(o):
            return (o is not None and (not res.namespaced or not ns or o["metadata"].get("namespace") == ns)
                    and lp(o["metadata"].get("labels")) and fp(o))

        def conv(o):
            o = self.out(res, version, jcopy(o))
            return to_table(res, [o], o["metadata"]["resourceVersion"], headers=False) if table else o

        def bookmark(rv, initial_end=False):
            md = {"resourceVersion": str(rv)}
            if initial_end:
                md["annotations"] = {"k8s.io/initial-events-end": "true"}
            if table:
                return {"type": "BOOKMARK", "object": {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                                                       "metadata": md, "columnDefinitions": None, "rows": None}}
            return {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version(version),
                                                   "metadata": md}}

        with STORE.lock:
            initial = []
            if rvp in ("", "0") or initial_events:
                initial = STORE.list(res, ns, lambda o: lp(o["metadata"].get("labels")) and fp(o))
                cursor = STORE.rv
            else:
                try:
                    cursor = int(rvp)
                except ValueError:
                    raise ApiError(400, "BadRequest", "invalid resource version %r" % rvp)
            gone = cursor < STORE.compacted
            compacted = STORE.compacted
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.close_connection = True
        try:
            if gone:
                self.chunk({"type": "ERROR", "object": ApiError(410, "Expired", "too old resource version: %d (%d)"
                                                                % (cursor, compacted + 1)).status()})
                return
            for o in initial:
                self.chunk({"type": "ADDED", "object": conv(o)})
            if initial_events and bookmarks:
                self.chunk(bookmark(cursor, True))
            last_bm = time.time()
            while time.time() < deadline and not STOPPING.is_set():
                with STORE.lock:
                    if cursor < STORE.compacted and (not STORE.history or STORE.history[0].rv > cursor + 1):
                        evs, gone = None, STORE.compacted
                    else:
                        evs = [e for e in STORE.history if e.rv > cursor]
                        if not evs:
                            STORE.cond.wait(min(0.5, max(0.01, deadline - time.time())))
                            evs = [e for e in STORE.history if e.rv > cursor]
                if evs is None:
                    self.chunk({"type": "ERROR", "object": ApiError(410, "Expired", "too old resource version: "
                                                                    "%d (%d)" % (cursor, gone + 1)).status()})
                    return
                for e in evs:
                    cursor = e.rv
                    if e.res is not res:
                        continue
                    now_m, was_m = match(e.obj), match(e.old)
                    if e.type == "ADDED" and now_m:
                        self.chunk({"type": "ADDED", "object": conv(e.obj)})
                    elif e.type == "DELETED" and (was_m or match(e.obj)):
                        self.chunk({"type": "DELETED", "object": conv(e.obj)})
                    elif e.type == "MODIFIED":
                        if now_m and was_m:
                            self.chunk({"type": "MODIFIED", "object": conv(e.obj)})
                        elif now_m:
                            self.chunk({"type": "ADDED", "object": conv(e.obj)})
                        elif was_m:
                            self.chunk({"type": "DELETED", "object": conv(e.obj)})
                if bookmarks and time.time() - last_bm >= OPTS.bookmark_interval:
                    with STORE.lock:
                        if not [e for e in STORE.history if e.rv > cursor]:
                            cursor = max(cursor, STORE.rv)
                    self.chunk(bookmark(cursor))
                    last_bm = time.time()
        finally:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass

    # -- emulator control plane (not Kubernetes API)
    def control(self, method, path, raw):
        body = self.json_body(raw) if raw else {}
        if path == "/emulator/state" and method == "GET":
            with STORE.lock:
                objs = {r.plural: ["%s/%s" % k if k[0] else k[1] for k in sorted(STORE.objs[r.plural])]
                        for r in RESOURCES}
                deps = {"%s/%s" % (d["metadata"]["namespace"], d["metadata"]["name"]):
                        {"generation": d["metadata"].get("generation"), "revision":
                         (d["metadata"].get("annotations") or {}).get(REV), "status": d.get("status")}
                        for d in STORE.list(RES["deployments"])}
                st = {"resourceVersion": STORE.rv, "compactedResourceVersion": STORE.compacted,
                      "historySize": len(STORE.history), "pace": OPTS.pace, "objects": objs, "deployments": deps}
            with FAULTS.lock:
                st["faults"] = list(FAULTS.items)
            st["traffic"] = TRAFFIC.state()
            return self.send_json(200, st)
        if path in ("/emulator/error-rate", "/emulator/latency") and method == "POST":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "expected a JSON object")
            key = (body.get("namespace"), body.get("workload"), body.get("version"))
            if key == (None, None, None):
                raise ApiError(400, "BadRequest", "give version and/or namespace+workload")
            if key[1] is not None and key[0] is None:
                raise ApiError(400, "BadRequest", "workload needs namespace")
            with TRAFFIC.lock:
                s = TRAFFIC.rates.setdefault(key, {})
                for k in ("rate", "code", "latency_ms"):
                    if k in body:
                        if body[k] is None:
                            s.pop(k, None)
                        else:
                            s[k] = float(body[k]) if k != "code" else int(body[k])
                if "ms" in body:
                    s["latency_ms"] = float(body["ms"])
                if not s:
                    del TRAFFIC.rates[key]
            return self.send_json(200, TRAFFIC.state())
        if path == "/emulator/fault":
            if method == "POST":
                return self.send_json(200, FAULTS.add(body))
            if method == "DELETE":
                with FAULTS.lock:
                    FAULTS.items.clear()
                return self.send_json(200, {})
        if path == "/emulator/requests":
            if method == "DELETE":
                with REQUESTS.lock:
                    REQUESTS.dropped = getattr(REQUESTS, "dropped", 0) + len(REQUESTS.items)
                    REQUESTS.items.clear()
                return self.send_json(200, {})
            return self.send_json(200, {"items": REQUESTS.snapshot()})
        if path == "/emulator/token" and method == "POST":
            ns, sa = (body or {}).get("namespace"), (body or {}).get("serviceAccount")
            if not ns or not sa:
                raise ApiError(400, "BadRequest", "give namespace and serviceAccount")
            tok = (body or {}).get("token") or "sa-" + uuid.uuid4().hex
            with AUTHZ_LOCK:
                SA_TOKENS[tok] = (ns, sa)
            return self.send_json(200, {"token": tok, "user": sa_identity(ns, sa).user})
        if path in ("/emulator/evict", "/emulator/node-lost") and method == "POST":
            return self.send_json(200, {"pods": pod_fault(path.rsplit("/", 1)[1], body or {})})
        if path == "/emulator/compact" and method == "POST":
            STORE.compact()
            return self.send_json(200, {"compactedResourceVersion": STORE.compacted})
        if path == "/emulator/config" and method == "POST":
            for k in ("pace", "rps", "bookmark_interval", "error_rate", "latency_ms"):
                if k in (body or {}):
                    setattr(OPTS, k, float(body[k]))
            return self.send_json(200, {k: getattr(OPTS, k) for k in ("pace", "rps", "bookmark_interval",
                                                                       "error_rate", "latency_ms")})
        raise ApiError(404, "NotFound", "no such emulator control endpoint: %s %s" % (method, path))


# ---------------------------------------------------------------------------
# main

STOPPING = threading.Event()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main(argv=None):
    global OPTS, STORE, CONTROLLER, TRAFFIC, POD_ROOT, RUNTIME
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port-file", help="also write the port number to this file")
    ap.add_argument("--lifetime", type=float, default=600, help="exit after this many seconds (default 600)")
    ap.add_argument("--pace", type=float, default=1.0, help="seconds per pod step (creation → Ready), default 1")
    ap.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain)")
    ap.add_argument("--tls-key", help="PEM private key for --tls-cert")
    ap.add_argument("--client-ca", help="verify client certificates against this CA; a valid client "
                    "certificate authenticates (see --require-client-cert)")
    ap.add_argument("--require-client-cert", action="store_true",
                    help="with --client-ca: refuse the TLS handshake without a client certificate")
    ap.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or a client cert) on API paths")
    ap.add_argument("--history", type=int, default=1000, help="watch events kept; older resourceVersions get 410")
    ap.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between BOOKMARK events")
    ap.add_argument("--k8s-version", default="v1.32.4", help="gitVersion reported by /version")
    ap.add_argument("--namespace", action="append", default=[], help="extra namespace to create at start")
    ap.add_argument("--rps", type=float, default=10.0, help="synthetic requests per second per routed service")
    ap.add_argument("--traffic-interval", type=float, default=1.0, help="seconds between traffic ticks")
    ap.add_argument("--error-rate", type=float, default=0.0, help="default error fraction per version")
    ap.add_argument("--bad-error-rate", type=float, default=0.3,
                    help="error fraction for images whose tag contains 'bad' (default 0.3)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="mean request latency in ms")
    ap.add_argument("--seed", type=int, default=1, help="latency random seed")
    ap.add_argument("--webhook-denials", action="store_true",
                    help="answer invalid Istio objects as the real validating webhook does (400) instead of 422")
    ap.add_argument("--verbose", action="store_true", help="log requests to stderr")
    ap.add_argument("--container-log-max-bytes", type=int, default=10 * 1024 * 1024,
                    help="a container run's log kept (oldest lines dropped past it; 0 = no limit), default 10Mi")
    ap.add_argument("--ca-cert", help="the CA pods find in their service account's ca.crt (default: --tls-cert)")
    ap.add_argument("--sa-token", action="append", default=[], metavar="TOKEN=NS/NAME",
                    help="bearer TOKEN authenticates as service account NS/NAME, under RBAC (repeatable)")
    ap.add_argument("--pod-root", help="directory for real pods' files and claims' directories (default: a "
                    "new temporary directory, removed at exit)")
    OPTS = ap.parse_args(argv)
    for t in OPTS.sa_token:
        tok, _, who = t.partition("=")
        ns, _, sa = who.partition("/")
        if not tok or not ns or not sa:
            ap.error("--sa-token wants TOKEN=NAMESPACE/NAME, not %r" % t)
        SA_TOKENS[tok] = (ns, sa)
    own_root = not OPTS.pod_root
    POD_ROOT = OPTS.pod_root or tempfile.mkdtemp(prefix="kube-emulator-")
    os.makedirs(POD_ROOT, exist_ok=True)

    STORE = Store(OPTS.history)
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] + OPTS.namespace:
        STORE.create(RES["namespaces"], "", {"metadata": {"name": n}})
    STORE.compacted = STORE.rv   # nothing older than start-up exists

    srv = Server(("127.0.0.1", 0), Handler)
    if OPTS.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(OPTS.tls_cert, OPTS.tls_key)
        if OPTS.client_ca:
            ctx.load_verify_locations(OPTS.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if OPTS.require_client_cert else ssl.CERT_OPTIONAL
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    port = srv.server_address[1]

    RUNTIME = Runtime(port)
    CONTROLLER = Controller(STORE)
    TRAFFIC = Traffic(STORE)
    CONTROLLER.start()
    TRAFFIC.start()

    def stop(*_):
        if not STOPPING.is_set():
            STOPPING.set()
            threading.Thread(target=srv.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(OPTS.lifetime, stop)
    timer.daemon = True
    timer.start()

    if OPTS.port_file:
        tmp = OPTS.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.rename(tmp, OPTS.port_file)
    sys.stdout.write("PORT=%d\n" % port)
    sys.stdout.flush()
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        CONTROLLER.stop.set()
        TRAFFIC.stop.set()
        RUNTIME.stop_all()
        srv.server_close()
        if own_root:
            shutil.rmtree(POD_ROOT, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
