"""Shared fixtures: tiny pipelines built from configs, the network made unreachable, steady CPU threads."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models gain nothing from more threads, and a shared machine makes them much slower (measured 5-20x).
torch.set_num_threads(int(os.environ.get("REDIFINE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails the test: nothing is ever fetched from a hub."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            return real_connect(self, address)
        raise OSError(f"network access attempted in a test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_sd():
    """A tiny diffusers StableDiffusionPipeline (random weights, SD1.x module layout)."""
    from redifine_core.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny SD pipeline saved as a diffusers folder."""
    from redifine_core.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl():
    from redifine_core.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()
