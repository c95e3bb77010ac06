"""PEP 517 backend for pygen: setuptools, built against the torch it will run with.

``pygen._C`` is a torch C++ extension: it loads only into the exact torch it
was compiled against. With pip's default build isolation, a bare ``torch``
build requirement would install whatever torch the index offers into a
throw-away environment (often a multi-GB CUDA build of another version) and
produce an extension that cannot load.

So this backend builds against the torch of the environment pip installs
*into*. pip runs these hooks with that environment's interpreter (only
``sys.path`` is swapped for the isolated one), so its site-packages are
known; when they hold torch, they are appended to ``sys.path`` (after the
isolated build requirements, which keep precedence) and ``setup.py`` imports
that torch. Nothing is downloaded, and the same works on a GPU machine with
a CUDA torch (e.g. 2.11+cu130) under isolation.

Cases:
  * torch importable already (``pip install --no-build-isolation .``,
    ``python -m build --no-isolation``): used as is.
  * isolated build, target environment has torch: that torch (above).
  * no torch anywhere: ask pip for ``torch`` as a build requirement, with a
    warning (install torch first to choose which one you get).
"""
import glob
import importlib.util
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the PEP 517 hooks)


def _candidate_site_dirs():
    dirs = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # very old virtualenv
        pass
    for key in ("purelib", "platlib"):
        dirs.append(sysconfig.get_paths(vars={"base": sys.prefix, "platbase": sys.prefix})[key])
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    seen, out = set(), []
    for d in dirs:
        d = os.path.normpath(d)
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _target_torch_site():
    """The site-packages dir of the target environment that holds torch, or None."""
    for d in _candidate_site_dirs():
        if os.path.isfile(os.path.join(d, "torch", "__init__.py")) and glob.glob(
            os.path.join(d, "torch-*.dist-info")
        ):
            return d
    return None


def _torch_importable():
    return importlib.util.find_spec("torch") is not None


def _use_target_torch():
    """Make ``import torch`` resolve to the target environment's torch. True on success."""
    if _torch_importable():
        return True
    d = _target_torch_site()
    if d is None:
        return False
    if d not in sys.path:
        sys.path.append(d)  # after the isolated build requirements
    importlib.invalidate_caches()
    return _torch_importable()


def _torch_requirement():
    if _use_target_torch():
        return []
    sys.stderr.write(
        "pygen: no torch in the target environment; pip will install one just for the build.\n"
        "pygen: install torch first (e.g. `pip install torch==2.13.0`) so that pygen._C is\n"
        "pygen: built against the torch it will run with.\n"
    )
    return ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    # Not setuptools' hook: that one runs setup.py, which needs torch already.
    return _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _torch_requirement()


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    return _orig.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _orig.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _orig.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _use_target_torch()
    return _orig.build_sdist(sdist_directory, config_settings)
