"""Building AOTInductor packages whose shared library loads in a serving process.

AOTInductor compiles a package's model code (``*.wrapper.so``) with the C++ compiler of
``torch._inductor.config.cpp.cxx`` (by default ``$CXX``, else ``g++``). That library must use the
process's one libstdc++ — the shared ``libstdc++.so.6`` that torch itself loads. A compiler that links
libstdc++ *statically* into shared objects (the GPU machine's ``CXX=/opt/gcc/bin/g++`` does: its own
lib/gcc directory supplies ``libstdc++.a``) puts a second, private copy of libstdc++ into the package. The two
copies' std::locale state then mixes, and ``aoti_load_package`` crashes while constructing the model
(``std::regex`` in ``parse_device_str``, torch/csrc/inductor/aoti_runtime/model_base.h): SIGSEGV there,
``std::bad_cast`` elsewhere. The torch version does not matter (2.11 and 2.14 both parse the device
string with ``std::regex``); the compiler does. See docs/deployment.md.

``compile_and_package`` is ``torch._inductor.aoti_compile_and_package`` plus a guard: when the compiler
links libstdc++ statically it adds ``-l:libstdc++.so.6`` to the package's link line (ahead of the
compiler's own ``-lstdc++``, so nothing is taken from the static archive), then checks the result with
``check_package``.
"""

import functools
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import List, Optional

import torch

# Link argument (through aot_inductor.custom_op_libs, which becomes -l<name>) that links the shared
# libstdc++ by file name, whatever static archive the compiler's own directories hold.
DYNAMIC_LIBSTDCXX = ":libstdc++.so.6"
_CXX_RUNTIMES = ("libstdc++.so", "libc++.so")

_PROBE_SOURCE = r"""
#include <locale>
#include <string>
std::string flashmla_probe(const std::string& s) {
  return s + std::use_facet<std::ctype<char>>(std::locale()).widen('x');
}
"""


def elf_needed(data: bytes) -> Optional[List[str]]:
    """The DT_NEEDED entries (shared libraries a binary loads) of a 64-bit little-endian ELF file; None
    when `data` is not one or has no section headers."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return None
    # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for sec in sections:
        if sec[1] != 6:  # SHT_DYNAMIC
            continue
        strtab_offset = sections[sec[6]][4]
        for pos in range(sec[4], sec[4] + sec[5], 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strtab_offset + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return needed


def links_cxx_runtime_dynamically(needed: List[str]) -> bool:
    return any(name.startswith(_CXX_RUNTIMES) for name in needed)


@functools.lru_cache(maxsize=None)
def compiler_links_libstdcxx_statically(cxx: str, extra_args: tuple = ()) -> Optional[bool]:
    """Whether `cxx` (a compiler command, e.g. ``g++`` or ``ccache g++``) links the C++ runtime into a
    shared object statically: builds a tiny one that uses std::locale and reads its DT_NEEDED. None when
    that cannot be told (the probe does not build, or the result is not ELF)."""
    with tempfile.TemporaryDirectory(prefix="flashmla_cxx_probe_") as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE_SOURCE)
        try:
            subprocess.run(
                [*shlex.split(cxx), "-shared", "-fPIC", src, "-o", lib, *extra_args],
                check=True,
                capture_output=True,
                timeout=300,
            )
            with open(lib, "rb") as f:
                needed = elf_needed(f.read())
        except (OSError, subprocess.SubprocessError):
            return None
    return None if needed is None else not links_cxx_runtime_dynamically(needed)


def inductor_cpp_compiler() -> str:
    """The C++ compiler command AOTInductor will use (torch._inductor.config.cpp.cxx, i.e. $CXX or g++)."""
    from torch._inductor import cpp_builder

    return cpp_builder.get_cpp_compiler()


def package_libraries(package_path: str) -> dict:
    """{member name: DT_NEEDED list} for every ELF shared library inside an AOTInductor package."""
    result = {}
    with zipfile.ZipFile(package_path) as z:
        for name in z.namelist():
            if name.endswith(".so"):
                needed = elf_needed(z.read(name))
                if needed is not None:
                    result[name] = needed
    return result


def check_package(package_path: str) -> None:
    """Raises if a shared library in the package carries its own copy of the C++ runtime (it links neither
    libstdc++.so nor libc++.so): such a package crashes in aoti_load_package (see this module's doc)."""
    for name, needed in package_libraries(package_path).items():
        if not links_cxx_runtime_dynamically(needed):
            raise RuntimeError(
                f"{package_path}: {name} links the C++ runtime statically (it loads only {needed}); "
                "loading it would crash in aoti_load_package (two libstdc++ copies in one process). "
                "Build it with flashmla_ops.aoti.compile_and_package, or with CXX set to a compiler that "
                "links libstdc++ dynamically. See docs/deployment.md."
            )


def compile_and_package(exported: torch.export.ExportedProgram, package_path: str, **kwargs) -> str:
    """torch._inductor.aoti_compile_and_package(exported, package_path=package_path, **kwargs), making sure
    the package's library links libstdc++ dynamically (see this module's doc). Returns the package path."""
    from torch._inductor import config

    libs = list(config.aot_inductor.custom_op_libs or [])
    if sys.platform.startswith("linux"):
        cxx = inductor_cpp_compiler()
        if compiler_links_libstdcxx_statically(cxx):
            if compiler_links_libstdcxx_statically(cxx, ("-l" + DYNAMIC_LIBSTDCXX,)) is not False:
                raise RuntimeError(
                    f"the C++ compiler {cxx!r} links libstdc++ statically and -l{DYNAMIC_LIBSTDCXX} does not "
                    "change that; set CXX to a compiler that links it dynamically (docs/deployment.md)"
                )
            if DYNAMIC_LIBSTDCXX not in libs:
                libs.append(DYNAMIC_LIBSTDCXX)
    with config.patch({"aot_inductor.custom_op_libs": libs or None}):
        path = torch._inductor.aoti_compile_and_package(exported, package_path=package_path, **kwargs)
    check_package(path)
    return path
