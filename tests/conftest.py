from __future__ import annotations

import pytest

from flowsession.client import connect

from .support import ServerProcess, ServerThread, settings_for


@pytest.fixture(autouse=True)
def _no_server_process_outlives_its_test():
    yield
    ServerProcess.close_all()


@pytest.fixture
def server(tmp_path):
    running = ServerThread(settings_for(tmp_path))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with connect(server.address) as c:
        yield c
