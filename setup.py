# The cffi extensions (avmm.kvm._kvm_ffi, avmm.vhost._log_ffi) are compiled at install time against the
# build machine's <linux/kvm.h>; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["avmm/kvm/_ffi_build.py:ffibuilder",
                    "avmm/vhost/_log_build.py:ffibuilder"])
