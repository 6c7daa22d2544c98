"""Shared fixtures: tiny SD1.5-like and SD2.1-like pipelines, built once per test session.

The tiny pipelines (see ``mag_explore.testing``) are saved to a temporary folder and
loaded back with ``load_pipeline`` -- the same path a real model takes -- on the CPU
in fp32. They are shared by every test of the session, so a test that changes a
pipeline (attention processors, scheduler, ...) must put it back as it was.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mag_explore import testing
from mag_explore.models import load_pipeline

# The tiny models are far too small to gain from intra-op threads, and on a busy
# machine (CI runners, shared 2-core boxes) the threads spin-wait on each other:
# a 2-step tiny generation measured 2.4 s with 2 threads vs 0.09 s with 1.
# OMP_NUM_THREADS, if set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory) -> Path:
    """Folder of the tiny SD1.5-like pipeline (diffusers format, safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-sd15")
    testing.tiny_sd15_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def sd21_folder(tmp_path_factory) -> Path:
    """Folder of the tiny SD2.1-like pipeline (diffusers format, safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-sd21")
    testing.tiny_sd21_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def sd15_pipe(sd15_folder):
    """Tiny SD1.5-like ``StableDiffusionPipeline`` (CPU, fp32), loaded with load_pipeline."""
    return load_pipeline(sd15_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def sd21_pipe(sd21_folder):
    """Tiny SD2.1-like ``StableDiffusionPipeline`` (CPU, fp32), loaded with load_pipeline."""
    return load_pipeline(sd21_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(params=["sd15", "sd21"])
def tiny_pipe(request):
    """Each tiny pipeline in turn: a test using it runs once per architecture."""
    return request.getfixturevalue(f"{request.param}_pipe")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny CLIP-style tokenizer (vocabulary ``mag_explore.testing.TINY_WORDS``)."""
    return testing.tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    """Folder of the tiny SDXL-like pipeline (diffusers format, safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    testing.tiny_sdxl_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def sdxl_pipe(sdxl_folder):
    """Tiny SDXL-like ``StableDiffusionXLPipeline`` (CPU, fp32), loaded with load_pipeline."""
    return load_pipeline(sdxl_folder, device="cpu", dtype=torch.float32)


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's rendezvous (a fixed one may be taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
