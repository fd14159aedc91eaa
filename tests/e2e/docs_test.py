"""The docs name what the code has, and the code has what the docs name
(issue #14):

- every gRPC method of api/kpl.proto is in README.md's API section, and
  every method-like name the docs mention (`SubmitRun`, `ListAudit`, ...)
  is a method of a served proto;
- README.md's claim of what kplctl covers of the API matches the methods
  clients/kpl*.c call;
- every kplctl command of `kplctl --help` has a row in docs/kplctl.md's
  table and is in README.md's list of kplctl commands, and every command
  those name is one; every option of --help is in docs/kplctl.md;
- every `with` key of each stage kind's table (<kind>_with_keys in
  stages/*.c, what the parser accepts) is in the kind's section of
  docs/stages.md, and every key under `with:` in that section's examples is
  in the table;
- README.md lists every EventKind of the proto.

    /usr/bin/python3 tests/e2e/docs_test.py KPLCTL ROOT
ROOT holds README.md, docs/, api/*.proto, clients/kpl*.c and stages/*.c
(the runfiles).
"""

import glob
import os
import re
import subprocess
import sys

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL: " + msg)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def proto_methods(root):
    """{service: [method]} of every served proto under api/."""
    out = {}
    for p in sorted(glob.glob(os.path.join(root, "api", "*.proto"))):
        text = read(p)
        for m in re.finditer(r"(?ms)^service (\w+) \{(.*?)^\}", text):
            out[m.group(1)] = re.findall(r"^\s*rpc (\w+)\(", m.group(2), re.M)
    return out


def check_methods(root, readme, docs_all):
    services = proto_methods(root)
    if not services.get("Pipelines") or not services.get("Security"):
        fail("api/kpl.proto: no Pipelines or Security service found (%r)" % sorted(services))
        return
    api = readme[readme.index("## gRPC API"):]
    api = api[:api.index("\n## ", 5)]
    for svc in ("Pipelines", "Security"):
        for m in services[svc]:
            if not re.search(r"`%s\b" % m, api):
                fail("gRPC method %s.%s is not in README.md's gRPC API section" % (svc, m))
    known = {m for ms in services.values() for m in ms}
    verbs = ("Get|List|Submit|Watch|Cancel|Validate|Approve|Retry|Set|Delete|Create|"
             "Revoke|Register|Rollback|Update|Put|Start|Stop|Pause|Resume|Trigger")
    for name, text in docs_all.items():
        for m in sorted(set(re.findall(r"`((?:%s)[A-Z][A-Za-z]+)(?:[{`(]|\b)" % verbs, text))):
            if m not in known and not re.search(r"(Request|Response)$", m):
                fail("%s names gRPC method %s, which no proto under api/ has" % (name, m))


def check_coverage(root, readme):
    """What README.md says kplctl covers of the API is what kplctl's sources
    call: "covers all of it but `A`, `B`" names exactly the methods no
    kplctl source calls, and "covers the same" only if there are none."""
    services = proto_methods(root)
    called = set()
    for p in glob.glob(os.path.join(root, "clients", "kpl*.c")):
        called |= set(re.findall(r'"/kpl\.v1\.\w+/(\w+)"', read(p)))
    if len(called) < 10:
        fail("clients/kpl*.c: want the methods kplctl calls, found %r" % sorted(called))
    uncovered = set(services.get("Pipelines", []) + services.get("Security", [])) - called
    para = readme[readme.index("`kplctl` ([docs/kplctl.md]"):]
    para = para[:para.index("-o json` everywhere")]
    m = re.search(r"covers all of it but (.*?)\(", para, re.S)
    if m:
        listed = set(re.findall(r"`(\w+)`", m.group(1)))
        for x in sorted(listed - uncovered):
            fail("README.md says kplctl does not cover %s, but clients/ calls it" % x)
        for x in sorted(uncovered - listed):
            fail("README.md says kplctl covers %s, but no kplctl source calls it" % x)
    elif uncovered:
        fail("README.md says kplctl covers the gRPC API, but it never calls %s"
             % ", ".join(sorted(uncovered)))


