"""Files written whole: a crash, a full disk or a signal midway leaves the old file as it was, never half of a new one."""
import os
import shutil


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash midway leaves the old file whole, and no .tmp. The new
    file gets the permissions any new file gets here (0644 under the usual umask), whatever the writer used
    (safetensors creates its files 0600, which another user of an exported model could not read)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass


def write_text(path, text):
    """atomic_write of a text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def try_writing(path):
    """Create and remove path + ".probe": an OSError here says path cannot be written, before any work is done."""
    with open(path + ".probe", "w"):
        pass
    os.remove(path + ".probe")


def resolved(value):
    """A path as the file system resolves it (symlinks, ..), or the value itself if it is no path."""
    return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value


def free_mb(path):
    """Free space where path is, in MiB (nan if it cannot be told)."""
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return float("nan")
