"""The files a benchmark run writes (--json, --plot), checked before anything is timed: a path
that cannot be written failed only after the whole run, and its results were lost."""
import importlib.util
import os


def check_writable(ap, option, path):
    """ap.error (argparse: exit 2, the option named) unless ``path`` can be written as a file.
    Leaves nothing behind: a file made to try is removed."""
    if os.path.isdir(path):
        ap.error(f"{option}: {path!r} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        ap.error(f"{option}: the folder of {path!r} ({folder}) {what}")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
        if not existed:
            os.remove(path)
    except OSError as e:
        ap.error(f"{option}: cannot write {path!r}: {e.strerror or e}")


def plot_path(ap, path, say):
    """The file --plot writes: ``path``, with ".png" added when it has no extension; the
    extension must be one matplotlib writes. Without matplotlib, says up front that no plot
    will be made (the run goes on: the benchmark runs without its optional packages)."""
    root, ext = os.path.splitext(path)
    if not ext:
        path, ext = path + ".png", ".png"
    if importlib.util.find_spec("matplotlib") is None:
        say(f"note: --plot: matplotlib is not installed, so {path} will not be written "
            f"(pip install matplotlib)")
        return None
    from matplotlib.figure import Figure
    formats = Figure().canvas.get_supported_filetypes()
    if ext[1:].lower() not in formats:
        ap.error(f"--plot: matplotlib cannot write {ext!r} files; use one of "
                 f"{', '.join('.' + f for f in sorted(formats))}")
    check_writable(ap, "--plot", path)
    return path