def help_commands(kplctl):
    r = subprocess.run([kplctl, "--help"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail("kplctl --help: exit %d" % r.returncode)
    text = r.stdout
    cmds = text[text.index("commands:\n") + 10:text.index("\noptions:\n")]
    names = re.findall(r"(?m)^  ([a-z][a-z-]*)\b", cmds)
    opts_text = text[text.index("\noptions:\n"):]
    opts = re.findall(r"--([a-z][a-z-]*)", opts_text.split("\n\n")[1]
                      if "\n\n" in opts_text[2:] else opts_text)
    return names, sorted(set(opts)), text


def check_kplctl(kplctl, readme, kplctl_md):
    names, opts, _ = help_commands(kplctl)
    if len(names) < 10:
        fail("kplctl --help: want at least 10 commands, read %r" % names)
    table = set(re.findall(r"(?m)^\| `([a-z][a-z-]*)[ `]", kplctl_md))
    para = readme[readme.index("`kplctl` ([docs/kplctl.md]"):]
    para = para[:para.index("-o json` everywhere")]
    in_readme = set(re.findall(r"`([a-z][a-z-]*)[ `]", para)) - {"kplctl"}
    for n in names:
        if n not in table:
            fail("kplctl command %s has no row in docs/kplctl.md's table" % n)
        if n not in in_readme:
            fail("kplctl command %s is not in README.md's list of kplctl commands" % n)
    for n in sorted(table - set(names)):
        fail("docs/kplctl.md has a row for kplctl %s, which --help does not list" % n)
    for n in sorted(in_readme - set(names)):
        fail("README.md lists kplctl %s, which --help does not list" % n)
    for o in opts:
        if not re.search(r"--%s\b" % re.escape(o), kplctl_md):
            fail("kplctl option --%s is not in docs/kplctl.md" % o)


def kind_tables(root):
    """{kind: [with key]} from each <kind>_with_keys table in stages/*.c,
    and the names of every kind listed in stages/kinds.c."""
    tables = {}
    for p in sorted(glob.glob(os.path.join(root, "stages", "*.c"))):
        text = read(p)
        for m in re.finditer(r"static const char \*const (\w+)_with_keys\[\] = \{(.*?)\};",
                             text, re.S):
            keys = re.findall(r'"([^"]+)"', m.group(2))
            tables[m.group(1)] = keys
    kinds_c = read(os.path.join(root, "stages", "kinds.c"))
    listed = re.findall(r"&(\w+)_kind,", kinds_c)
    return tables, listed


def sections(stages_md):
    """{kind: text of its sections} ("## build, driver `x`" joins build)."""
    out = {}
    parts = re.split(r"(?m)^## ", stages_md)[1:]
    for p in parts:
        kind = re.match(r"(\w+)", p).group(1)
        out[kind] = out.get(kind, "") + p
    return out


def example_with_keys(section):
    """Keys directly under `with:` in the section's YAML examples."""
    keys = set()
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        lines = block.split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)with:\s*(#.*)?$", line)
            if not m:
                continue
            indent = None
            for nxt in lines[i + 1:]:
                if not nxt.strip() or nxt.lstrip().startswith("#"):
                    continue
                ind = len(nxt) - len(nxt.lstrip())
                if ind <= len(m.group(1)):
                    break
                if indent is None:
                    indent = ind
                if ind == indent:
                    k = re.match(r"^\s*([a-z_]+):", nxt)
                    if k:
                        keys.add(k.group(1))
    return keys


def check_kinds(root, stages_md):
    tables, listed = kind_tables(root)
    if len(tables) < 10:
        fail("stages/*.c: want a with key table for at least 10 kinds, found %r"
             % sorted(tables))
    secs = sections(stages_md)
    for kind in listed:
        if kind not in secs:
            fail("stage kind %s has no section in docs/stages.md" % kind)
    for kind, keys in sorted(tables.items()):
        if kind not in listed:
            fail("stages: %s_with_keys belongs to no kind listed in kinds.c" % kind)
        sec = secs.get(kind, "")
        for k in keys:
            if not re.search(r"(?m)(^\s+%s:|`%s`|\b%s:)" % (k, k, k), sec):
                fail("with.%s of kind %s is not in its section of docs/stages.md" % (k, kind))
        for k in sorted(example_with_keys(sec) - set(keys)):
            fail("docs/stages.md shows with.%s for kind %s, which its table (%s_with_keys) "
                 "does not allow" % (k, kind, kind))


def check_event_kinds(root, readme):
    proto = read(os.path.join(root, "api", "kpl.proto"))
    enum = re.search(r"enum EventKind \{(.*?)\}", proto, re.S).group(1)
    for k in re.findall(r"(EVENT_KIND_\w+) = [1-9]", enum):
        if k not in readme:
            fail("README.md does not list event kind %s" % k)


def main():
    kplctl = os.path.abspath(sys.argv[1])
    root = os.path.abspath(sys.argv[2])
    readme = read(os.path.join(root, "README.md"))
    docs_all = {"README.md": readme}
    for p in sorted(glob.glob(os.path.join(root, "docs", "*.md"))):
        docs_all["docs/" + os.path.basename(p)] = read(p)
    if len(docs_all) < 5:
        fail("want README.md and docs/*.md, found %r" % sorted(docs_all))
    check_methods(root, readme, docs_all)
    check_coverage(root, readme)
    check_kplctl(kplctl, readme, docs_all["docs/kplctl.md"])
    check_kinds(root, docs_all["docs/stages.md"])
    check_event_kinds(root, readme)
    print("%d problem(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
