"""Which code made a model: the git commit of the checkout, else the package version.

``code_version`` is recorded on every run and model version:

* ``git:<40 hex>`` when EdgeOps runs from a git checkout (an editable install) whose HEAD
  tracks this package, with ``+dirty`` appended if tracked files differ from that commit
  (then the commit alone does not reproduce the code);
* ``package:<version>`` otherwise (an installed wheel), e.g. ``package:0.1.0``.

Git is asked once per process, with a timeout; without git or a checkout the package
version is used. Nothing here raises.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from device_agent._version import __version__

__all__ = ["code_version", "detect_code_version"]

_GIT_TIMEOUT_S = 5.0
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../edgeops


@functools.cache
def code_version() -> str:
    """The code version of this process (computed once)."""
    return detect_code_version(_PACKAGE_DIR)


def detect_code_version(package_dir: Path) -> str:
    """``git:<commit>[+dirty]`` if ``package_dir`` is tracked in a git checkout, else
    ``package:<version>``."""
    commit = _git(package_dir, "rev-parse", "--verify", "HEAD")
    # The package's own __init__.py must be tracked there: a wheel installed into a
    # virtualenv that happens to sit inside some repository is not that repository's code.
    tracked = _git(package_dir, "ls-files", "--error-unmatch", "__init__.py")
    if commit is None or tracked is None or len(commit) != 40:
        return f"package:{__version__}"
    changes = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return f"git:{commit}" + ("+dirty" if changes else "")


def _git(cwd: Path, *args: str) -> str | None:
    """The stripped output of ``git args`` run in ``cwd``; None if git fails or is absent."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
            # read only: no index refresh, so a concurrent git commit never meets our lock
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
