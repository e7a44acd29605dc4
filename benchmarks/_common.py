"""Helpers shared by the benchmark scripts: machine description and markdown output."""

import datetime
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_description():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    libs = [f"{d.get('internal_api')} {d.get('version')} ({d.get('num_threads')} threads)"
            for d in threadpool_info() if d.get("user_api") == "blas"]
    return ", ".join(dict.fromkeys(libs)) or "unknown"


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "nmf_cv.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted nmf_cv.py changes" if dirty else "")


def load_average():
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sec(seconds):
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds:.3g}"


def ms(seconds):
    return "n/a" if seconds is None or math.isnan(seconds) else f"{1e3 * seconds:.3g}"


def ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def module_revision(directory):
    """Short git revision of the checkout holding nmf_cv.py, marked if nmf_cv.py is changed."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "nmf_cv.py")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted nmf_cv.py changes"
                                                      if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now():
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
