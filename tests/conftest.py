import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (oracle, numerics, tiny_models)


def pytest_report_header(config):
    from causal_attn.versions import describe

    return "causal_attn stack: " + describe()


def pytest_configure(config):
    """A dependency that no longer imports (a new upstream release) stops the run with one message, before
    every test module fails to collect with its own traceback."""
    from causal_attn.versions import check_stack

    problem = check_stack()
    if problem:
        pytest.exit(problem, returncode=4)
