"""The Dockerfiles parse and do what the README says: an NVIDIA base image, diffquant[trt]
installed, the GPU tests as the default command."""

from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

DOCKER = Path(__file__).parents[2] / "docker"


@pytest.mark.parametrize(
    ("name", "base"), [("Dockerfile", "nvcr.io/nvidia/tensorrt:"), ("Dockerfile.jetson", "nvcr.io/nvidia/l4t-")]
)
def test_dockerfile_parses(name, base, tmp_path):
    df = DockerfileParser(path=str(tmp_path))
    df.content = (DOCKER / name).read_text()
    instructions = [i["instruction"] for i in df.structure if i["instruction"] != "COMMENT"]
    assert instructions[0] == "FROM" and df.baseimage.startswith(base)
    assert {"WORKDIR", "COPY", "RUN", "CMD"} <= set(instructions)
    assert "tests/gpu" in df.structure[-1]["value"]
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    assert "pip install" in runs and "import tensorrt" in runs
    if name == "Dockerfile":
        assert '".[trt,dev]"' in runs and "torch==2.13.0" in runs
