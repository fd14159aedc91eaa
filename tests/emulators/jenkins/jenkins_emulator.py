#!/usr/bin/python3
"""A Jenkins remote-API emulator for kpl's tests (test infrastructure only).

Python 3 standard library only.  Listens on 127.0.0.1, port 0 by default,
prints PORT=N on stdout (and writes --port-file), stops after --lifetime
seconds or on SIGTERM.  Behaviour follows the Jenkins section of
/work/shared/reference/external-apis.md; see README.md next to this file
for the endpoints, the job file format, the faults and the image convention.
"""

import argparse
import base64
import gzip
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JENKINS_VERSION = "2.462.3"
RESULTS = ("SUCCESS", "UNSTABLE", "FAILURE", "NOT_BUILT", "ABORTED")
COLORS = {"SUCCESS": "blue", "UNSTABLE": "yellow", "FAILURE": "red",
          "NOT_BUILT": "notbuilt", "ABORTED": "aborted"}
FAULTS = ("auth401", "trigger500", "queue_cancel", "build_aborted",
          "log_reset", "slow_log", "crumb_required")
FOLDER_CLASS = "com.cloudbees.hudson.plugins.folder.Folder"
IMAGE_ARTIFACT = "kpl-image.json"

# Run states, as in hudson.model.Run.State
BUILDING, POST_PRODUCTION, COMPLETED = "BUILDING", "POST_PRODUCTION", "COMPLETED"


def now_ms():
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# tree= filter (Jenkins "tree" query parameter: a[b,c{0,2}],d)

def parse_tree(spec):
    pos = 0

    def parse_list():
        nonlocal pos
        out = {}
        while pos < len(spec):
            m = re.compile(r"[^,\[\]{}]*").match(spec, pos)
            name = m.group(0).strip()
            pos = m.end()
            sub = None
            rng = None
            if pos < len(spec) and spec[pos] == "[":
                pos += 1
                sub = parse_list()
                if pos < len(spec) and spec[pos] == "]":
                    pos += 1
            if pos < len(spec) and spec[pos] == "{":
                end = spec.find("}", pos)
                if end < 0:
                    end = len(spec) - 1
                rng = spec[pos + 1:end]
                pos = end + 1
            if name:
                out[name] = (sub, rng)
            if pos < len(spec) and spec[pos] == ",":
                pos += 1
                continue
            break
        return out

    return parse_list()


def apply_range(lst, rng):
    if rng is None:
        return lst
    try:
        if "," in rng:
            a, b = rng.split(",", 1)
            a = int(a) if a.strip() else 0
            b = int(b) if b.strip() else len(lst)
            return lst[a:b]
        n = int(rng)
        return lst[n:n + 1]
    except ValueError:
        return lst


