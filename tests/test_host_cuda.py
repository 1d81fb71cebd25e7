"""tests/host_cuda's build cache: keyed by the bytes of every file the compiler reads, so a build is never stale.

Each test gets its own cache folder ($XDG_CACHE_HOME under tmp_path), so nothing here touches the
cache the kernel tests share.
"""

from __future__ import annotations

import os

import pytest

from tests import host_cuda


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert host_cuda.cache_dir().is_relative_to(tmp_path)


def rewrite_keeping_size_and_mtime(path, text: str) -> None:
    """New bytes, same length, same mtime: only a key made from the contents can tell."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_changed_header_rebuilds_even_with_the_same_size_and_mtime(tmp_path):
    outer, inner = tmp_path / "outer.h", tmp_path / "inner.h"
    inner.write_text("#define ANSWER 41\n")
    outer.write_text(f'#include "{inner}"\n')
    source = f'#include "{outer}"\nextern "C" int answer() {{ return ANSWER; }}\n'
    first = host_cuda.build_source(source, name="answer")
    assert first.answer() == 41
    assert host_cuda.build_source(source, name="answer") is first        # unchanged: the same library
    assert len(list(host_cuda.cache_dir().glob("answer-*.so"))) == 1     # and no second build
    rewrite_keeping_size_and_mtime(inner, "#define ANSWER 42\n")          # a header included by a header
    assert host_cuda.build_source(source, name="answer").answer() == 42
    assert len(list(host_cuda.cache_dir().glob("answer-*.so"))) == 2


def test_a_header_that_starts_including_another_file_is_followed(tmp_path):
    header, extra = tmp_path / "a.h", tmp_path / "extra.h"
    header.write_text("#define ANSWER 1\n")
    extra.write_text("#define MORE 10\n")
    source = f'#include "{header}"\nextern "C" int answer() {{ return ANSWER; }}\n'
    assert host_cuda.build_source(source, name="grow").answer() == 1
    header.write_text(f'#include "{extra}"\n#define ANSWER (MORE + 1)\n')
    assert host_cuda.build_source(source, name="grow").answer() == 11
    rewrite_keeping_size_and_mtime(extra, "#define MORE 20\n")           # only the newly included file changes
    assert host_cuda.build_source(source, name="grow").answer() == 21


def test_flags_are_part_of_the_key():
    source = 'extern "C" int answer() { return ANSWER; }\n'
    assert host_cuda.build_source(source, ["-DANSWER=3"], name="flags").answer() == 3
    assert host_cuda.build_source(source, ["-DANSWER=4"], name="flags").answer() == 4


def test_a_broken_shim_fails_the_kernel_build(tmp_path, monkeypatch):
    """The case of issue 25: ``#error`` in cuda_host.h used to pass on a library built before it."""
    from edgehebb.deploy.fused import KERNEL_FILE

    good = host_cuda.SHIM.read_text()
    assert "#error" not in good
    broken = tmp_path / "cuda_host.h"
    broken.write_text(good + '\n#error "the shim changed"\n')
    monkeypatch.setattr(host_cuda, "SHIM", broken)
    with pytest.raises(RuntimeError, match="the shim changed"):
        host_cuda.build(KERNEL_FILE, [], "")
