"""Servers that cannot be handed a listening socket (Prometheus,
docker-registry) are given a port number: pick one, start the server, and
make sure it is *this* server that listens there.

Picking a free port by binding port 0 and closing it races with every other
test on the machine: between the close and the server's bind, anyone may
take the port. Then the server exits ("address already in use"), or worse,
the test talks to someone else's server that happens to answer the same
URL. start_on_free_port waits until the started process itself holds the
listening socket (found through /proc), and picks another port when the
process dies before that.
"""

import os
import socket
import time


def free_port():
    """A port no one listens on right now (no promise for later)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _listen_inodes(port):
    """Inodes of the LISTEN sockets on 127.0.0.1:port (or any address)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A":  # 0A: LISTEN
                continue
            if int(f[1].rsplit(":", 1)[1], 16) == port:
                out.add(f[9])
    return out


def listens(pid, port):
    """Whether process pid holds a socket listening on port."""
    inodes = _listen_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def start_on_free_port(start, what, timeout=60, tries=5):
    """start(port) starts a server that will listen on 127.0.0.1:port and
    returns its subprocess.Popen. Returns (proc, port) once proc itself
    listens there; when proc exits first (the port was taken meanwhile),
    tries another port, tries times in all. Raises AssertionError with the
    reason otherwise."""
    why = []
    for _ in range(tries):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if listens(proc.pid, port):
                return proc, port
            time.sleep(0.02)  # polling /proc: the server gives no other sign
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise AssertionError("%s did not listen on port %d within %d s"
                                 % (what, port, timeout))
        why.append("port %d: exit status %s" % (port, proc.returncode))
    raise AssertionError("%s never listened: %s" % (what, "; ".join(why)))


def readline_within(stream, seconds, what):
    """The next line of stream (a text pipe of a child process), or an
    AssertionError naming what after seconds: a child that hangs before it
    says its port must fail the test, not hang it."""
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    t.start()
    t.join(seconds)
    if not got:
        raise AssertionError("%s: no line within %d s" % (what, seconds))
    return got[0]
