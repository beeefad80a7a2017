# The cffi extensions (avmm.kvm._kvm_ffi against the build machine's <linux/kvm.h>, and
# avmm.vhost._log_ffi, the dirty log's atomics) are compiled at install time; everything
# else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["avmm/kvm/_ffi_build.py:ffibuilder",
                    "avmm/vhost/_log_build.py:ffibuilder"])