def filter_tree(value, tree):
    if isinstance(value, list):
        return [filter_tree(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    if "_class" in value:
        out["_class"] = value["_class"]
    for name, (sub, rng) in tree.items():
        if name not in value:
            continue
        v = value[name]
        if isinstance(v, list):
            v = apply_range(v, rng)
        if sub is not None and v is not None:
            v = filter_tree(v, sub)
        out[name] = v
    return out


# --------------------------------------------------------------------------
# model

class Folder:
    def __init__(self, full_name, description=""):
        self.full_name = full_name
        self.name = full_name.rsplit("/", 1)[-1]
        self.description = description
        self.config_xml = None


class Job:
    def __init__(self, spec):
        self.full_name = spec["name"].strip("/")
        self.name = self.full_name.rsplit("/", 1)[-1]
        self.type = spec.get("type", "freestyle")
        self.description = spec.get("description", "")
        self.params = normalize_params(spec.get("parameters", []))
        line_delay = float(spec.get("line_delay", 0.05))
        self.lines = []
        for item in spec.get("script", []):
            if isinstance(item, dict):
                self.lines.append((str(item.get("line", "")),
                                   float(item.get("delay", line_delay))))
            else:
                self.lines.append((str(item), line_delay))
        self.result = spec.get("result", "SUCCESS")
        if self.result not in RESULTS:
            raise ValueError("bad result %r" % self.result)
        self.result_param = spec.get("result_param")
        self.image = spec.get("image")
        self.digest = spec.get("digest")
        self.disabled = bool(spec.get("disabled", False))
        self.concurrent = bool(spec.get("concurrent", False))
        self.artifacts = dict(spec.get("artifacts", {}))
        self.estimated = int(spec.get("estimated_duration_ms",
                                      1000 * sum(d for _, d in self.lines)))
        self.next_number = int(spec.get("next_build_number", 1))
        self.builds = {}          # number -> Build
        self.config_xml = spec.get("config_xml")
        self.spec = spec

    @property
    def java_class(self):
        if self.type == "pipeline":
            return "org.jenkinsci.plugins.workflow.job.WorkflowJob"
        return "hudson.model.FreeStyleProject"

    @property
    def build_class(self):
        if self.type == "pipeline":
            return "org.jenkinsci.plugins.workflow.job.WorkflowRun"
        return "hudson.model.FreeStyleBuild"


def normalize_params(p):
    out = []
    if isinstance(p, dict):
        p = [{"name": k, "default": v} for k, v in p.items()]
    for item in p:
        if isinstance(item, str):
            item = {"name": item}
        out.append({"name": item["name"],
                    "default": str(item.get("default", "")),
                    "description": item.get("description", ""),
                    "type": item.get("type", "string"),
                    "choices": item.get("choices")})
    return out


class QueueItem:
    def __init__(self, qid, job, params, user, quiet, executor_wait):
        self.id = qid
        self.job = job
        self.params = params          # list of (name, value) or None
        self.user = user
        self.since = now_ms()
        t = time.time()
        self.quiet_end = t + quiet
        self.ready_at = self.quiet_end + executor_wait
        self.buildable_since = None
        self.state = "waiting"       # waiting / buildable / blocked / left
        if quiet <= 0:
            self.state = "buildable"
            self.buildable_since = self.since
        self.cancelled = False
        self.cancel_planned = False
        self.build = None
        self.left_at = None
        self.trigger_500 = False

    def key(self):
        return (self.job.full_name, tuple(self.params or ()))


class Build:
    def __init__(self, job, number, item):
        self.job = job
        self.number = number
        self.queue_id = item.id
        self.params = item.params
        self.user = item.user
        self.timestamp = now_ms()
        self.start = time.time()
        self.state = BUILDING
        self.result = None
        self.duration = 0
        self.log = bytearray()
        self.stop_by = None
        self.stop_kind = None
        self.abort_fault = False
        self.artifacts = {}           # relativePath -> bytes (after completion)
        self.image_ref = None


# --------------------------------------------------------------------------
# emulator state

class Emulator:
    def __init__(self, args):
        self.lock = threading.RLock()
        self.folders = {}
        self.jobs = {}
        self.queue = {}               # id -> QueueItem (including left ones)
        self.next_qid = 1
        self.build_record = []        # every build started, in start order
        self.users = {}
        for u in args.user or []:
            name, _, tok = u.partition(":")
            self.users[name] = tok
        self.anonymous_read = args.anonymous_read
        self.csrf = "off" if args.no_csrf else ("strict" if args.require_crumb else "on")
        self.queue_delay = args.queue_delay
        self.post_production = args.post_production
        self.left_ttl = args.left_item_ttl
        self.root_url = args.url
        self.salt = secrets.token_bytes(16)
        self.cookie_name = "JSESSIONID." + secrets.token_hex(4)
        self.instance_session = secrets.token_hex(4)
        self.sessions = {}            # session id -> created
        self.faults = {}              # name -> {"count": n or None, "job":..., ...}
        self.requests = []
        self.triggers = []            # every trigger POST, folded or not
        self.verbose = args.verbose
        for f in args.fault or []:
            name, _, count = f.partition(":")
            self.set_fault({"fault": name, "count": int(count) if count else None})
        if args.jobs:
            with open(args.jobs) as fh:
                self.load_jobs(json.load(fh))
        self.stop_event = threading.Event()
        threading.Thread(target=self.scheduler, daemon=True).start()

    # ---- jobs ----
    def load_jobs(self, data):
        if isinstance(data, dict) and "jobs" not in data and "name" in data:
            data = [data]
        if isinstance(data, dict):
            for f in data.get("folders", []):
                self.add_folder(f if isinstance(f, str) else f["name"])
            data = data.get("jobs", [])
        for spec in data:
            self.add_job(spec)

    def add_folder(self, full):
        full = full.strip("/")
        parts = full.split("/")
        with self.lock:
            for i in range(1, len(parts) + 1):
                p = "/".join(parts[:i])
                if p in self.jobs:
                    raise ValueError("%s is a job, not a folder" % p)
                self.folders.setdefault(p, Folder(p))
            return self.folders[full]

    def add_job(self, spec):
        job = Job(spec)
        with self.lock:
            if job.full_name in self.folders:
                raise ValueError("%s is a folder" % job.full_name)
            if "/" in job.full_name:
                self.add_folder(job.full_name.rsplit("/", 1)[0])
            old = self.jobs.get(job.full_name)
            if old is not None:       # redefinition keeps history
                job.builds = old.builds
                job.next_number = max(job.next_number, old.next_number)
            self.jobs[job.full_name] = job
        return job

    def children(self, folder_name):
        """Direct children (folders and jobs) of a folder ('' = root)."""
        prefix = folder_name + "/" if folder_name else ""
        out = []
        for coll in (self.folders, self.jobs):
            for full, obj in coll.items():
                if full.startswith(prefix) and "/" not in full[len(prefix):]:
                    out.append(obj)
        out.sort(key=lambda o: o.name)
        return out

    # ---- faults ----
    def set_fault(self, spec):
        name = str(spec.get("fault", "")).replace("-", "_")
        if name in ("none", "clear", ""):
            self.faults.clear()
            return
        if name not in FAULTS:
            raise ValueError("unknown fault %r (known: %s)" % (name, ", ".join(FAULTS)))
        count = spec.get("count")
        if count is not None and int(count) <= 0:
            self.faults.pop(name, None)
            return
        f = {"count": None if count is None else int(count)}
        for k in ("job", "delay", "after_queue", "after_lines", "fraction"):
            if k in spec:
                f[k] = spec[k]
        self.faults[name] = f

    def take_fault(self, name, job=None):
        """Consume one use of a fault if it is active (and matches job)."""
        with self.lock:
            f = self.faults.get(name)
            if f is None:
                return None
            if f.get("job") and job is not None and f["job"].strip("/") != job:
                return None
            if f.get("job") and job is None:
                return None
            if f["count"] is not None:
                f["count"] -= 1
                if f["count"] <= 0:
                    del self.faults[name]
            return dict(f)

    # ---- URLs ----
    def base(self, host):
        if self.root_url:
            return self.root_url.rstrip("/") + "/"
        return "http://%s/" % host

    @staticmethod
    def rel(full_name):
        return "".join("job/%s/" % urllib.parse.quote(p, safe="")
                       for p in full_name.split("/"))

    # ---- scheduler: moves queue items along, starts builds ----
    def scheduler(self):
        while not self.stop_event.wait(0.02):
            with self.lock:
                t = time.time()
                for item in list(self.queue.values()):
                    if item.state == "left":
                        if self.left_ttl and t - item.left_at > self.left_ttl:
                            del self.queue[item.id]
                        continue
                    if t < item.quiet_end:
                        continue
                    if item.state == "waiting":
                        item.state = "buildable"
                        item.buildable_since = now_ms()
                    if t < item.ready_at:
                        continue
                    if item.cancel_planned:
                        self.leave(item, cancelled=True)
                        continue
                    job = item.job
                    running = [b for b in job.builds.values() if b.state != COMPLETED]
                    if running and not job.concurrent:
                        item.state = "blocked"
                        continue
                    self.start_build(item)

    def leave(self, item, cancelled):
        item.state = "left"
        item.cancelled = cancelled
        item.left_at = time.time()

    def start_build(self, item):
        job = item.job
        number = job.next_number
        job.next_number += 1
        b = Build(job, number, item)
        job.builds[number] = b
        item.build = b
        self.leave(item, cancelled=False)
        self.build_record.append(b)
        f = self.take_fault("build_aborted", job.full_name)
        if f is not None:
            b.abort_fault = True
            b.abort_after = int(f.get("after_lines", max(1, len(job.lines) // 2)))
        threading.Thread(target=self.run_build, args=(b,), daemon=True).start()

    def append(self, b, text):
        with self.lock:
            b.log += (text + "\n").encode("utf-8")

    def substitute(self, b, s):
        params = dict(b.params or ())
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                      lambda m: params.get(m.group(1), m.group(0)), s)

    def run_build(self, b):
        job = b.job
        user = b.user
        if user == "anonymous":
            self.append(b, "Started by user anonymous")
        else:
            self.append(b, "Started by user %s" % user)
        if job.type == "pipeline":
            self.append(b, "[Pipeline] Start of Pipeline")
        else:
            self.append(b, "Running as SYSTEM")
            self.append(b, "Building in workspace /var/jenkins_home/workspace/%s" % job.full_name)
        result = job.result
        if job.result_param:
            v = dict(b.params or ()).get(job.result_param)
            if v in RESULTS:
                result = v
        aborted_by = None
        for i, (line, delay) in enumerate(job.lines):
            if b.abort_fault and i >= b.abort_after:
                aborted_by = "system"
                break
            end = time.time() + delay
            while time.time() < end and b.stop_by is None and not self.stop_event.is_set():
                time.sleep(min(0.02, max(0, end - time.time())))
            if b.stop_by is not None:
                aborted_by = b.stop_by
                break
            self.append(b, self.substitute(b, line))
        if aborted_by is None and b.abort_fault:
            aborted_by = "system"
        if aborted_by is None and b.stop_by is not None:
            aborted_by = b.stop_by
        if aborted_by is not None:
            if b.abort_fault and b.stop_by is None:
                self.append(b, "Build timed out (after 1 minutes). Marking the build as aborted.")
                self.append(b, "Build was aborted")
            else:
                self.append(b, "Aborted by %s" % aborted_by)
            result = "ABORTED"
        if result in ("SUCCESS", "UNSTABLE") and job.image:
            info = self.image_info(b)
            b.image_ref = info["ref"]
            self.append(b, "KPL_IMAGE=%s" % info["ref"])
            artifacts = {IMAGE_ARTIFACT: (json.dumps(info, indent=2) + "\n").encode()}
        else:
            artifacts = {}
        for path, content in job.artifacts.items():
            artifacts[path] = self.substitute(b, str(content)).encode()
        with self.lock:
            b.result = result
            b.duration = max(1, int((time.time() - b.start) * 1000))
            b.state = POST_PRODUCTION
            b.artifacts = artifacts
        if self.post_production > 0:
            time.sleep(self.post_production)
        with self.lock:
            b.log += ("Finished: %s\n" % result).encode()
            b.state = COMPLETED

    def image_info(self, b):
        image = self.substitute(b, b.job.image)
        if "@" in image:
            repo_tag, digest = image.split("@", 1)
        else:
            repo_tag = image
            digest = b.job.digest
            if digest:
                digest = self.substitute(b, digest)
            else:
                h = hashlib.sha256(("%s#%d#%s" % (b.job.full_name, b.number,
                                                  json.dumps(b.params or []))).encode())
                digest = "sha256:" + h.hexdigest()
        last = repo_tag.rsplit("/", 1)[-1]
        if ":" in last:
            repo, tag = repo_tag.rsplit(":", 1)
        else:
            repo, tag = repo_tag, None
        return {"image": repo_tag, "repository": repo, "tag": tag,
                "digest": digest, "ref": "%s@%s" % (repo, digest),
                "job": b.job.full_name, "number": b.number}

    # ---- JSON views ----
    def color(self, job):
        if job.disabled:
            return "disabled"
        done = [b for b in job.builds.values() if b.state == COMPLETED]
        running = any(b.state != COMPLETED for b in job.builds.values())
        if done:
            c = COLORS[max(done, key=lambda b: b.number).result]
        else:
            c = "notbuilt"
        return c + "_anime" if running else c

    def build_summary(self, b, base):
        return {"_class": b.job.build_class, "number": b.number,
                "url": base + self.rel(b.job.full_name) + "%d/" % b.number}

    def build_json(self, b, base):
        job = b.job
        actions = []
        if b.params is not None:
            actions.append({"_class": "hudson.model.ParametersAction",
                            "parameters": [{"_class": "hudson.model.StringParameterValue",
                                            "name": n, "value": v} for n, v in b.params]})
        actions.append(self.cause_action(b.user))
        if job.type == "pipeline":
            actions.append({"_class": "org.jenkinsci.plugins.workflow.job.views.FlowGraphAction"})
        artifacts = [{"displayPath": p.rsplit("/", 1)[-1], "fileName": p.rsplit("/", 1)[-1],
                      "relativePath": p} for p in sorted(b.artifacts)]
        d = {
            "_class": job.build_class,
            "actions": actions,
            "artifacts": artifacts,
            "building": b.state == BUILDING,
            "description": None,
            "displayName": "#%d" % b.number,
            "duration": b.duration if b.state != BUILDING else 0,
            "estimatedDuration": job.estimated,
            "executor": None,
            "fullDisplayName": "%s #%d" % (job.full_name.replace("/", " » "), b.number),
            "id": str(b.number),
            "inProgress": b.state != COMPLETED,
            "keepLog": False,
            "number": b.number,
            "queueId": b.queue_id,
            "result": b.result,
            "timestamp": b.timestamp,
            "url": base + self.rel(job.full_name) + "%d/" % b.number,
            "changeSets": [],
            "culprits": [],
            "nextBuild": None,
            "previousBuild": None,
        }
        if job.type != "pipeline":
            d["builtOn"] = ""
            d["changeSet"] = {"_class": "hudson.scm.EmptyChangeLogSet", "items": [], "kind": None}
            del d["changeSets"]
        nums = sorted(job.builds)
        i = nums.index(b.number)
        if i > 0:
            d["previousBuild"] = self.build_summary(job.builds[nums[i - 1]], base)
        if i + 1 < len(nums):
            d["nextBuild"] = self.build_summary(job.builds[nums[i + 1]], base)
        if b.state != COMPLETED:
            d["executor"] = {"_class": "hudson.model.OneOffExecutor" if job.type == "pipeline"
                             else "hudson.model.Executor"}
        return d

    @staticmethod
    def cause_action(user):
        if user == "anonymous":
            cause = {"_class": "hudson.model.Cause$UserIdCause",
                     "shortDescription": "Started by user anonymous",
                     "userId": None, "userName": "anonymous"}
        else:
            cause = {"_class": "hudson.model.Cause$UserIdCause",
                     "shortDescription": "Started by user %s" % user,
                     "userId": user, "userName": user}
        return {"_class": "hudson.model.CauseAction", "causes": [cause]}

    def param_defs(self, job):
        defs = []
        for p in job.params:
            if p["type"] == "choice" and p["choices"]:
                cls, typ = "hudson.model.ChoiceParameterDefinition", "ChoiceParameterDefinition"
            elif p["type"] == "boolean":
                cls, typ = "hudson.model.BooleanParameterDefinition", "BooleanParameterDefinition"
            else:
                cls, typ = "hudson.model.StringParameterDefinition", "StringParameterDefinition"
            d = {"_class": cls,
                 "defaultParameterValue": {"_class": cls.replace("Definition", "Value"),
                                           "name": p["name"], "value": p["default"]},
                 "description": p["description"], "name": p["name"], "type": typ}
            if p["choices"]:
                d["choices"] = p["choices"]
            defs.append(d)
        return defs

    def job_json(self, job, base, deep=False):
        nums = sorted(job.builds, reverse=True)

        def ref(n):
            if n is None:
                return None
            b = job.builds[n]
            return self.build_json(b, base) if deep else self.build_summary(b, base)

        def last(pred):
            for n in nums:
                if pred(job.builds[n]):
                    return ref(n)
            return None

        done = lambda b: b.state == COMPLETED
        item = next((i for i in sorted(self.queue.values(), key=lambda i: i.id)
                     if i.job is job and i.state != "left"), None)
        props = []
        if job.params:
            props.append({"_class": "hudson.model.ParametersDefinitionProperty",
                          "parameterDefinitions": self.param_defs(job)})
        d = {
            "_class": job.java_class,
            "actions": ([{"_class": "hudson.model.ParametersDefinitionProperty",
                          "parameterDefinitions": self.param_defs(job)}] if job.params else [])
            + [{}],
            "description": job.description,
            "displayName": job.name,
            "displayNameOrNull": None,
            "fullDisplayName": job.full_name.replace("/", " » "),
            "fullName": job.full_name,
            "name": job.name,
            "url": base + self.rel(job.full_name),
            "buildable": not job.disabled,
            "builds": [ref(n) for n in nums[:100]],
            "allBuilds": [ref(n) for n in nums],
            "color": self.color(job),
            "firstBuild": ref(nums[-1]) if nums else None,
            "healthReport": [],
            "inQueue": item is not None,
            "keepDependencies": False,
            "lastBuild": ref(nums[0]) if nums else None,
            "lastCompletedBuild": last(done),
            "lastFailedBuild": last(lambda b: done(b) and b.result == "FAILURE"),
            "lastStableBuild": last(lambda b: done(b) and b.result == "SUCCESS"),
            "lastSuccessfulBuild": last(lambda b: done(b) and b.result in ("SUCCESS", "UNSTABLE")),
            "lastUnstableBuild": last(lambda b: done(b) and b.result == "UNSTABLE"),
            "lastUnsuccessfulBuild": last(lambda b: done(b) and b.result != "SUCCESS"),
            "nextBuildNumber": job.next_number,
            "property": props,
            "queueItem": self.queue_json(item, base) if item else None,
            "concurrentBuild": job.concurrent,
            "resumeBlocked": False,
        }
        if job.type != "pipeline":
            d["disabled"] = job.disabled
            d["scm"] = {"_class": "hudson.scm.NullSCM"}
            d["upstreamProjects"] = []
            d["downstreamProjects"] = []
        return d

    def item_json(self, obj, base, deep):
        """An entry in a 'jobs' list (root or folder)."""
        if isinstance(obj, Folder):
            if deep:
                return self.folder_json(obj, base, deep)
            return {"_class": FOLDER_CLASS, "name": obj.name,
                    "url": base + self.rel(obj.full_name)}
        if deep:
            return self.job_json(obj, base, deep)
        return {"_class": obj.java_class, "name": obj.name,
                "url": base + self.rel(obj.full_name), "color": self.color(obj)}

    def folder_json(self, folder, base, deep=False):
        return {
            "_class": FOLDER_CLASS,
            "actions": [{}],
            "description": folder.description,
            "displayName": folder.name,
            "displayNameOrNull": None,
            "fullDisplayName": folder.full_name.replace("/", " » "),
            "fullName": folder.full_name,
            "name": folder.name,
            "url": base + self.rel(folder.full_name),
            "healthReport": [],
            "jobs": [self.item_json(c, base, deep) for c in self.children(folder.full_name)],
            "primaryView": {"_class": "hudson.model.AllView", "name": "All",
                            "url": base + self.rel(folder.full_name)},
            "views": [{"_class": "hudson.model.AllView", "name": "All",
                       "url": base + self.rel(folder.full_name)}],
        }

    def root_json(self, base, deep=False):
        return {
            "_class": "hudson.model.Hudson",
            "assignedLabels": [{"name": "built-in"}],
            "mode": "NORMAL",
            "nodeDescription": "the Jenkins controller's built-in node",
            "nodeName": "",
            "numExecutors": 2,
            "description": None,
            "jobs": [self.item_json(c, base, deep) for c in self.children("")],
            "overallLoad": {},
            "primaryView": {"_class": "hudson.model.AllView", "name": "all", "url": base},
            "quietDownReason": None,
            "quietingDown": False,
            "slaveAgentPort": -1,
            "unlabeledLoad": {"_class": "jenkins.model.UnlabeledLoadStatistics"},
            "url": base,
            "useCrumbs": self.csrf != "off",
            "useSecurity": bool(self.users),
            "views": [{"_class": "hudson.model.AllView", "name": "all", "url": base}],
        }

    def queue_json(self, item, base):
        job = item.job
        actions = []
        if item.params is not None:
            actions.append({"_class": "hudson.model.ParametersAction",
                            "parameters": [{"_class": "hudson.model.StringParameterValue",
                                            "name": n, "value": v} for n, v in item.params]})
        actions.append(self.cause_action(item.user))
        d = {
            "_class": None,
            "actions": actions,
            "blocked": False,
            "buildable": False,
            "id": item.id,
            "inQueueSince": item.since,
            "params": "".join("\n%s=%s" % (n, v) for n, v in (item.params or ())),
            "stuck": False,
            "task": {"_class": job.java_class, "name": job.name,
                     "url": base + self.rel(job.full_name), "color": self.color(job)},
            "url": "queue/item/%d/" % item.id,
            "why": None,
        }
        t = time.time()
        if item.state == "waiting":
            d["_class"] = "hudson.model.Queue$WaitingItem"
            d["timestamp"] = int(item.quiet_end * 1000)
            d["why"] = "In the quiet period. Expires in %.2f sec" % max(0.0, item.quiet_end - t)
        elif item.state in ("buildable", "blocked"):
            d["buildableStartMilliseconds"] = item.buildable_since or now_ms()
            if item.state == "blocked":
                d["_class"] = "hudson.model.Queue$BlockedItem"
                d["blocked"] = True
                running = sorted(n for n, b in job.builds.items() if b.state != COMPLETED)
                d["why"] = ("Build #%d is already in progress (ETA: N/A)" % running[0]
                            if running else "Waiting for next available executor")
            else:
                d["_class"] = "hudson.model.Queue$BuildableItem"
                d["buildable"] = True
                d["pending"] = False
                d["why"] = "Waiting for next available executor"
        else:
            d["_class"] = "hudson.model.Queue$LeftItem"
            d["cancelled"] = item.cancelled
            d["executable"] = self.build_summary(item.build, base) if item.build else None
        return d


# --------------------------------------------------------------------------
# HTTP

class Reply(Exception):
    def __init__(self, status, body=b"", ctype="text/html;charset=utf-8", headers=None):
        self.status = status
        self.body = body if isinstance(body, bytes) else body.encode("utf-8")
        self.ctype = ctype
        self.headers = headers or []


def html_error(status, message):
    reason = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              409: "Conflict", 422: "Unprocessable Entity", 500: "Server Error"}.get(status, "")
    body = ("<html><head><title>Error %d %s</title></head><body><h2>HTTP ERROR %d %s</h2>"
            "<p>%s</p></body></html>\n" % (status, reason, status, message, message))
    return Reply(status, body)


def json_reply(obj, query, status=200, headers=None):
    tree = query.get("tree", [None])[0]
    if tree:
        obj = filter_tree(obj, parse_tree(tree))
    pretty = "pretty" in query and query["pretty"][0] not in ("false", "0")
    body = json.dumps(obj, indent=2 if pretty else None, separators=None if pretty else (",", ":"))
    return Reply(status, body, "application/json;charset=utf-8", headers)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Jetty(10.0.20)"
    sys_version = ""
    emu = None  # set by main

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.emu.verbose:
            sys.stderr.write("jenkins-emulator: %s\n" % (fmt % args))

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_HEAD(self):
        self.dispatch("HEAD")

    # ---- plumbing ----
    def dispatch(self, method):
        emu = self.emu
        self.method = method
        split = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n > 0 else b""
        self.form = {}
        ctype = self.headers.get("Content-Type", "")
        if method == "POST" and ctype.startswith("application/x-www-form-urlencoded"):
            self.form = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"),
                                              keep_blank_values=True)
        self.segments = [urllib.parse.unquote(s) for s in split.path.split("/")[1:]]
        if self.segments and self.segments[-1] == "":
            self.segments.pop()
        self.extra_headers = []
        try:
            if self.segments[:1] == ["emulator"]:
                r = self.control()
            else:
                r = self.jenkins()
        except Reply as e:
            r = e
        except Exception as e:  # a bug in the emulator: show it
            import traceback
            traceback.print_exc()
            r = Reply(500, "emulator error: %r\n" % e, "text/plain;charset=utf-8")
        if r is None:
            return  # response already written (streaming / fault)
        self.send(r)
        with emu.lock:
            emu.requests.append({"method": method, "path": self.path, "status": r.status})
            del emu.requests[:-2000]

    def send(self, r):
        self.send_response(r.status)
        if not self.segments[:1] == ["emulator"]:
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Jenkins", JENKINS_VERSION)
            self.send_header("X-Jenkins-Session", self.emu.instance_session)
            self.send_header("X-Hudson", "1.395")
        for k, v in self.extra_headers + r.headers:
            self.send_header(k, v)
        if r.body or r.status not in (204, 304):
            self.send_header("Content-Type", r.ctype)
        if r.status != 204:
            self.send_header("Content-Length", str(len(r.body)))
        self.end_headers()
        if self.method != "HEAD" and r.status != 204:
            self.wfile.write(r.body)

    def base(self):
        return self.emu.base(self.headers.get("Host") or "127.0.0.1:%d" % self.server.server_port)

    def param(self, name):
        v = self.query.get(name) or self.form.get(name)
        return v[0] if v else None

    def require_post(self):
        if self.method != "POST":
            raise html_error(405, "This URL requires POST")

    # ---- control endpoints ----
    def control(self):
        emu = self.emu
        seg = self.segments[1:]
        body = {}
        if self.body:
            try:
                body = json.loads(self.body)
            except ValueError:
                raise Reply(400, "bad JSON\n", "text/plain")
        with emu.lock:
            base = self.base()
            if seg == ["fault"] and self.method == "POST":
                try:
                    emu.set_fault(body)
                except ValueError as e:
                    raise Reply(400, "%s\n" % e, "text/plain")
                return json_reply({"faults": emu.faults}, {})
            if seg in (["fault"], ["faults"]) and self.method == "DELETE":
                emu.faults.clear()
                return json_reply({"faults": emu.faults}, {})
            if seg in (["fault"], ["faults"]) and self.method == "GET":
                return json_reply({"faults": emu.faults}, {})
            if seg == ["builds"]:
                out = []
                for b in emu.build_record:
                    out.append({"job": b.job.full_name, "number": b.number,
                                "params": dict(b.params or ()), "queueId": b.queue_id,
                                "user": b.user, "result": b.result,
                                "building": b.state == BUILDING,
                                "state": b.state, "image": b.image_ref,
                                "url": base + emu.rel(b.job.full_name) + "%d/" % b.number})
                return json_reply(out, self.query)
            if seg == ["queue"]:
                out = []
                for i in sorted(emu.queue.values(), key=lambda i: i.id):
                    out.append({"id": i.id, "job": i.job.full_name,
                                "params": dict(i.params or ()), "state": i.state,
                                "cancelled": i.cancelled,
                                "number": i.build.number if i.build else None})
                return json_reply(out, self.query)
            if seg == ["jobs"] and self.method == "POST":
                try:
                    emu.load_jobs(body)
                except (ValueError, KeyError) as e:
                    raise Reply(400, "%s\n" % e, "text/plain")
                return json_reply({"jobs": sorted(emu.jobs)}, {})
            if seg == ["jobs"]:
                return json_reply({"jobs": sorted(emu.jobs), "folders": sorted(emu.folders)}, {})
            if seg == ["config"] and self.method == "POST":
                if "csrf" in body:
                    if body["csrf"] not in ("off", "on", "strict"):
                        raise Reply(400, "csrf must be off/on/strict\n", "text/plain")
                    emu.csrf = body["csrf"]
                if "require_crumb" in body:
                    emu.csrf = "strict" if body["require_crumb"] else "on"
                for k in ("queue_delay", "post_production"):
                    if k in body:
                        setattr(emu, k, float(body[k]))
                if "anonymous_read" in body:
                    emu.anonymous_read = bool(body["anonymous_read"])
                if "users" in body:
                    emu.users = dict(body["users"])
            if seg == ["config"]:
                return json_reply({"csrf": emu.csrf, "queue_delay": emu.queue_delay,
                                   "post_production": emu.post_production,
                                   "anonymous_read": emu.anonymous_read,
                                   "users": sorted(emu.users),
                                   "session_cookie": emu.cookie_name}, {})
            if seg == ["sessions", "clear"] and self.method == "POST":
                emu.sessions.clear()
                return json_reply({"sessions": 0}, {})
            if seg == ["requests"]:
                return json_reply(list(emu.requests), {})
            if seg == ["triggers"]:
                return json_reply(list(emu.triggers), {})
        raise Reply(404, "no such emulator endpoint\n", "text/plain")

    # ---- auth + crumb ----
    def authenticate(self):
        """Returns (user, via_api_token)."""
        emu = self.emu
        auth = self.headers.get("Authorization")
        if auth and auth.lower().startswith("basic "):
            try:
                dec = base64.b64decode(auth[6:].strip()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                dec = ":"
            user, _, token = dec.partition(":")
            want = emu.users.get(user)
            if want is None or not hmac.compare_digest(want.encode(), token.encode()):
                raise Reply(401, "Invalid password/token for user: %s\n" % user,
                            "text/html;charset=utf-8",
                            [("WWW-Authenticate", 'Basic realm="Jenkins"')])
            return user, True
        return "anonymous", False

    def forbidden_anonymous(self, perm="hudson.model.Hudson.Read"):
        body = ("<html><head><meta http-equiv='refresh' content='1;url=/login?from=%s'/></head>"
                "<body>Authentication required</body></html>\n" % urllib.parse.quote(self.path))
        raise Reply(403, body, "text/html;charset=utf-8",
                    [("X-You-Are-Authenticated-As", "anonymous"),
                     ("X-You-Are-In-Group-Disabled", "JENKINS-39402: use -Dhudson.security.AccessDeniedException2.REPORT_GROUP_HEADERS=true or use /whoAmI to diagnose"),
                     ("X-Required-Permission", perm),
                     ("X-Permission-Implied-By", "hudson.model.Hudson.Administer")])

    def session_id(self, create):
        emu = self.emu
        cookie = self.headers.get("Cookie", "")
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == emu.cookie_name and v in emu.sessions:
                return v
        if not create:
            return None
        sid = "node0" + secrets.token_hex(12) + ".node0"
        emu.sessions[sid] = time.time()
        self.extra_headers.append(("Set-Cookie", "%s=%s; Path=/; HttpOnly" % (emu.cookie_name, sid)))
        return sid

    def crumb_for(self, user, sid):
        return hashlib.sha256(self.emu.salt + ("%s;%s" % (user, sid)).encode()).hexdigest()

    def check_crumb(self, user, via_token):
        emu = self.emu
        strict = emu.csrf == "strict"
        if not strict and "crumb_required" in emu.faults:
            strict = emu.take_fault("crumb_required") is not None
        if emu.csrf == "off" and not strict:
            return
        if via_token and not strict:
            return  # ApiCrumbExclusion: API-token requests bypass CSRF
        crumb = self.headers.get("Jenkins-Crumb") or self.param("Jenkins-Crumb")
        sid = self.session_id(create=False)
        if not crumb or not sid or not hmac.compare_digest(crumb, self.crumb_for(user, sid)):
            raise html_error(403, "No valid crumb was included in the request")

    # ---- Jenkins endpoints ----
    def jenkins(self):
        emu = self.emu
        if emu.take_fault("auth401") is not None:
            raise Reply(401, "Invalid password/token for user: %s\n" % "unknown",
                        "text/html;charset=utf-8",
                        [("WWW-Authenticate", 'Basic realm="Jenkins"')])
        user, via_token = self.authenticate()
        seg = self.segments
        # whoAmI is an unprotected root action
        if seg[:1] == ["whoAmI"]:
            return self.who_am_i(user, seg[1:])
        if user == "anonymous" and emu.users and not emu.anonymous_read:
            self.forbidden_anonymous()
        if self.method == "POST":
            if user == "anonymous" and emu.users:
                self.forbidden_anonymous("hudson.model.Item.Build")
            with emu.lock:
                self.check_crumb(user, via_token)
        with emu.lock:
            return self.route(user, seg)

    def who_am_i(self, user, rest):
        if rest not in ([], ["api", "json"]):
            raise html_error(404, "Not Found")
        anon = user == "anonymous"
        d = {"_class": "hudson.security.WhoAmI", "anonymous": anon,
             "authenticated": True, "authorities": ["anonymous"] if anon else ["authenticated"],
             "details": None, "name": user,
             "toString": "%s: %s" % ("AnonymousAuthenticationToken" if anon
                                     else "UsernamePasswordAuthenticationToken", user)}
        if not rest:
            return Reply(200, "<html><body><h1>Who Am I?</h1><p>Name: %s</p></body></html>\n" % user)
        return json_reply(d, self.query)

    def route(self, user, seg):
        emu = self.emu
        base = self.base()
        if not seg:
            if self.method in ("GET", "HEAD"):
                return Reply(200, "<html><head><title>Dashboard [Jenkins]</title></head>"
                                  "<body>Jenkins emulator</body></html>\n")
            raise html_error(405, "Method Not Allowed")
        if seg == ["api", "json"]:
            tree = "tree" in self.query
            return json_reply(emu.root_json(base, deep=tree), self.query)
        if seg == ["crumbIssuer", "api", "json"]:
            if emu.csrf == "off":
                raise html_error(404, "Not Found")
            sid = self.session_id(create=True)
            return json_reply({"_class": "hudson.security.csrf.DefaultCrumbIssuer",
                               "crumb": self.crumb_for(user, sid),
                               "crumbRequestField": "Jenkins-Crumb"}, self.query)
        if seg == ["me", "api", "json"] or seg == ["user", user, "api", "json"]:
            if user == "anonymous":
                raise html_error(404, "Not Found")  # /me for anonymous is not a user
            return json_reply({"_class": "hudson.model.User",
                               "absoluteUrl": base + "user/%s" % user,
                               "description": None, "fullName": user, "id": user,
                               "property": []}, self.query)
        if seg == ["queue", "api", "json"]:
            items = [emu.queue_json(i, base) for i in sorted(emu.queue.values(), key=lambda i: i.id)
                     if i.state != "left"]
            return json_reply({"_class": "hudson.model.Queue", "discoverableItems": [],
                               "items": items}, self.query)
        if len(seg) >= 3 and seg[:2] == ["queue", "item"]:
            try:
                qid = int(seg[2])
            except ValueError:
                raise html_error(404, "Not Found")
            item = emu.queue.get(qid)
            if item is None:
                raise html_error(404, "Not Found")
            if seg[3:] == ["api", "json"]:
                return json_reply(emu.queue_json(item, base), self.query)
            if seg[3:] == []:
                return Reply(200, "<html><body>queue item %d</body></html>\n" % qid)
            raise html_error(404, "Not Found")
        if seg == ["queue", "cancelItem"]:
            self.require_post()
            try:
                qid = int(self.param("id") or "")
            except ValueError:
                raise html_error(404, "Not Found")
            item = emu.queue.get(qid)
            if item is None:
                raise html_error(404, "Not Found")
            if item.state == "left":
                raise html_error(422, "Not cancellable")
            emu.leave(item, cancelled=True)
            return Reply(204)
        if seg and seg[0] == "createItem":
            return self.create_item(user, "", base)
        if seg and seg[0] == "job":
            return self.job_route(user, seg, base)
        raise html_error(404, "Not Found")

    def resolve(self, seg):
        """Walk /job/a/job/b/...; returns (obj, rest)."""
        emu = self.emu
        obj = None
        full = ""
        i = 0
        while i + 1 < len(seg) and seg[i] == "job":
            if obj is not None and not isinstance(obj, Folder):
                break
            cand = (full + "/" if full else "") + seg[i + 1]
            nxt = emu.folders.get(cand) or emu.jobs.get(cand)
            if nxt is None:
                raise html_error(404, "Not Found")
            obj, full = nxt, cand
            i += 2
        if obj is None:
            raise html_error(404, "Not Found")
        return obj, seg[i:]

    def job_route(self, user, seg, base):
        emu = self.emu
        obj, rest = self.resolve(seg)
        if isinstance(obj, Folder):
            if rest == ["api", "json"]:
                tree = "tree" in self.query
                return json_reply(emu.folder_json(obj, base, deep=tree), self.query)
            if rest == []:
                return Reply(200, "<html><body>folder %s</body></html>\n" % obj.full_name)
            if rest[:1] == ["createItem"]:
                return self.create_item(user, obj.full_name, base)
            if rest == ["config.xml"]:
                return Reply(200, obj.config_xml or
                             "<?xml version='1.1' encoding='UTF-8'?>\n<%s/>\n" % FOLDER_CLASS,
                             "application/xml")
            raise html_error(404, "Not Found")
        job = obj
        if rest == []:
            return Reply(200, "<html><body>job %s</body></html>\n" % job.full_name)
        if rest == ["api", "json"]:
            tree = "tree" in self.query
            return json_reply(emu.job_json(job, base, deep=tree), self.query)
        if rest == ["buildWithParameters"] or rest == ["build"]:
            self.require_post()
            return self.trigger(user, job, base, with_params=rest[0] == "buildWithParameters")
        if rest == ["config.xml"]:
            if self.method == "POST":
                self.apply_config_xml(job, self.body)
                return Reply(200, b"")
            return Reply(200, job.config_xml or self.make_config_xml(job), "application/xml")
        if rest in (["enable"], ["disable"]):
            self.require_post()
            job.disabled = rest[0] == "disable"
            return Reply(302, b"", headers=[("Location", base + emu.rel(job.full_name))])
        if rest == ["doDelete"]:
            self.require_post()
            del emu.jobs[job.full_name]
            return Reply(302, b"", headers=[("Location", base)])
        # build number or permalink
        b = self.resolve_build(job, rest[0])
        if b is None:
            raise html_error(404, "Not Found")
        return self.build_route(user, b, rest[1:], base)

    def resolve_build(self, job, name):
        if re.fullmatch(r"\d+", name):
            return job.builds.get(int(name))
        nums = sorted(job.builds, reverse=True)
        preds = {
            "lastBuild": lambda b: True,
            "lastCompletedBuild": lambda b: b.state == COMPLETED,
            "lastSuccessfulBuild": lambda b: b.state == COMPLETED and b.result in ("SUCCESS", "UNSTABLE"),
            "lastStableBuild": lambda b: b.state == COMPLETED and b.result == "SUCCESS",
            "lastFailedBuild": lambda b: b.state == COMPLETED and b.result == "FAILURE",
            "lastUnsuccessfulBuild": lambda b: b.state == COMPLETED and b.result != "SUCCESS",
        }
        pred = preds.get(name)
        if pred is None:
            return None
        for n in nums:
            if pred(job.builds[n]):
                return job.builds[n]
        return None

    def build_route(self, user, b, rest, base):
        emu = self.emu
        url = base + emu.rel(b.job.full_name) + "%d/" % b.number
        if rest == []:
            return Reply(200, "<html><body>%s #%d</body></html>\n" % (b.job.full_name, b.number))
        if rest == ["api", "json"]:
            return json_reply(emu.build_json(b, base), self.query)
        if rest == ["logText", "progressiveText"]:
            return self.progressive_text(b)
        if rest == ["consoleText"]:
            f = emu.take_fault("slow_log", b.job.full_name)
            if f is not None:
                self.slow(f)
            return Reply(200, bytes(b.log), "text/plain;charset=utf-8")
        if rest in (["stop"], ["term"], ["kill"]):
            self.require_post()
            if rest != ["stop"] and b.job.type != "pipeline":
                raise html_error(404, "Not Found")
            if b.state == BUILDING and b.stop_by is None:
                b.stop_by = user
                b.stop_kind = rest[0]
            if b.job.type == "pipeline":
                return Reply(200, b"")
            return Reply(302, b"", headers=[("Location", url)])
        if rest[:1] == ["artifact"] and len(rest) > 1:
            path = "/".join(rest[1:])
            data = b.artifacts.get(path)
            if data is None:
                raise html_error(404, "Not Found")
            ctype = "application/json" if path.endswith(".json") else "application/octet-stream"
            return Reply(200, data, ctype)
        raise html_error(404, "Not Found")

    def slow(self, f):
        delay = float(f.get("delay", 3.0))
        self.emu.lock.release()
        try:
            time.sleep(delay)
        finally:
            self.emu.lock.acquire()

    def progressive_text(self, b):
        emu = self.emu
        job = b.job.full_name
        f = emu.take_fault("slow_log", job)
        if f is not None:
            self.slow(f)
        try:
            start = int(self.param("start") or 0)
        except ValueError:
            raise html_error(400, "bad start")
        log = bytes(b.log)
        if start > len(log) or start < 0:
            start = 0  # text rolled over
        chunk = log[start:]
        # stapler's LineEndNormalizingWriter: lone LF -> CRLF
        body = re.sub(rb"(?<!\r)\n", b"\r\n", chunk)
        headers = [("X-Text-Size", str(len(log)))]
        if b.state != COMPLETED:
            headers.append(("X-More-Data", "true"))
        if len(chunk) > 4096 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
            headers.append(("Vary", "Accept-Encoding"))
        r = Reply(200, body, "text/plain;charset=utf-8", headers)
        f = emu.take_fault("log_reset", job)
        if f is None:
            return r
        # connection reset mid-log: promise the whole body, send part, then RST
        self.send_response(200)
        self.send_header("X-Jenkins", JENKINS_VERSION)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", r.ctype)
        self.send_header("Content-Length", str(max(len(body), 2) + 64))
        self.end_headers()
        part = body[:max(1, int(len(body) * float(f.get("fraction", 0.5))))]
        try:
            self.wfile.write(part)
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True
        emu.requests.append({"method": self.method, "path": self.path, "status": "reset"})
        return None

    def trigger(self, user, job, base, with_params):
        """Records the trigger POST (GET /emulator/triggers) whatever comes
        of it: a repeated trigger that the queue folds into its queued item
        makes no second build, but a client should not have sent it."""
        sent = {}
        for k, vals in list(self.query.items()) + list(self.form.items()):
            if vals:
                sent[k] = vals[-1]
        rec = {"job": job.full_name, "params": sent, "status": None, "queueId": None}
        self.emu.triggers.append(rec)
        try:
            r = self.trigger_one(user, job, base, with_params)
        except Reply as e:
            rec["status"] = e.status
            raise
        rec["status"] = r.status
        loc = dict(r.headers).get("Location", "")
        m = re.search(r"/queue/item/(\d+)/$", loc)
        rec["queueId"] = int(m.group(1)) if m else None
        return r

    def trigger_one(self, user, job, base, with_params):
        emu = self.emu
        if with_params and not job.params:
            raise html_error(400, "%s is not parameterized" % job.full_name)
        if job.disabled:
            raise html_error(409, "%s is not buildable" % job.full_name)
        params = None
        if job.params:
            if not with_params and self.param("json") is None:
                raise html_error(400, "Nothing is submitted")
            params = []
            for p in job.params:
                vals = self.query.get(p["name"], []) + self.form.get(p["name"], [])
                if len(vals) > 1:
                    raise html_error(400, "Multiple values for parameter %s" % p["name"])
                params.append((p["name"], vals[0] if vals else p["default"]))
        f500 = emu.take_fault("trigger500", job.full_name)
        if f500 is not None and not f500.get("after_queue"):
            raise html_error(500, "java.lang.IllegalStateException: emulated failure")
        quiet = 0.0
        d = self.param("delay")
        if d:
            m = re.fullmatch(r"\s*(\d+)\s*(ms|sec|s|min|)\s*", d)
            if not m:
                raise html_error(400, "Invalid duration value: %s" % d)
            n = int(m.group(1))
            quiet = {"ms": n / 1000.0, "min": n * 60.0}.get(m.group(2), float(n))
        # queue de-duplication: same job + same parameters still queued -> existing item
        key = (job.full_name, tuple(params or ()))
        for item in emu.queue.values():
            if item.state != "left" and item.key() == key:
                if f500 is not None:
                    raise html_error(500, "java.lang.IllegalStateException: emulated failure")
                return Reply(303, b"", headers=[("Location", base + "queue/item/%d/" % item.id)])
        qid = emu.next_qid
        emu.next_qid += 1
        item = QueueItem(qid, job, params, user, quiet, emu.queue_delay)
        if emu.take_fault("queue_cancel", job.full_name) is not None:
            item.cancel_planned = True
        emu.queue[qid] = item
        if f500 is not None:
            raise html_error(500, "java.lang.IllegalStateException: emulated failure")
        return Reply(201, b"", headers=[("Location", base + "queue/item/%d/" % qid)])

    # ---- create_job / config.xml ----
    def create_item(self, user, folder, base):
        emu = self.emu
        self.require_post()
        name = self.param("name")
        if not name:
            raise html_error(400, "Query parameter 'name' is required")
        full = (folder + "/" if folder else "") + name
        if full in emu.jobs or full in emu.folders:
            raise html_error(400, "A job already exists with the name \u2018%s\u2019" % name)
        if self.param("mode") == "copy":
            src = emu.jobs.get((folder + "/" if folder else "") + (self.param("from") or ""))
            if src is None:
                raise html_error(400, "No such job")
            spec = dict(src.spec)
            spec["name"] = full
            spec["next_build_number"] = 1
            emu.add_job(spec)
            return Reply(200, b"")
        try:
            root = ET.fromstring(self.body or b"<project/>")
        except ET.ParseError as e:
            raise html_error(400, "Failed to parse config.xml: %s" % e)
        if "folder" in root.tag.lower():
            f = emu.add_folder(full)
            f.description = (root.findtext("description") or "")
            f.config_xml = self.body.decode("utf-8", "replace")
            return Reply(200, b"")
        job = emu.add_job({"name": full})
        self.apply_config_xml(job, self.body or b"<project/>")
        return Reply(200, b"")

    def apply_config_xml(self, job, data):
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            raise html_error(400, "Failed to parse config.xml: %s" % e)
        job.config_xml = data.decode("utf-8", "replace")
        job.description = root.findtext("description") or ""
        job.disabled = (root.findtext("disabled") or "false").strip() == "true"
        job.concurrent = (root.findtext("concurrentBuild") or "false").strip() == "true"
        if root.tag == "flow-definition":
            job.type = "pipeline"
        params = []
        for el in root.iter():
            if el.tag.endswith("ParameterDefinition") and el.findtext("name"):
                params.append({"name": el.findtext("name"),
                               "default": el.findtext("defaultValue") or "",
                               "description": el.findtext("description") or ""})
        job.params = normalize_params(params)
        lines = []
        for cmd in root.iter("command"):
            for ln in (cmd.text or "").splitlines():
                if ln.strip():
                    lines.append((ln, 0.05))
        job.lines = lines
        job.spec = {"name": job.full_name, "parameters": params,
                    "script": [{"line": l, "delay": d} for l, d in lines]}

    def make_config_xml(self, job):
        root = ET.Element("flow-definition" if job.type == "pipeline" else "project")
        ET.SubElement(root, "description").text = job.description
        ET.SubElement(root, "keepDependencies").text = "false"
        props = ET.SubElement(root, "properties")
        if job.params:
            pdp = ET.SubElement(props, "hudson.model.ParametersDefinitionProperty")
            defs = ET.SubElement(pdp, "parameterDefinitions")
            for p in job.params:
                d = ET.SubElement(defs, "hudson.model.StringParameterDefinition")
                ET.SubElement(d, "name").text = p["name"]
                ET.SubElement(d, "description").text = p["description"]
                ET.SubElement(d, "defaultValue").text = p["default"]
        ET.SubElement(root, "disabled").text = "true" if job.disabled else "false"
        ET.SubElement(root, "concurrentBuild").text = "true" if job.concurrent else "false"
        builders = ET.SubElement(root, "builders")
        sh = ET.SubElement(builders, "hudson.tasks.Shell")
        ET.SubElement(sh, "command").text = "\n".join(l for l, _ in job.lines)
        return "<?xml version='1.1' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="unicode") + "\n"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away (e.g. gave up on a slow log)
        super().handle_error(request, client_address)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Jenkins remote-API emulator (tests only)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--lifetime", type=float, default=600.0,
                    help="exit after this many seconds (default 600)")
    ap.add_argument("--jobs", help="JSON file with job definitions")
    ap.add_argument("--user", action="append", metavar="NAME:TOKEN",
                    help="a user and API token (repeatable); with users, anonymous "
                         "gets 403 unless --anonymous-read")
    ap.add_argument("--anonymous-read", action="store_true")
    ap.add_argument("--require-crumb", action="store_true",
                    help="every POST needs a crumb + its session cookie, even with an API token")
    ap.add_argument("--no-csrf", action="store_true",
                    help="CSRF protection off: /crumbIssuer/api/json is 404")
    ap.add_argument("--queue-delay", type=float, default=1.0,
                    help="seconds a queue item waits for an executor (default 1.0)")
    ap.add_argument("--post-production", type=float, default=0.0,
                    help="seconds between result set/building=false and completion")
    ap.add_argument("--left-item-ttl", type=float, default=300.0,
                    help="seconds a left queue item stays visible (default 300)")
    ap.add_argument("--fault", action="append", metavar="NAME[:COUNT]",
                    help="start with a fault active: " + ", ".join(FAULTS))
    ap.add_argument("--url", help="Jenkins root URL for absolute URLs (default: from Host)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    emu = Emulator(args)
    Handler.emu = emu
    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("%d\n" % port)
        os.replace(tmp, args.port_file)
    print("PORT=%d" % port, flush=True)

    def stop(*_):
        emu.stop_event.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(args.lifetime, stop)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        timer.cancel()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
