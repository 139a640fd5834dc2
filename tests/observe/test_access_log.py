"""The access log: one JSON line per request (``[log] access``: on ``ollama_proxy.usage``
through the log, to stdout, appended to a file, or off), written off the latency path
(kept, then flushed while the next request waits for its backend)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
import trio

from gateway_stack import MemorySink, gateway_config, start_gateway, start_simulator
from ollama_proxy.access.keys import key_prefix, new_key
from ollama_proxy.api.record import Outcome, RequestRecord
from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.errors import ConfigError
from ollama_proxy.observe.access_log import ACCESS_FIELDS, LOGGER, AccessLog, access_line
from ollama_proxy.sim.server import Simulator

PROMPT = "the prompt text must never be logged 7f3a"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}],
        "stream": False}


def record(**changes: object) -> RequestRecord:
    base = RequestRecord(request_id="r1", time=1764227679.1239, endpoint="/api/chat",
                         model="m", backend="b", status=200, outcome=Outcome.OK,
                         prompt_tokens=1, completion_tokens=2, estimated=False, stream=False,
                         duration_s=0.1, ttfb_s=0.05, client="127.0.0.1")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_line_has_the_documented_fields_in_order():
    """Time as ISO 8601 UTC with milliseconds and as Unix seconds; durations Ollama did
    not report are null, reported ones in seconds."""
    line = json.loads(access_line(record()))
    assert tuple(line) == ACCESS_FIELDS
    assert (line["time"], line["unix"]) == ("2025-11-27T07:14:39.123Z", 1764227679.124)
    assert (line["path"], line["method"], line["outcome"]) == ("/api/chat", "POST", "ok")
    assert (line["gpu_seconds"], line["load_seconds"]) == (None, None)
    timed = json.loads(access_line(record(prompt_eval_ns=250_000_000, eval_ns=1_500_000_000,
                                          load_ns=3_000_000_000, alias="fast")))
    assert (timed["gpu_seconds"], timed["load_seconds"], timed["alias"]) == (1.75, 3.0, "fast")


def test_lines_are_kept_until_flushed(caplog):
    """Writing a line costs microseconds: keep only keeps it; flush writes it, once."""
    caplog.set_level("INFO", logger=LOGGER)
    log = AccessLog()
    log.keep(record())
    assert caplog.records == []
    log.flush()
    log.flush()
    assert [json.loads(r.getMessage())["request_id"] for r in caplog.records] == ["r1"]


def test_stdout_gets_bare_lines_and_off_nothing(caplog, capsys):
    caplog.set_level("INFO", logger=LOGGER)
    to_stdout, off = AccessLog("stdout"), AccessLog("off")
    for log in (to_stdout, off):
        log.keep(record(request_id="a"))
        log.keep(record(request_id="b"))
        log.close()
    out = capsys.readouterr().out
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["a", "b"]
    assert caplog.records == []


def test_a_file_is_appended_to_and_opened_again_by_reopen(tmp_path: Path):
    """Rotation by renaming: reopen starts the file anew; one that cannot be opened
    changes nothing (an OSError)."""
    path = tmp_path / "access.log"
    path.write_text("an older line\n")
    log = AccessLog(str(path))
    log.keep(record(request_id="a"))
    log.flush()
    os.rename(path, tmp_path / "access.log.1")
    log.keep(record(request_id="b"))
    log.reopen(str(path))  # the kept line goes where it was going
    log.keep(record(request_id="c"))
    with pytest.raises(OSError):
        log.reopen(str(tmp_path / "no such folder" / "access.log"))
    log.close()
    rotated = (tmp_path / "access.log.1").read_text().splitlines()
    assert rotated[0] == "an older line"
    assert [json.loads(line)["request_id"] for line in rotated[1:]] == ["a", "b"]
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["c"]


def test_the_setting_and_its_environment_variable():
    assert load_config(None, env={}).log.access == "stderr"
    for text, value in (("OFF", "off"), ("Stdout", "stdout"), ("/var/log/a.log", "/var/log/a.log")):
        assert load_config(None, env={"OLLAMA_PROXY_LOG_ACCESS": text}).log.access == value


def test_a_file_that_cannot_be_opened_stops_the_start(tmp_path: Path):
    config = gateway_config(["http://127.0.0.1:9"])
    bad = str(tmp_path / "missing" / "access.log")
    with pytest.raises(ConfigError, match=r"\[log\] access = .*access.log: cannot open it"):
        Gateway(dataclasses.replace(config, log=dataclasses.replace(config.log, access=bad)))


async def test_lines_are_written_while_the_next_request_waits(stack, caplog):
    """The gateway writes kept lines once the next request is out to a backend."""
    caplog.set_level("INFO", logger=LOGGER)
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            first = await client.post(stack.url + "/api/chat", json=CHAT)
            second = await client.post(stack.url + "/api/chat", json=CHAT)
    written = [json.loads(r.getMessage())["request_id"] for r in caplog.records
               if r.name == LOGGER]
    assert written == [first.headers["x-request-id"]]
    # the after phase comes once the response went out: the log's turn comes first
    await stack.sink.record_of(second.headers["x-request-id"])
    stack.gateway.access_log.flush()  # what its timer does within a second
    written = [json.loads(r.getMessage())["request_id"] for r in caplog.records
               if r.name == LOGGER]
    assert written == [first.headers["x-request-id"], second.headers["x-request-id"]]


async def test_a_file_gets_one_line_per_request_and_no_secret(nursery, tmp_path: Path):
    """An answer, a stream and a stranger's 401 (no user, no key prefix) each leave one
    line; the client's X-Request-Id is kept and echoed, a malformed one replaced; the
    file holds no key text, no prompt and no answer."""
    path = tmp_path / "access.log"
    _, _, sim_url = await start_simulator(nursery, Simulator())
    config = gateway_config([sim_url])
    config = dataclasses.replace(config, log=dataclasses.replace(config.log, access=str(path)))
    gateway, url, sink, key = await start_gateway(nursery, config)
    stranger = new_key()
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url) as client:
            auth = {"Authorization": f"Bearer {key}"}
            answer = await client.post("/api/chat", json=CHAT,
                                       headers={**auth, "X-Request-Id": "client-id.1"})
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**CHAT, "stream": True},
                                     headers={**auth, "X-Request-Id": "bad id!"}) as stream:
                streamed = "".join([part async for part in stream.aiter_text()])
            refused = await client.post("/api/chat", json=CHAT,
                                        headers={"Authorization": f"Bearer {stranger}",
                                                 "X-Request-Id": "stranger-1"})
            await sink.record_of(stream.headers["x-request-id"])
    gateway.access_log.flush()
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [tuple(line) for line in lines] == [ACCESS_FIELDS] * 3
    ok, streamed_line, stranger_line = lines
    assert answer.headers["x-request-id"] == ok["request_id"] == "client-id.1"
    assert stream.headers["x-request-id"] == streamed_line["request_id"] != "bad id!"
    assert refused.headers["x-request-id"] == stranger_line["request_id"] == "stranger-1"
    assert (ok["user"], ok["key_prefix"], ok["method"], ok["path"], ok["status"],
            ok["outcome"], ok["stream"], ok["backend"]) == (
        "admin", key_prefix(key), "POST", "/api/chat", 200, "ok", False, "default")
    assert ok["completion_tokens"] > 0 and ok["prompt_tokens"] > 0 and not ok["estimated"]
    assert ok["ttfb_s"] <= ok["duration_s"] and ok["queued_s"] >= 0
    assert (streamed_line["path"], streamed_line["stream"], streamed_line["outcome"]) == (
        "/v1/chat/completions", True, "ok")
    assert streamed_line["completion_tokens"] > 0
    assert (stranger_line["status"], stranger_line["outcome"], stranger_line["user"],
            stranger_line["key_prefix"], stranger_line["backend"]) == (
        401, "refused", None, None, None)
    assert [r.request_id for r in sink.records] == [ok["request_id"],
                                                    streamed_line["request_id"]]
    content = answer.json()["message"]["content"]
    assert len(content) > 8
    for secret in (key, stranger, key[len(key_prefix(key)):], PROMPT, content):
        assert secret not in text
    assert streamed and "Bearer" not in text


async def test_a_reload_opens_the_file_again(nursery, tmp_path: Path):
    """A reload (as SIGHUP) opens the access log again: a renamed file (logrotate) is
    left as it is and a new one started; a file that cannot be opened is a 400 and
    the lines keep going where they went."""
    _, _, sim_url = await start_simulator(nursery, Simulator())
    ini, path = tmp_path / "gateway.ini", tmp_path / "access.log"

    def write(access: Path) -> None:
        ini.write_text(f"[server]\nlisten = 127.0.0.1:0\ndatabase = {tmp_path / 'db'}\n"
                       f"[log]\naccess = {access}\n")

    def loader():  # as the CLI does: same file, same --upstream
        return load_config(str(ini), env={}, upstream_urls=[sim_url])

    write(path)
    key, sink = new_key(), MemorySink()
    gateway = Gateway(loader(), admin_key=key, loader=loader, on_record=sink.observe)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    auth = {"Authorization": f"Bearer {key}"}
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=auth) as client:
            async def chat_id() -> str:
                reply = await client.post("/api/chat", json=CHAT)
                await sink.record_of(reply.headers["x-request-id"])  # kept for its line
                return reply.headers["x-request-id"]

            first = await chat_id()
            os.rename(path, tmp_path / "access.log.1")
            assert (await client.post("/admin/api/reload")).json()["applied"] == []
            second = await chat_id()
            write(tmp_path / "missing" / "access.log")
            bad = await client.post("/admin/api/reload")
            assert bad.status_code == 400 and "[log] access" in bad.json()["error"]["message"]
            third = await chat_id()
    gateway.access_log.flush()

    def ids(file: Path) -> list[str]:
        return [json.loads(line)["request_id"] for line in file.read_text().splitlines()]
    assert ids(tmp_path / "access.log.1") == [first]
    assert ids(path) == [second, third]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_sink_that_refuses_loses_lines_not_the_gateway(caplog):
    """A full disk (or a closed pipe): the lines are counted as lost and said once a
    minute at most; flush never raises (it runs in the request path and the log's task)."""
    log = AccessLog("/dev/full")
    with caplog.at_level(logging.ERROR, logger="ollama_proxy.access"):
        for _ in range(3):
            log.keep(record())
            log.flush()
    assert log.lost == 3
    assert len([r for r in caplog.records if "access log lines lost" in r.getMessage()]) == 1
    log.close()
