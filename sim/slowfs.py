"""SlowFS: a FUSE filesystem whose read, write, fsync and metadata ops stall on chosen files.

Storage stalls are what stallscope must blame, and a real slow NFS server is not available in
tests, so this passthrough filesystem (backed by a real directory) sleeps ``delay_ms`` in the
FUSE daemon before serving the operations named in ``ops`` (default read, write and fsync) on
"slow" files: those whose basename starts with ``slow_prefix``, or that have their own delay set
with ``set_delay(ms, path=...)``. Other files, and every other operation (release, ...),
are served at once. "flush" (a close() of the file) stalls only where asked for by name: in
``ops`` for prefix-matched files, or ``set_delay(ms, path=..., op="flush")``.

Metadata ops can stall too: ``ops=("getattr", "open", "readdir")`` (or any mix). libfuse's
high-level API, which this daemon uses, answers the kernel's LOOKUP with ``getattr``, so
"getattr" (alias "lookup") stalls every path walk through a slow name as well as stat of it:
with no attribute or entry caching (measured with 100 ms): ``stat(slow)`` costs two delays (a
lookup, then a getattr), ``open(slow)`` one (the lookup; two with ``("getattr", "open")``), a
failed lookup of a missing slow name one, ``fstat`` one. "opendir" and "readdir" stall opening
and listing a slow directory (one readdir request per ``listdir``: libfuse serves the rest of a
listing from its buffer); "open" also covers create.

The daemon is a separate process (``daemon_pid``): the caller's ``read()`` blocks in the kernel
while a daemon thread sleeps, exactly like a stalled network filesystem. The daemon's own threads
sit in ``read()`` on ``/dev/fuse`` for as long as the filesystem is idle, so a latency probe sees
them as "slow reads" too; tests filter them out by this pid.

Usage (root, ``/dev/fuse``, ``fusermount3`` from Debian's fuse3, ``mfusepy`` from PyPI)::

    with SlowFS(delay_ms=250, slow_prefix="slow") as fs:
        fs.make_file("slow.bin", 1 << 20)        # written to the backing dir: no stall
        with open(fs.path("slow.bin"), "rb") as f:
            f.read(4096)                          # takes >= 250 ms
        fs.set_delay(50)                          # takes effect for the next FUSE request

The delay applies per FUSE request. Calls of up to 128 KiB are one request each (measured: a
128 KiB read of a 300 ms file takes 306 ms); the kernel splits larger calls into several requests,
partly served in parallel (a 4 MiB read took 5 delays), so keep per-call sizes at or below
128 KiB when a test wants exactly one stall per syscall. Stalls of different callers overlap:
four concurrent 300 ms reads finish together in ~300 ms.

sendfile, splice and copy_file_range do not go through direct IO: they read through the page
cache (splice), in requests of up to 64 KiB, one after another (measured with 200 ms: 4 KiB and
64 KiB calls took 201 ms, 128 KiB 401 ms), so a call stalls only for pages not yet cached and
readahead may serve the next call. Each open of a slow file drops its cached pages (direct_io
files are opened without FOPEN_KEEP_CACHE); ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``
does the same between calls. copy_file_range works only within one filesystem (EXDEV across):
the daemon has no copy_file_range, so the kernel falls back to splicing through the cache.

The daemon's threads are named ``slowfs-daemon`` (``comm``), and all belong to ``daemon_pid``.
"""

import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

from stallscope.sim import Unavailable as FixtureUnavailable
from stallscope.sim import child_command, require_root, require_tool

DELAYABLE_OPS = ("read", "write", "fsync", "getattr", "lookup", "open", "opendir", "readdir", "flush")
DEFAULT_OPS = ("read", "write", "fsync")


class SlowFSError(RuntimeError):
    """The SlowFS daemon failed to start or to stop; the message carries its stderr tail."""


