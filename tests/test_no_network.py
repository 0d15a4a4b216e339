"""The suite must never reach a model hub: the guard must refuse, here and in subprocesses."""

import socket
import subprocess
import sys

import pytest
from sitecustomize import NetworkBlockedError


def test_connection_to_hub_is_refused_in_process():
    with pytest.raises(NetworkBlockedError, match="huggingface.co"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(NetworkBlockedError):
        socket.socket().connect(("8.8.8.8", 53))


def test_connection_to_hub_is_refused_in_child_process():
    code = "import socket; socket.create_connection(('huggingface.co', 443), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "network access blocked in tests" in proc.stderr


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()


def test_hub_download_fails_fast_offline():
    from transformers import AutoConfig

    with pytest.raises(OSError):
        AutoConfig.from_pretrained("openai-community/gpt2")
