"""pytest configuration shared by the flashmla_ops tests.

- Puts tests/ on sys.path so test modules can `import helpers`.
- Restores torch's intra-op thread count after every test (some tests change it, since on CPU it is
  the metadata's num_sm_parts) and resets torch._dynamo's caches after tests that compiled.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flashmla_ops  # noqa: E402,F401  (registers torch.ops.flashmla.* before any test collects)


def pytest_report_header(config):
    info = flashmla_ops.build_info()
    return (
        f"flashmla_ops build: cuda={info['cuda']} sm90={info['sm90']} archs={info['cuda_archs']}; "
        f"torch {info['torch']} (built with {info['built_with_torch']}); "
        f"GPU visible: {info['cuda_available']}; intra-op threads: {torch.get_num_threads()}"
    )


@pytest.fixture(autouse=True)
def _restore_num_threads():
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """A clean torch._dynamo state (caches and counters) before and after the test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