class SlowFS:
    """Context manager that mounts a SlowFS under a fresh temp dir and unmounts it on exit.

    Attributes once entered: ``mountpoint`` (where to do IO), ``backing`` (the real directory
    behind it: files put there directly are not delayed), ``daemon_pid`` (the FUSE daemon, all of
    whose threads serve requests), ``ops`` (the delayed operations).
    """

    def __init__(self, delay_ms=250, slow_prefix="slow", ops=DEFAULT_OPS, backing=None,
                 start_timeout_s=10.0):
        unknown = set(ops) - set(DELAYABLE_OPS)
        if unknown:
            raise ValueError(f"ops {sorted(unknown)} cannot be delayed; "
                             f"choose from {DELAYABLE_OPS}")
        self.slow_prefix = slow_prefix
        self.ops = tuple(ops)
        self.start_timeout_s = start_timeout_s
        self._delay_ms = float(delay_ms)
        self._per_path = {}
        self._given_backing = backing
        self._state_dir = None
        self._proc = None
        self._stderr_path = None
        self.mountpoint = None
        self.backing = None
        self.daemon_pid = None

    # -- public API -------------------------------------------------------------------------

    def path(self, name):
        """Absolute path of ``name`` (relative to the filesystem root) under the mount."""
        return os.path.join(self.mountpoint, name.lstrip("/"))

    def make_file(self, name, size, fill=b"\xa5"):
        """Create ``name`` with ``size`` bytes in the backing dir (bypasses FUSE: no stall).

        Returns its path under the mount.
        """
        real = os.path.join(self.backing, name.lstrip("/"))
        os.makedirs(os.path.dirname(real), exist_ok=True)
        chunk = fill * (1 << 16)
        with open(real, "wb") as f:
            left = size
            while left > 0:
                left -= f.write(chunk[:min(left, len(chunk))])
        return self.path(name)

    def set_delay(self, ms, path=None, op=None):
        """Change the stall live: for prefix-matched files, or for one file if ``path`` is given
        (for its op ``op`` only, if given: ``op="flush"`` stalls the close() of a file written
        at full speed, as a FUSE filesystem that uploads on close does).

        ``path`` is relative to the filesystem root (or an absolute path under the mount);
        ``ms=None`` with a path removes that file's own setting. The daemon re-reads the control
        file on each delayable request, so the change holds for every request that starts after
        this returns.
        """
        if path is None:
            if ms is None:
                raise ValueError("set_delay(None) needs a path")
            self._delay_ms = float(ms)
        else:
            key = self._fs_relative(path)
            if op is not None:
                key = f"{op}:{key}"
            if ms is None:
                self._per_path.pop(key, None)
            else:
                self._per_path[key] = float(ms)
        self._write_control()

    @property
    def delay_ms(self):
        """The current delay, in ms, for files matching ``slow_prefix``."""
        return self._delay_ms

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self):
        require_root("SlowFS")
        if not os.path.exists("/dev/fuse"):
            raise FixtureUnavailable("SlowFS needs /dev/fuse (the fuse kernel module)")
        require_tool("fusermount3", "fuse3")
        try:
            import mfusepy  # noqa: F401  (checked here so the error is clear; the daemon uses it)
        except (ImportError, OSError) as e:
            raise FixtureUnavailable(
                f"SlowFS needs mfusepy and libfuse3 (pip mfusepy, apt fuse3): {e}") from e

        self._state_dir = tempfile.mkdtemp(prefix="stallscope-slowfs-")
        try:
            self.mountpoint = os.path.join(self._state_dir, "mnt")
            os.mkdir(self.mountpoint)
            if self._given_backing is None:
                self.backing = os.path.join(self._state_dir, "backing")
                os.mkdir(self.backing)
            else:
                self.backing = os.path.abspath(self._given_backing)
            self._write_control()
            self._start_daemon()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self._cleanup(report=exc_type is None)  # never mask the exception that ended the block
        return False

    # -- internals ----------------------------------------------------------------------------

    @property
    def _control_path(self):
        return os.path.join(self._state_dir, "control.json")

    def _fs_relative(self, path):
        if self.mountpoint and os.path.isabs(path) and path.startswith(self.mountpoint + os.sep):
            path = path[len(self.mountpoint):]
        return "/" + path.lstrip("/")

    def _write_control(self):
        if self._state_dir is None:
            return
        control = {"delay_ms": self._delay_ms, "slow_prefix": self.slow_prefix,
                   "ops": list(self.ops), "per_path": self._per_path}
        tmp = self._control_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(control, f)
        os.replace(tmp, self._control_path)  # atomic: the daemon never sees a half-written file

    def _start_daemon(self):
        self._stderr_path = os.path.join(self._state_dir, "daemon.stderr")
        with open(self._stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                child_command("stallscope.sim.slowfs", "_daemon_main", self.mountpoint, self.backing,
                              self._control_path),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        self.daemon_pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None:
                raise SlowFSError(f"SlowFS daemon exited with status {self._proc.returncode} "
                                  f"before mounting {self.mountpoint}: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise SlowFSError(f"SlowFS not mounted at {self.mountpoint} after "
                                  f"{self.start_timeout_s:.0f} s: {self._stderr_tail()}")
            time.sleep(0.01)

    def _stderr_tail(self, n=800):
        try:
            with open(self._stderr_path, "rb") as f:
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return "(no stderr)"
        return text[-n:] or "(empty stderr)"

    def _unmount(self):
        """Unmount: a normal unmount first, a lazy one if the mount is busy (open files, cwd).

        Returns True if only a lazy unmount worked: the daemon then keeps serving the files
        still open and will not exit by itself.
        """
        mp = self.mountpoint
        lazy = False
        for argv in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp],
                     ["umount", mp], ["umount", "-l", mp]):
            if not _is_mounted(mp):
                break
            lazy = "-z" in argv or "-l" in argv
            try:
                subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
        return lazy

    def _cleanup(self, report=False):
        errors = []
        lazy = False
        if self.mountpoint and _is_mounted(self.mountpoint):
            lazy = self._unmount()
            if _is_mounted(self.mountpoint):
                errors.append(f"{self.mountpoint} is still mounted")
        if self._proc is not None:
            # A normal unmount ends the daemon's FUSE loop. After a lazy one the daemon would
            # serve the still-open files forever, so it is killed at once (SIGTERM does not stop
            # libfuse's loop while a Python thread sleeps in a stall; the daemon keeps no state
            # worth flushing). Its /dev/fuse closes, which aborts the connection: callers blocked
            # in a stall get ECONNABORTED, later calls on open files ENOTCONN; none hangs.
            try:
                self._proc.wait(timeout=0.2 if lazy else 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._state_dir is not None:
            if self.mountpoint and not _is_mounted(self.mountpoint):
                shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None
        if errors and report:
            raise SlowFSError("SlowFS cleanup: " + "; ".join(errors))


def _is_mounted(path):
    """Whether ``path`` is a mount point, per /proc/self/mountinfo.

    Unlike os.path.ismount this also sees a FUSE mount whose daemon died (stat fails with
    ENOTCONN there), which still has to be unmounted.
    """
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


# -- the daemon (runs in its own process) ------------------------------------------------------

class _Control:
    """The daemon's view of control.json, re-read whenever the file is replaced."""

    def __init__(self, path):
        self.path = path
        self._key = None
        self._lock = threading.Lock()
        self.delay_s = 0.0
        self.prefix = None
        self.ops = frozenset()
        self.per_path = {}
        self.refresh()

    def refresh(self):
        st = os.stat(self.path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key:
            return
        with self._lock:
            with open(self.path) as f:
                c = json.load(f)
            self.delay_s = c["delay_ms"] / 1000.0
            self.prefix = c["slow_prefix"]
            self.ops = frozenset(c["ops"])
            self.per_path = {p: ms / 1000.0 for p, ms in c["per_path"].items()}
            self._key = key

    def delay_for(self, path, op=None):
        """Seconds to stall a request on ``path`` (FUSE-root-relative, leading '/'); ``op``:
        the request's, for a delay set for that op of that path alone."""
        if op is not None and f"{op}:{path}" in self.per_path:
            return self.per_path[f"{op}:{path}"]
        if path in self.per_path and op != "flush":     # a file's delay: not its close()
            return self.per_path[path]
        if self.prefix and os.path.basename(path).startswith(self.prefix):
            return self.delay_s
        return 0.0


def _make_operations(mfusepy, backing, control):
    """Build the passthrough Operations; done at run time so importing slowfs needs no mfusepy."""

    class SlowOps(mfusepy.Operations):
        use_ns = True  # utimens times in ns (mfusepy's non-deprecated mode)

        def _real(self, path):
            return os.path.join(backing, path.lstrip("/"))

        def _stall(self, op, path):
            control.refresh()
            if op in control.ops or (op == "getattr" and "lookup" in control.ops):
                delay = control.delay_for(path, op)
                if delay > 0:
                    time.sleep(delay)  # releases the GIL: other FUSE threads keep serving

        def _set_open_flags(self, path, fi):
            # direct_io for stalled files: every read()/write() syscall then becomes a FUSE
            # request (no page cache, no readahead, no write-back), so each call stalls once and
            # a second read of the same bytes is as slow as the first. Fast files keep the page
            # cache, as on a real filesystem.
            control.refresh()
            fi.direct_io = 1 if control.delay_for(path) > 0 else 0

        def init_with_config(self, conn_info, config):
            # No attribute/entry caching: files created in the backing dir by the test are seen
            # at once, and set_delay(path=...) applies at the next open.
            if config is not None:
                config.attr_timeout = 0.0
                config.entry_timeout = 0.0
                config.negative_timeout = 0.0

        def getattr(self, path, fh=None):
            self._stall("getattr", path)      # also every LOOKUP of this name
            try:
                st = os.lstat(self._real(path))
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno) from None
            attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid",
                                                  "st_size", "st_blocks", "st_blksize", "st_ino")}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            return attrs

        def readdir(self, path, fh):
            self._stall("readdir", path)
            return [".", "..", *os.listdir(self._real(path))]

        def opendir(self, path):
            self._stall("opendir", path)
            return 0

        def statfs(self, path):
            sv = os.statvfs(self._real(path))
            return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                 "f_bavail", "f_files", "f_ffree", "f_namemax")}

        def open(self, path, fi):
            self._stall("open", path)
            fi.fh = os.open(self._real(path), fi.flags & ~os.O_CREAT)
            self._set_open_flags(path, fi)
            return 0

        def create(self, path, mode, fi):
            self._stall("open", path)
            fi.fh = os.open(self._real(path), fi.flags | os.O_CREAT, mode)
            self._set_open_flags(path, fi)
            return 0

        def read(self, path, size, offset, fi):
            self._stall("read", path)
            return os.pread(fi.fh, size, offset)

        def write(self, path, data, offset, fi):
            self._stall("write", path)
            return os.pwrite(fi.fh, data, offset)

        def fsync(self, path, datasync, fi):
            self._stall("fsync", path)
            (os.fdatasync if datasync else os.fsync)(fi.fh)
            return 0

        def flush(self, path, fi):
            self._stall("flush", path)      # close(): where cloud-storage mounts upload
            return 0

        def release(self, path, fi):
            os.close(fi.fh)
            return 0

        def truncate(self, path, length, fh=None):
            os.truncate(self._real(path), length)
            return 0

        def unlink(self, path):
            os.unlink(self._real(path))
            return 0

        def mkdir(self, path, mode):
            os.mkdir(self._real(path), mode)
            return 0

        def rmdir(self, path):
            os.rmdir(self._real(path))
            return 0

        def rename(self, old, new):
            os.rename(self._real(old), self._real(new))
            return 0

        def chmod(self, path, mode):
            os.chmod(self._real(path), mode)
            return 0

        def chown(self, path, uid, gid):
            os.chown(self._real(path), uid, gid)
            return 0

        def utimens(self, path, times=None):
            if times is None:
                os.utime(self._real(path))
            else:
                os.utime(self._real(path), ns=tuple(int(t) for t in times))
            return 0

        def access(self, path, amode):
            if not os.access(self._real(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

    return SlowOps()


def _daemon_main(argv):
    """Entry point of the FUSE daemon process: ``mountpoint backing control.json``.

    Runs libfuse3's multi-threaded loop in the foreground, so this process's pid is the daemon
    pid the parent reports, and a stalled request on one file does not hold up requests on
    others. Returns when the filesystem is unmounted.
    """
    import ctypes

    import mfusepy

    mountpoint, backing, control_path = argv
    # Name the daemon (libfuse's worker threads inherit it) so traces show "slowfs-daemon".
    pr_set_name = 15
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, b"slowfs-daemon", 0, 0, 0)
    ops = _make_operations(mfusepy, backing, _Control(control_path))
    # allow_other: stalled IO may come from any uid (we mount as root). fsname/subtype make the
    # mount recognisable in /proc/self/mountinfo as "fuse.stallscope-slowfs".
    mfusepy.FUSE(ops, mountpoint, raw_fi=True, foreground=True, nothreads=False,
                 allow_other=True, fsname="stallscope-slowfs", subtype="stallscope-slowfs")
