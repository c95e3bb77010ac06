"""PEP 517 backend for pygen: setuptools, plus the right torch in the build env.

``pygen._C`` is a torch C++ extension, so it only loads into the exact torch
it was compiled against. With pip's default build isolation, a bare ``torch``
build requirement would pull whatever torch the index offers (often a
multi-GB CUDA build of a different version) and produce an extension that
cannot load. This backend looks up the torch installed in the environment
pip is installing *into* (pip runs the hooks with that environment's
``sys.prefix``) and asks for exactly that version. When there is none, it
asks for plain ``torch``.

``pip install --no-build-isolation .`` and ``python -m build --no-isolation``
skip these hooks' extra requirements and use the torch that is present.
"""
import glob
import os
import sysconfig

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the PEP 517 hooks)


def _target_torch_requirement():
    for key in ("purelib", "platlib"):
        site = sysconfig.get_paths(vars={"base": os.sys.prefix, "platbase": os.sys.prefix})[key]
        for dist in glob.glob(os.path.join(site, "torch-*.dist-info")):
            version = os.path.basename(dist)[len("torch-"):-len(".dist-info")]
            return f"torch=={version}"
    return "torch"


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + [_target_torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + [_target_torch_requirement()]


def get_requires_for_build_sdist(config_settings=None):
    return _orig.get_requires_for_build_sdist(config_settings)
