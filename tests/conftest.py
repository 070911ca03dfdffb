"""Shared fixtures: CPU-only JAX, quiet GCP auth, an in-process GCS emulator."""

from __future__ import annotations

import os
import socket

# Never let anything probe a metadata server or a GPU from the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NO_GCE_CHECK", "true")
# Both test workers compile for TPU topologies without a TPU: libtpu's lockfile, there to
# keep two processes off one TPU, would fail whichever loads it second.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """An in-memory GCS emulator on loopback; yields its endpoint URL."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="jaxdiff-test")
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """Name of a bucket in the emulator (`gs://<name>/...`)."""
    return "jaxdiff-test"
